"""Opening and entering pod network namespaces safely.

``open_netns`` refuses anything that is not a network namespace, and the agent's own or the host's network
namespace (same device and inode as ``/proc/self/ns/net``, ``/proc/thread-self/ns/net`` or ``/proc/1/ns/net``),
so no request can make the agent rewrite the node's own rules.

``run_in_netns`` runs a function in a fresh, dedicated thread that joins the target netns with ``setns(2)``
(pyroute2's helper: Python 3.11 has no ``os.setns``) and then exits; the agent's other threads never move.
Subprocesses started from that thread inherit its netns (verified by ``tests/test_dataplane_netns.py``), so
``iptables-restore`` runs there without an extra ``nsenter`` exec.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
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
        forbidden = forbidden_namespaces()
        if extra_forbidden:
            forbidden.update(extra_forbidden)
        what = forbidden.get(NsId(st.st_dev, st.st_ino))
        if what is not None:
            raise NetnsError(f"refusing {path}: it is {what}, not a pod's")
        return NetnsHandle(path=path, fd=fd, inode=st.st_ino)
    except BaseException:
        os.close(fd)
        raise


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
