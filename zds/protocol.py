"""The ZDS transport and messages, as both ends use them.

The agent listens on a UNIX ``SOCK_SEQPACKET`` socket; ztunnel connects and sends ``ZdsHello`` (version V1). The
agent then replays every pod it holds (``AddWorkload`` with the pod's netns fd as ``SCM_RIGHTS``; the protocol's
``KeepWorkload``, for a pod whose fd the agent does not hold, is understood by the ZDS peer but our agent never
sends it), sends ``SnapshotSent`` (ztunnel's name for the end of the replay: ztunnel
drops every pod the replay did not name), then live ``AddWorkload``/``DelWorkload``. Every request is answered by
one ``WorkloadResponse`` carrying an ``Ack`` whose ``error`` is empty on success. One message per datagram, at
most ``MAX_DATAGRAM`` bytes.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from zds import zds_pb2

MAX_DATAGRAM = 1024  # ztunnel's receive buffer: a bigger message is an error there
RECV_MAX_FDS = 4  # a receiver takes up to this many fds with one datagram (an AddWorkload carries one)

# WorkloadRequest payload kinds (``WhichOneof("payload")``)
ADD, KEEP, DEL, SNAPSHOT_SENT = "add", "keep", "del", "snapshot_sent"

__all__ = [
    "ADD", "DEL", "KEEP", "MAX_DATAGRAM", "RECV_MAX_FDS", "SNAPSHOT_SENT", "DecodeError", "ack", "add_workload",
    "decode_ack", "decode_hello", "decode_request", "del_workload", "hello", "keep_workload", "request_uid",
    "snapshot_sent",
]


def hello() -> bytes:
    """What ztunnel sends first."""
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def decode_hello(data: bytes) -> bool:
    """Whether ``data`` is a ``ZdsHello`` of version V1 (DecodeError for bytes that are no protobuf)."""
    message = zds_pb2.ZdsHello()
    message.ParseFromString(data)
    return bool(data) and message.version == zds_pb2.V1


def add_workload(uid: str, name: str = "", namespace: str = "", service_account: str = "") -> zds_pb2.WorkloadRequest:
    """AddWorkload; the pod's netns fd travels with it."""
    info = zds_pb2.WorkloadInfo(name=name, namespace=namespace, service_account=service_account)
    return zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid=uid, workload_info=info))


def keep_workload(uid: str) -> zds_pb2.WorkloadRequest:
    """KeepWorkload (replay only): a pod ztunnel already serves, whose netns fd the agent does not hold."""
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid))


def del_workload(uid: str) -> zds_pb2.WorkloadRequest:
    return zds_pb2.WorkloadRequest(**{"del": zds_pb2.DelWorkload(uid=uid)})  # "del" is a Python keyword


def snapshot_sent() -> zds_pb2.WorkloadRequest:
    """The end of the replay."""
    return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent())


def decode_request(data: bytes) -> tuple[str, zds_pb2.WorkloadRequest]:
    """(payload kind, request); DecodeError for bytes that are no WorkloadRequest."""
    request = zds_pb2.WorkloadRequest()
    request.ParseFromString(data)
    return request.WhichOneof("payload") or "", request


def request_uid(request: zds_pb2.WorkloadRequest) -> str:
    """The pod uid a request names ("" for SnapshotSent)."""
    kind = request.WhichOneof("payload")
    return str(getattr(getattr(request, kind), "uid", "")) if kind else ""


def ack(error: str = "") -> bytes:
    """The answer to one request: empty ``error`` is success."""
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


def decode_ack(data: bytes) -> zds_pb2.Ack | None:
    """The Ack a response carries, None for a response without one (DecodeError for bytes that are none)."""
    response = zds_pb2.WorkloadResponse()
    response.ParseFromString(data)
    return response.ack if response.WhichOneof("payload") == "ack" else None
