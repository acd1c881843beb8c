"""The agent side of ZDS: ztunnel connects here and receives pods' netns fds.

UNIX SOCK_SEQPACKET, one protobuf per datagram (the contract: ``zds/``). ztunnel connects and sends ``ZdsHello``; the
agent replays the pods it holds (``AddWorkload`` + netns fd as SCM_RIGHTS per pod; it never sends
``KeepWorkload``: a pod whose netns it cannot hold is left out, and ztunnel drops it), then ``SnapshotSent``
(ztunnel's name for the end of the replay), then live adds and dels. Every request waits for its ``Ack`` (deadline
``ack_timeout_s``) and a connection has one sender at a time, so requests and acks never interleave. Adds go to the
newest connection, dels to all. A connection whose ack times out is closed (ztunnel reconnects and gets a fresh
replay), so a late ack can never be taken for the answer to a later request.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nodeagent import logs
from nodeagent.acceptor import AcceptLoop
from zds import protocol, zds_pb2
from zds.protocol import MAX_DATAGRAM

log = logs.Scoped("zds")

HELLO_TIMEOUT_S = 5.0
REPLAY_GATE_TIMEOUT_S = 30.0


class ZdsError(Exception):
    def __init__(self, msg: str, *, retryable: bool) -> None:
        super().__init__(msg)
        self.msg = msg
        self.retryable = retryable


@dataclass(frozen=True)
class Workload:
    """One pod as ZDS names it (``AddWorkload``), with its netns fd."""

    uid: str
    fd: int  # the pod's netns; ownership: see ZdsServer
    name: str = ""
    namespace: str = ""
    service_account: str = ""


def add_request(entry: Workload) -> zds_pb2.WorkloadRequest:
    return protocol.add_workload(entry.uid, entry.name, entry.namespace, entry.service_account)


class _Connection:
    def __init__(self, sock: socket.socket, cid: int, on_close: Callable[[_Connection], None]) -> None:
        self.sock = sock
        self.cid = cid
        self.send_lock = threading.Lock()
        self._acks: queue.Queue[zds_pb2.Ack | None] = queue.Queue()
        self._on_close = on_close
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def start_reader(self) -> None:
        self._reader = threading.Thread(target=self._read_loop, name=f"zds-conn-{self.cid}", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    data = self.sock.recv(MAX_DATAGRAM)
                except OSError:
                    break
                if not data:
                    break
                try:
                    ack = protocol.decode_ack(data)
                except protocol.DecodeError:
                    log(logging.WARNING, "zds: undecodable message from ztunnel, closing the connection",
                        {"zds_connection": self.cid})
                    break
                if ack is not None:
                    self._acks.put(ack)
        finally:
            self.close()
            self._release()

    def close(self) -> None:
        """End the connection: wake the reader (shutdown) and any request waiting for an ack.

        The socket itself is closed later, by the reader as it exits and under ``send_lock`` (``_release``), so
        that no thread can still be entering a call on it. CPython reads a socket's fd number only after
        releasing the GIL; a socket closed under a thread that is about to block on it lets that thread, if
        preempted there, use the number after it went to a new socket (the next connection, the next
        listener): a stale reader then steals another connection's acks (whose request times out and closes
        that connection, so its replay never completes) or reads foreign bytes.
        """
        if self._closed.is_set():
            return
        self._closed.set()
        self._acks.put(None)  # wake a waiting request
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._on_close(self)
        if self._reader is None:  # never started (the hello failed): this thread is the socket's only user
            self.sock.close()

    def _release(self) -> None:
        with self.send_lock:  # a request mid-send finishes first (it fails fast: the socket is shut down)
            self.sock.close()

    def request_locked(self, req: zds_pb2.WorkloadRequest, fd: int | None, timeout: float,
                       pod: Mapping[str, str] | None = None) -> None:
        """Send one request and wait for its ack; the caller holds ``send_lock``. Raises ZdsError. ``pod``: the
        pod's log fields (``logs.pod_fields``), for a request about one pod."""
        if self._closed.is_set():
            raise ZdsError("ztunnel connection closed", retryable=True)
        while not self._acks.empty():  # nothing stale may answer this request
            if self._acks.get_nowait() is None:
                raise ZdsError("ztunnel connection closed", retryable=True)
        data = req.SerializeToString()
        if len(data) > MAX_DATAGRAM:
            raise ZdsError(f"ZDS message of {len(data)} bytes exceeds {MAX_DATAGRAM}", retryable=False)
        try:
            if fd is not None:
                socket.send_fds(self.sock, [data], [fd])
            else:
                self.sock.send(data)
        except OSError as exc:
            self.close()
            raise ZdsError(f"sending to ztunnel failed: {exc.strerror or exc}", retryable=True) from None
        try:
            ack = self._acks.get(timeout=max(0.0, timeout))
        except queue.Empty:
            log(logging.WARNING, "zds: no ack from ztunnel in time, closing the connection",
                {**(pod or {}), "zds_connection": self.cid, "timeout_s": round(timeout, 1)})
            self.close()
            raise ZdsError(f"ztunnel did not acknowledge within {timeout:.1f} s", retryable=True) from None
        if ack is None:
            raise ZdsError("ztunnel connection closed before the ack", retryable=True)
        if ack.error:
            raise ZdsError(f"ztunnel refused: {ack.error}", retryable=False)

    def request(self, req: zds_pb2.WorkloadRequest, fd: int | None, timeout: float,
                pod: Mapping[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        if not self.send_lock.acquire(timeout=max(0.0, timeout)):
            raise ZdsError("ztunnel connection busy beyond the deadline", retryable=True)
        try:
            self.request_locked(req, fd, deadline - time.monotonic(), pod)
        finally:
            self.send_lock.release()


class ZdsServer:
    """Listens for ztunnel. ``replay_source`` returns the pods to replay to every new connection; the fds in those
    entries belong to the server, which closes them once sent (``add`` only borrows the caller's fd)."""

    def __init__(
        self,
        path: str,
        replay_source: Callable[[], list[Workload]],
        ack_timeout_s: float = 5.0,
        replay_gate: Callable[[float], bool] | None = None,
    ) -> None:
        self.path = path
        self.ack_timeout_s = ack_timeout_s
        self._replay_source = replay_source
        # Waits (bounded) until the replay is complete, e.g. until a restarted agent has taken its pods over:
        # ztunnel drops every pod a replay does not name.
        self._replay_gate = replay_gate
        self._lock = threading.Lock()
        self._conns: list[_Connection] = []  # oldest first; only connections whose replay went out
        self._next_id = 0
        self._stop = threading.Event()
        self._acceptor: AcceptLoop | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        if _served_by_someone(self.path):
            raise OSError(errno.EADDRINUSE, f"another process already serves the ZDS socket {self.path}; "
                          "is a second agent running?")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)  # before listen(): nobody can connect in between
        sock.listen(16)
        self._acceptor = AcceptLoop(sock, self._accepted, "zds-accept", retry_s=0.05)
        self._acceptor.start()
        log(logging.INFO, "zds: listening", {"path": self.path})

    def close(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.stop()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # -- state -----------------------------------------------------------------------------------------------
    def connected(self) -> bool:
        with self._lock:
            return any(not c.closed for c in self._conns)

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
        log(logging.INFO, "zds: ztunnel connection closed", {"zds_connection": conn.cid})

    # -- accepting ---------------------------------------------------------------------------------------------
    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            self._next_id += 1
            cid = self._next_id
        try:
            threading.Thread(target=self._handle, args=(sock, cid), name=f"zds-hello-{cid}", daemon=True).start()
        except RuntimeError as exc:  # no thread for it (resource limits): refuse, keep accepting
            log(logging.WARNING, "zds: cannot serve a ztunnel connection", {"zds_connection": cid, "error": str(exc)})
            sock.close()

    def _handle(self, sock: socket.socket, cid: int) -> None:
        conn = _Connection(sock, cid, self._forget)
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            data = sock.recv(MAX_DATAGRAM)
            sock.settimeout(None)
            if not protocol.decode_hello(data):
                log(logging.WARNING, "zds: no ZdsHello V1, closing the connection",
                    {"zds_connection": cid, "got": repr(data[:32])})
                conn.close()
                return
        except (OSError, Exception) as exc:
            log(logging.WARNING, "zds: hello failed", {"zds_connection": cid, "error": str(exc)})
            conn.close()
            return
        if self._replay_gate is not None and not self._replay_gate(REPLAY_GATE_TIMEOUT_S):
            log(logging.WARNING, "zds: the agent has not taken over its pods in time; sending the replay as it is",
                {"zds_connection": cid, "waited_s": REPLAY_GATE_TIMEOUT_S})
        if self._stop.is_set():  # the server closed while this connection said hello (or waited at the gate)
            conn.close()
            return
        log(logging.INFO, "zds: ztunnel connected, replaying its pods", {"zds_connection": cid})
        conn.start_reader()
        # Register and take the replay under the server lock, holding the connection's send lock: any add
        # routed to this (newest) connection afterwards queues behind the replay.
        conn.send_lock.acquire()
        entries: list[Workload] = []
        try:
            with self._lock:
                self._conns.append(conn)
                entries = self._replay_source()
            for entry in entries:
                pod = _pod_fields(entry)
                try:
                    conn.request_locked(add_request(entry), entry.fd, self.ack_timeout_s, pod)
                except ZdsError as exc:
                    log(logging.WARNING, "zds: replaying the pod failed", {**pod, "zds_connection": cid,
                                                                           "error": exc.msg})
                    if conn.closed:
                        return
                log(logging.DEBUG, "zds: pod replayed", {**pod, "zds_connection": cid})
            conn.request_locked(protocol.snapshot_sent(), None, self.ack_timeout_s)
            log(logging.INFO, "zds: replay sent", {"zds_connection": cid, "pods": len(entries)})
        except ZdsError as exc:
            log(logging.WARNING, "zds: replay failed", {"zds_connection": cid, "error": exc.msg})
        except OSError as exc:  # the replay source could not duplicate the netns fds (e.g. out of fds)
            log(logging.WARNING, "zds: replay failed, closing the connection", {"zds_connection": cid,
                                                                                "error": str(exc)})
            conn.close()
        finally:
            conn.send_lock.release()
            for entry in entries:  # the replay's fds are ours (Workload): sent or not, close them
                with contextlib.suppress(OSError):
                    os.close(entry.fd)

    # -- requests -----------------------------------------------------------------------------------------------
    def add(self, entry: Workload, timeout: float) -> None:
        """AddWorkload with the netns fd to the newest connection; returns after the ack. Raises ZdsError."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
        if not live:
            raise ZdsError(f"no ztunnel connected on {self.path}", retryable=True)
        pod = _pod_fields(entry)
        live[-1].request(add_request(entry), entry.fd, timeout, pod)
        log(logging.DEBUG, "zds: ztunnel acknowledged the pod's netns", {**pod, "zds_connection": live[-1].cid})

    def delete(self, uid: str, timeout: float | None = None) -> list[str]:
        """DelWorkload to every connection; returns the errors (best effort, never raises)."""
        with self._lock:
            live = [c for c in self._conns if not c.closed]
        errors = []
        req = protocol.del_workload(uid)
        for conn in live:
            try:
                conn.request(req, None, self.ack_timeout_s if timeout is None else timeout, {"pod_uid": uid})
            except ZdsError as exc:
                errors.append(exc.msg)
        return errors


def _pod_fields(entry: Workload) -> dict[str, str]:
    return logs.pod_fields(entry.namespace, entry.name, entry.uid)


def _served_by_someone(path: str) -> bool:
    """Whether a live listener sits at ``path`` (a stale socket file refuses the connection)."""
    if not os.path.lexists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
