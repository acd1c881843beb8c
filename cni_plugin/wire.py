"""Plugin <-> agent wire protocol v1 (see docs/protocol.md).

UNIX stream socket ``<run_dir>/cni.sock`` (``cni_plugin.rundir``). Each message is a 4-byte big-endian length
followed by one msgpack map; frames over 1 MiB are refused. One request, one reply, then close.

This module holds framing, request construction and validation, and the one way both sides read a frame off a
connected socket (``read_message``: bounded by a deadline). Connecting, serving and replying live in
``cni_plugin.agent_client`` (client) and ``nodeagent.server`` (server).
"""

from __future__ import annotations

import struct
import time

from cni_plugin import k8snames
from cni_plugin.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")

OPS = ("add", "del", "check", "gc", "status")


class WireError(Exception):
    """A frame or message that breaks the protocol. ``code`` is the CNI code to answer with."""

    def __init__(self, msg: str, code: int = 6) -> None:
        super().__init__(msg)
        self.code = code


def encode_frame(message: dict[str, Any], packb: Callable[[Any], bytes] | None = None) -> bytes:
    """Header + msgpack body. ``packb``: the encoder; by default the plugin's ``cni_plugin.minipack`` (no
    library import on the hot path); the agent passes the msgpack library's (``nodeagent.server``)."""
    if packb is None:
        from cni_plugin import minipack

        packb = minipack.packb
    body = packb(message)
    if len(body) > MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """Length announced by a 4-byte header; refuses frames over the limit."""
    if len(header) != HEADER.size:
        raise WireError("truncated frame header")
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise WireError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


class ClosedMidFrame(ConnectionError):
    """The peer closed the connection before a whole frame arrived."""


def recv_exact(sock: Any, size: int, deadline: float) -> bytes:
    """``size`` bytes from the connected ``sock`` before ``deadline`` (a time.monotonic() instant): TimeoutError
    when it passes, ClosedMidFrame when the peer closes first (other socket errors as raised)."""
    chunks: list[bytes] = []
    while size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(min(size, 65536))
        if not chunk:
            raise ClosedMidFrame("peer closed the connection mid-frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_message(sock: Any, deadline: float, unpackb: Callable[[bytes], Any] | None = None) -> dict[str, Any]:
    """One whole frame from ``sock`` before ``deadline``, decoded (``decode_body``); WireError for a frame that
    breaks the protocol, else the errors of ``recv_exact``."""
    length = frame_length(recv_exact(sock, HEADER.size, deadline))
    return decode_body(recv_exact(sock, length, deadline), unpackb)


def decode_body(body: bytes, unpackb: Callable[[bytes], Any] | None = None) -> dict[str, Any]:
    """One msgpack map. ``unpackb``: the decoder (default ``cni_plugin.minipack``; see ``encode_frame``)."""
    if unpackb is None:
        from cni_plugin import minipack

        unpackb = minipack.unpackb
    try:
        message = unpackb(body)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise WireError(f"malformed msgpack body: {exc}") from exc
    if not isinstance(message, dict):
        raise WireError(f"message must be a map, got {type(message).__name__}")
    return message


class PodRef(Frozen):
    __slots__ = ("name", "namespace", "uid", "infra_container_id")
    _defaults = {"name": "", "namespace": "", "uid": "", "infra_container_id": ""}
    name: str
    namespace: str
    uid: str
    infra_container_id: str

    def to_wire(self) -> dict[str, str]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "infra_container_id": self.infra_container_id,
        }


class Attachment(Frozen):
    __slots__ = ("container_id", "ifname")
    container_id: str
    ifname: str


class Request(Frozen):
    __slots__ = (
        "op", "id", "container_id", "netns", "ifname", "pod", "ips", "cni_version", "deadline_ms",
        "valid_attachments",
    )
    _defaults = {
        "container_id": "", "netns": "", "ifname": "", "pod": PodRef, "ips": (), "cni_version": "",
        "deadline_ms": 5000, "valid_attachments": (),
    }
    op: str
    id: str
    container_id: str
    netns: str
    ifname: str
    pod: PodRef
    ips: tuple[str, ...]
    cni_version: str
    deadline_ms: int
    valid_attachments: tuple[Attachment, ...]

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "op": self.op,
            "id": self.id,
            "container_id": self.container_id,
            "netns": self.netns,
            "ifname": self.ifname,
            "pod": self.pod.to_wire(),
            "ips": list(self.ips),
            "cni_version": self.cni_version,
            "deadline_ms": self.deadline_ms,
        }
        if self.op == "gc":
            message["valid_attachments"] = [
                {"container_id": a.container_id, "ifname": a.ifname} for a in self.valid_attachments
            ]
        return message


class Reply(Frozen):
    __slots__ = ("id", "ok", "enrolled", "code", "msg")
    _defaults = {"enrolled": False, "code": 0, "msg": ""}
    id: str
    ok: bool
    enrolled: bool
    code: int
    msg: str

    def to_wire(self) -> dict[str, Any]:
        message: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id, "ok": self.ok, "enrolled": self.enrolled}
        if not self.ok:
            message["code"] = self.code
            message["msg"] = self.msg
        return message


def _str_field(message: dict[str, Any], key: str, required: bool = False) -> str:
    value = message.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise WireError(f"field {key!r} must be a string")
    if required and not value:
        raise WireError(f"field {key!r} is required")
    return value


def check_version(message: dict[str, Any]) -> None:
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version!r}; this side speaks v{PROTOCOL_VERSION}", code=1)


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded request map. Raises WireError (code 1 for a wrong ``v``, 4 for a pod identity that
    Kubernetes would not produce, see ``cni_plugin.k8snames``)."""
    check_version(message)
    op = _str_field(message, "op", required=True)
    if op not in OPS:
        raise WireError(f"unknown op {op!r}; expected one of {', '.join(OPS)}", code=4)
    pod_raw = message.get("pod") or {}
    if not isinstance(pod_raw, dict):
        raise WireError("field 'pod' must be a map")
    pod = PodRef(
        name=_str_field(pod_raw, "name"),
        namespace=_str_field(pod_raw, "namespace"),
        uid=_str_field(pod_raw, "uid"),
        infra_container_id=_str_field(pod_raw, "infra_container_id"),
    )
    problem = k8snames.pod_problem(pod.namespace, pod.name, pod.uid, pod.infra_container_id)
    if problem is not None:  # the same check as the plugin's: the socket is root-only, but trust nothing
        raise WireError(f"field 'pod': {problem[1]}", code=4)
    ips_raw = message.get("ips") or []
    if not isinstance(ips_raw, list) or not all(isinstance(ip, str) for ip in ips_raw):
        raise WireError("field 'ips' must be a list of CIDR strings")
    deadline = message.get("deadline_ms", 5000)
    if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline <= 0:
        raise WireError("field 'deadline_ms' must be a positive integer")
    attachments: list[Attachment] = []
    if op == "gc":
        raw_attachments = message.get("valid_attachments") or []
        if not isinstance(raw_attachments, list):
            raise WireError("field 'valid_attachments' must be a list")
        for item in raw_attachments:
            if not isinstance(item, dict):
                raise WireError("each valid attachment must be a map")
            attachments.append(Attachment(_str_field(item, "container_id"), _str_field(item, "ifname")))
    container_id = _str_field(message, "container_id", required=op in ("add", "del", "check"))
    return Request(
        op=op,
        id=_str_field(message, "id"),
        container_id=container_id,
        netns=_str_field(message, "netns"),
        ifname=_str_field(message, "ifname"),
        pod=pod,
        ips=tuple(ips_raw),
        cni_version=_str_field(message, "cni_version"),
        deadline_ms=deadline,
        valid_attachments=tuple(attachments),
    )


def parse_reply(message: dict[str, Any]) -> Reply:
    check_version(message)
    ok = message.get("ok")
    if not isinstance(ok, bool):
        raise WireError("reply field 'ok' must be a boolean")
    enrolled = message.get("enrolled", False)
    code = message.get("code", 0) or 0
    msg = message.get("msg", "") or ""
    if not isinstance(code, int) or not isinstance(msg, str):
        raise WireError("reply fields 'code'/'msg' have wrong types")
    return Reply(id=_str_field(message, "id"), ok=ok, enrolled=bool(enrolled), code=code, msg=msg)
