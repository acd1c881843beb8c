"""UNIX stream socket server for the plugin <-> agent wire protocol v1 (framing in ``cni_plugin.wire``).

Security: ``<run_dir>`` is 0700; the socket is bound under umask 0177 at a temporary name and renamed into
place, so ``cni.sock`` never exists with wider permissions than 0600; every peer's uid is read with
SO_PEERCRED and anything but uid 0 is refused. Robustness: a bounded worker pool serves connections, each
request must arrive completely within ``READ_TIMEOUT_S``, frames over 1 MiB are refused from their header,
and every failure is answered with ``ok:false`` and a message where the peer can still read it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack

from cni_plugin import errors, rundir, wire
from nodeagent import logs
from nodeagent.acceptor import AcceptLoop
from nodeagent.core import AgentCore
from nodeagent.instance import UnsafePath, secure_dir

READ_TIMEOUT_S = 2.0  # a whole request must arrive within this
WRITE_TIMEOUT_S = 2.0
WORKERS = 64
MAX_INFLIGHT = 512  # accepted connections queued or in service; beyond this: "busy, try again later"
DRAIN_TIMEOUT_S = 10.0
REFUSAL_LINGER_S = 0.2
REQUIRED_PEER_UID = 0
PERMISSION_DENIED = errors.AGENT_FAILURE  # code answered to a non-root peer (see docs/protocol.md)

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


# The agent speaks the wire format with the msgpack library (C, fast under load); the plugin with
# cni_plugin.minipack (no import cost per pod). tests/test_minipack.py proves the two byte-compatible.
def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpackb(body: bytes) -> Any:
    return msgpack.unpackb(body, raw=False, strict_map_key=True)


class ServerError(Exception):
    pass


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def prepare_run_dir(run_dir: str) -> None:
    try:
        secure_dir(run_dir, "run dir")
    except UnsafePath as exc:
        raise ServerError(str(exc)) from None


class SocketServer:
    def __init__(self, run_dir: str, core: AgentCore, workers: int = WORKERS) -> None:
        self.run_dir = run_dir
        self.path = rundir.socket_path(run_dir)
        self.core = core
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cni-req")
        self._acceptor: AcceptLoop | None = None
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self._log = logs.get_logger()
        self.refused = 0
        self._socket_inode = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        prepare_run_dir(self.run_dir)
        self._remove_stale_socket()
        tmp_path = os.path.join(self.run_dir, f".cni.sock.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            listener.bind(tmp_path)
        except PermissionError as exc:
            listener.close()
            raise ServerError(
                f"cannot create the plugin socket in {self.run_dir}: {exc.strerror}. If SELinux is enforcing, "
                "the agent needs a label that may create sockets there (e.g. seLinuxOptions.type: spc_t)"
            ) from exc
        except OSError as exc:
            listener.close()
            raise ServerError(f"cannot create the plugin socket {self.path}: {exc.strerror or exc}") from exc
        finally:
            os.umask(old_umask)
        os.chmod(tmp_path, 0o600)
        listener.listen(1024)
        os.rename(tmp_path, self.path)
        self._socket_inode = os.stat(self.path).st_ino
        self._acceptor = AcceptLoop(listener, self._accepted, "cni-accept", retry_s=0.01)
        self._acceptor.start()
        self.core.readiness.socket_up = True
        logs.emit(self._log, logging.INFO, "plugin socket listening", {"path": self.path})

    def _remove_stale_socket(self) -> None:
        if not os.path.lexists(self.path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # nobody listens: stale
            logs.emit(self._log, logging.INFO, "removed a stale plugin socket", {"path": self.path})
            return
        finally:
            probe.close()
        raise ServerError(f"another process already serves {self.path}; is a second agent running?")

    def stop(self, drain_timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Stop accepting, then wait (bounded) for in-flight requests. Returns True when all drained."""
        self.core.readiness.socket_up = False
        if self._acceptor is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._socket_inode:  # ours, not a successor's
                    os.unlink(self.path)
            self._acceptor.stop()
        end = time.monotonic() + drain_timeout
        with self._inflight_cond:
            while self._inflight and (remaining := end - time.monotonic()) > 0:
                self._inflight_cond.wait(remaining)
            drained = self._inflight == 0
            left = self._inflight
        self._pool.shutdown(wait=drained, cancel_futures=True)
        logs.emit(self._log, logging.INFO if drained else logging.WARNING, "plugin socket closed",
                  {"drained": drained, "abandoned": left})
        return drained

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- serving ------------------------------------------------------------------------------------
    def _accepted(self, conn: socket.socket) -> None:
        with self._inflight_cond:
            busy = self._inflight >= MAX_INFLIGHT
            if not busy:
                self._inflight += 1
        if busy:
            self._refuse(conn, errors.TRY_AGAIN_LATER, f"node agent busy ({MAX_INFLIGHT} requests in flight)")
            return
        try:
            self._pool.submit(self._serve, conn)
        except RuntimeError:  # pool shut down under us
            self._done()
            self._refuse(conn, errors.TRY_AGAIN_LATER, "node agent is shutting down")

    def _done(self) -> None:
        with self._inflight_cond:
            self._inflight -= 1
            self._inflight_cond.notify_all()

    def _refuse(self, conn: socket.socket, code: int, msg: str, request_id: str = "") -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            self._send(conn, wire.Reply(id=request_id, ok=False, code=code, msg=msg))
            # Closing with unread input makes the kernel reset the connection, and the peer could lose the
            # refusal: half-close, then discard what it still sends (bounded in time and size).
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(REFUSAL_LINGER_S)
            discarded = 0
            while discarded <= wire.MAX_FRAME + wire.HEADER.size and (chunk := conn.recv(65536)):
                discarded += len(chunk)
        conn.close()

    @staticmethod
    def _send(conn: socket.socket, reply: wire.Reply) -> None:
        conn.settimeout(WRITE_TIMEOUT_S)
        conn.sendall(wire.encode_frame(reply.to_wire(), _packb))

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_one(conn)
        except Exception as exc:  # never let one connection kill a worker
            logs.emit(self._log, logging.ERROR, "connection failed", {"error": f"{type(exc).__name__}: {exc}"})
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._done()

    def _serve_one(self, conn: socket.socket) -> None:
        pid, uid, _ = peer_credentials(conn)
        if uid != REQUIRED_PEER_UID:
            logs.emit(self._log, logging.WARNING, "refused a non-root peer", {"peer_pid": pid, "peer_uid": uid})
            self.core.metrics.requests.labels("unknown", "refused").inc()
            self._refuse(conn, PERMISSION_DENIED, f"permission denied: peer uid {uid} is not 0 (root)")
            return
        deadline = time.monotonic() + READ_TIMEOUT_S
        message: dict[str, object] = {}
        try:
            message = wire.read_message(conn, deadline, _unpackb)
            request = wire.parse_request(message)
        except wire.WireError as exc:
            self.core.metrics.requests.labels("unknown", "refused").inc()
            logs.emit(self._log, logging.WARNING, "refused a bad request", {"peer_pid": pid, "error": str(exc)})
            request_id = message.get("id")
            self._refuse(conn, exc.code, f"bad request: {exc}",
                         request_id if isinstance(request_id, str) else "")
            return
        except TimeoutError:
            self.core.metrics.requests.labels("unknown", "refused").inc()
            logs.emit(self._log, logging.WARNING, "request not received in time", {"peer_pid": pid})
            self._refuse(conn, errors.DECODE_FAILURE, f"request not received within {READ_TIMEOUT_S:g} s")
            return
        except (ConnectionError, OSError) as exc:
            logs.emit(self._log, logging.WARNING, "peer went away before its request was complete",
                      {"peer_pid": pid, "error": str(exc)})
            return
        reply = self.core.handle(request)
        try:
            self._send(conn, reply)
        except OSError as exc:
            logs.emit(self._log, logging.WARNING, "could not deliver the reply (plugin gone?)",
                      logs.pod_fields(request.pod.namespace, request.pod.name, request.pod.uid,
                                      op=request.op, error=str(exc)))
