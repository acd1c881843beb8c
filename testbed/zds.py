"""A scripted ZDS client: the ztunnel stand-in for tests and benchmarks that need only the protocol's acks
(no listeners, no relaying; ``zds_peer`` is the one that proxies). It speaks the real protobuf over a real
SOCK_SEQPACKET socket and closes the netns fds it receives."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from testbed.poll import wait_for
from zds import protocol


class ScriptedZtunnel:
    """A scripted ZDS client: records (kind, uid, netns inode or None); acks per ``mode``."""

    def __init__(self, path: str, mode: str = "ack", ack_delay_s: float = 0.0, connect_timeout: float = 0.0) -> None:
        self.mode = mode  # "ack" | "silent" | "error"
        self.ack_delay_s = ack_delay_s
        self.got: list[tuple[str, str, int | None]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if connect_timeout:  # the agent may not serve its ZDS socket yet
            wait_for(lambda: self._connect(path), connect_timeout, tolerate=(OSError,),
                     what=f"the ZDS socket {path} to accept")
        else:
            self._connect(path)
        self.sock.send(protocol.hello())
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _connect(self, path: str) -> bool:
        self.sock.connect(path)
        return True

    def _loop(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, protocol.MAX_DATAGRAM, protocol.RECV_MAX_FDS)
            except OSError:
                return
            if not data:
                return
            try:
                self._handle(data, fds)
            except Exception as exc:  # never die silently (no more acks would look like a server bug)
                self.got.append((f"client error: {exc!r}", "", None))
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _handle(self, data: bytes, fds: list[int]) -> None:
        try:
            kind, req = protocol.decode_request(data)
        except protocol.DecodeError:  # keep the evidence: the assertions on kinds() then show the bytes
            self.got.append((f"corrupt:{data.hex()}:fds={len(fds)}", "", None))
            return
        self.got.append((kind, protocol.request_uid(req), os.fstat(fds[0]).st_ino if fds else None))
        if self.mode == "silent" and kind == protocol.ADD:
            return
        if self.ack_delay_s:
            time.sleep(self.ack_delay_s)
        err = "rejected by test" if self.mode == "error" and kind == protocol.ADD else ""
        with contextlib.suppress(OSError):
            self.sock.send(protocol.ack(err))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.got]

    def close(self) -> None:
        """Shut down, let the loop thread end, then close: never close a socket under a thread that may be
        about to block on it (it could end up on the fd number's next owner; see zds_server)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._t.join(timeout=10)
        self.sock.close()
