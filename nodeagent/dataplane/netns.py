"""Opening and entering pod network namespaces safely.

``open_netns`` refuses anything that is not a network namespace, and the agent's own or the host's network
namespace (same device and inode as ``/proc/self/ns/net``, ``/proc/thread-self/ns/net`` or ``/proc/1/ns/net``),
so no request can make the agent rewrite the node's own rules.

``run_in_netns`` runs a function in a fresh, dedicated thread that joins the target netns with ``setns(2)``
(pyroute2's helper: Python 3.11 has no ``os.setns``) and then exits; the agent's other threads never move.
Subprocesses started from that thread inherit its netns (verified by ``tests/test_dataplane_netns.py``), so
``iptables-restore`` runs there without an extra ``nsenter`` exec.

``NetnsWorker`` is the long-lived kind: one thread that joins a netns once and then runs jobs there, one at a
time (the node netns of the host-side probe path; the ZDS peer's pod netns). ``open_any_netns`` is the check
it starts from: a network namespace, any one (the node's own is the point there).
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import socket
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from pyroute2 import netns as _pr_netns

NS_GET_NSTYPE = 0xB703  # ioctl(2) on a namespace fd, Linux >= 4.11
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetnsError(Exception):
    """The path cannot be used as a pod network namespace (the message says why)."""


@dataclass(frozen=True)
class NsId:
    dev: int
    ino: int


def ns_id_of_path(path: str) -> NsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return NsId(st.st_dev, st.st_ino)


def forbidden_namespaces() -> dict[NsId, str]:
    """The namespaces no request may name: ours (process and thread) and the host's (pid 1)."""
    out: dict[NsId, str] = {}
    for path, what in (
        ("/proc/1/ns/net", "the host's network namespace (pid 1)"),
        ("/proc/self/ns/net", "the agent's own network namespace"),
        ("/proc/thread-self/ns/net", "the agent's own network namespace"),
    ):
        ident = ns_id_of_path(path)
        if ident is not None:
            out.setdefault(ident, what)
    return out


@dataclass
class NetnsHandle:
    """An open pod netns. Close it (or hand the fd on) when done."""

    path: str
    fd: int
    inode: int
    dev: int = 0

    @property
    def ns_id(self) -> NsId:
        return NsId(self.dev, self.inode)

    def matches(self, inode: int, dev: int = 0) -> bool:
        """Whether this is the netns recorded as (inode, device); a device of 0 (not recorded) is not compared."""
        return self.inode == inode and (not dev or self.dev == dev)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetnsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_netns(path: str, extra_forbidden: dict[NsId, str] | None = None) -> NetnsHandle:
    """Open ``path`` as a pod network namespace or raise NetnsError (nothing changed)."""
    handle = open_any_netns(path)
    forbidden = forbidden_namespaces()
    if extra_forbidden:
        forbidden.update(extra_forbidden)
    what = forbidden.get(handle.ns_id)
    if what is not None:
        handle.close()
        raise NetnsError(f"refusing {path}: it is {what}, not a pod's")
    return handle


def open_any_netns(path: str) -> NetnsHandle:
    """Open ``path`` if it is a network namespace (any, the host's included) or raise NetnsError."""
    if not path:
        raise NetnsError("no network namespace path given")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NetnsError(f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise NetnsError(f"{path} is a directory, not a network namespace")
        try:
            nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EINVAL):
                raise NetnsError(f"{path} is not a namespace file") from None
            raise NetnsError(f"cannot inspect {path}: {exc.strerror}") from None
        if nstype != CLONE_NEWNET:
            raise NetnsError(f"{path} is a namespace but not a network namespace")
        return NetnsHandle(path=path, fd=fd, inode=st.st_ino, dev=st.st_dev)
    except BaseException:
        os.close(fd)
        raise


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
            _pr_netns.setns(fd)
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
