"""``AcceptLoop``: the one accept loop of the agent's servers (the plugin socket, ``nodeagent.server``; the ZDS
socket, ``nodeagent.dataplane.zds_server``): a thread that hands every accepted connection to its server until
stopped."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable


class AcceptLoop:
    """Accepts on ``listener`` (listening already) in a thread named ``name`` and calls ``handle(conn)`` for each
    connection, in that thread: ``handle`` must not block (it queues or starts the work). A failed accept (e.g.
    out of file descriptors) is retried after ``retry_s``."""

    def __init__(self, listener: socket.socket, handle: Callable[[socket.socket], None], name: str,
                 retry_s: float) -> None:
        self.listener = listener
        self._handle = handle
        self._retry_s = retry_s
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting and close the listener. The thread is joined before the close: a thread about to block
        on a socket closed under it can end up on the reused fd number of the next socket (CPython reads the
        number after releasing the GIL)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.listener.close()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(self._retry_s)
                continue
            self._handle(conn)
