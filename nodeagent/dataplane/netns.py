"""Opening pod network namespaces safely (entering one is ``netns_threads``' job).

``open_netns`` refuses anything that is not a network namespace, and the agent's own or the host's network
namespace (same device and inode as ``/proc/self/ns/net``, ``/proc/thread-self/ns/net`` or ``/proc/1/ns/net``),
so no request can make the agent rewrite the node's own rules. ``open_any_netns`` is the check it starts from: a
network namespace, any one (the node's own is the point of the host-side probe path, ``hostprobe``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

NS_GET_NSTYPE = 0xB703  # ioctl(2) on a namespace fd, Linux >= 4.11
CLONE_NEWNET = 0x40000000


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
