"""A thread that lives inside one network namespace and creates sockets there on request.

A socket belongs to the netns of the thread that created it, for its whole life: the seed's trick that lets a
host process listen inside a pod. The worker thread joins the netns once (setns(2) via pyroute2) and never runs
anything but socket creation.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from pyroute2 import netns as _pr_netns

T = TypeVar("T")


class NetnsWorker:
    def __init__(self, netns_fd: int, name: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], object], Future[object]] | None] = queue.Queue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(netns_fd,), name=name, daemon=True)
        self._thread.start()
        self._ready.result(timeout=10)

    def _run(self, fd: int) -> None:
        try:
            _pr_netns.setns(fd)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        fut: Future[object] = Future()
        self._jobs.put((fn, fut))
        return fut.result(timeout=timeout)  # type: ignore[return-value]

    def socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        return self.call(lambda: socket.socket(family, kind))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)
