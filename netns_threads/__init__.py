"""Threads inside a network namespace: how the agent, the ZDS peer and the test harness run code in a pod's (or
the node's) netns without moving the process.

A socket belongs to the netns of the thread that created it, for its whole life, and a subprocess inherits its
thread's netns: so a thread that joined a netns with ``setns(2)`` (pyroute2's helper: Python 3.11 has no
``os.setns``) creates sockets, netlink sockets and ``iptables-restore`` children there, without an ``nsenter``
exec (verified by ``tests/test_dataplane_netns.py``).

- ``run_in_netns``: one function in a fresh, dedicated thread that joins the netns and then exits; the caller's
  other threads never move and no other work ever runs in that netns.
- ``enter``: move the calling thread, for threads that end afterwards (the reconciler's verification thread).
- ``NetnsWorker``: the long-lived kind, one thread that joins a netns once and then runs jobs there, one at a
  time (the node netns of the agent's probe path; the ZDS peer's listeners in a pod netns).

Which netns may be entered is the caller's decision (the agent checks with ``nodeagent.dataplane.netns``).
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


def enter(fd: int) -> None:
    """Move the calling thread into the netns ``fd``. Only for threads that end afterwards (``run_in_netns``
    and the reconciler's verification thread): no other work may run in a pod netns."""
    _pr_netns.setns(fd)


def run_in_netns(fd: int, fn: Callable[[], T], name: str = "netns-worker") -> T:
    """Run ``fn`` in a dedicated thread inside the netns ``fd``; return its result or re-raise its error.

    The thread exits afterwards (it never returns to a pool), so no other work ever runs in a pod netns.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            enter(fd)
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=body, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


class NetnsWorker:
    """One thread that joins the netns ``netns_fd`` once and then runs submitted jobs there, one at a time.

    Sockets (netlink ones included) belong to the netns of the thread that created them, and subprocesses
    inherit it, so everything a job creates lives in that netns. The caller may close ``netns_fd`` once the
    constructor returned."""

    def __init__(self, netns_fd: int, name: str) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], object], Future[object]] | None] = queue.Queue()
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(netns_fd,), name=name, daemon=True)
        self._thread.start()
        self._ready.result(timeout=10)

    def _run(self, fd: int) -> None:
        try:
            enter(fd)
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
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
