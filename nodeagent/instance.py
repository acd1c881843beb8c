"""One agent per run dir and per state dir: an exclusive ``flock`` taken before any shared path is touched.

Two agents sharing a run dir break each other in ways that fail open: the second one re-binds the ZDS socket
(ztunnel then talks to an agent that did not enroll the pods) and republishes the enrollment snapshot from its
own view. ``take_locks`` locks ``<dir>/agent.lock`` (``cni_plugin.rundir.lock_path``; created 0600, never through
a symlink, a regular file of ours) with ``LOCK_EX | LOCK_NB``; a second agent gets ``AlreadyRunning`` naming the
holder's pid and must exit without changing anything. The kernel drops the lock when the holder exits, however it
exits, so a crashed agent never leaves a stale lock behind. The lock file itself stays (unlinking lock files
races).

``secure_dir`` forces a directory to 0700 and checks that the agent owns it, whatever existed before (a hostPath
``DirectoryOrCreate`` makes directories 0755).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from cni_plugin import rundir

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


class AlreadyRunning(Exception):
    """Another agent holds the lock (the message names it)."""


class UnsafePath(Exception):
    """A path the agent must own is not usable (the message says why)."""


def secure_dir(path: str, what: str) -> None:
    """Create ``path`` (0700) or force an existing one to 0700; refuse one that is not a directory of ours."""
    os.makedirs(path, mode=PRIVATE_DIR, exist_ok=True)
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{what} {path} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafePath(f"{what} {path} is owned by uid {info.st_uid}, not by the agent (uid {os.getuid()})")
    if stat.S_IMODE(info.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)


def open_private(path: str, flags: int) -> int:
    """Open (creating 0600) a regular file of ours without following a symlink or blocking on a FIFO;
    an existing file's mode is forced to 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, PRIVATE_FILE)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{path} is not a regular file")
        if info.st_uid != os.getuid():
            raise UnsafePath(f"{path} is owned by uid {info.st_uid}, not by the agent (uid {os.getuid()})")
        if stat.S_IMODE(info.st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


class InstanceLock:
    """``<directory>/agent.lock`` held with ``flock(LOCK_EX)`` for the life of the agent."""

    def __init__(self, directory: str, what: str) -> None:
        self.directory = directory
        self.what = what
        self.path = rundir.lock_path(directory)
        self.fd = -1

    def identity(self) -> tuple[int, int]:
        info = os.fstat(self.fd)
        return info.st_dev, info.st_ino

    def acquire(self) -> None:
        """Take the lock or raise AlreadyRunning / UnsafePath / OSError. Writes nothing unless it got the lock."""
        os.makedirs(self.directory, mode=PRIVATE_DIR, exist_ok=True)
        try:
            fd = open_private(self.path, os.O_RDWR)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{self.path} is a symlink; refusing to use it as the agent's lock") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunning(
                f"another node agent ({who}) already runs with {self.what} {self.directory} "
                f"(it holds {self.path}); refusing to start, nothing was changed"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def take_locks(places: list[tuple[str, str]]) -> list[InstanceLock]:
    """Lock every ``(directory, what)`` in order; a directory given twice (same lock file) is locked once.
    On failure the locks already taken are released and the error propagates."""
    held: list[InstanceLock] = []
    seen: set[tuple[int, int]] = set()
    try:
        for directory, what in places:
            lock = InstanceLock(directory, what)
            path_id = _existing_id(lock.path)
            if path_id is not None and path_id in seen:
                continue
            lock.acquire()
            held.append(lock)
            seen.add(lock.identity())
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held


def _existing_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0
