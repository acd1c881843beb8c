"""Atomic file replacement: temp file in the same dir, fsync, rename, dir fsync.

Temp names start with a dot and end in ``.ambient-tmp.<random>`` so no runtime ever loads them (libcni matches
the extension exactly) and a restarted installer can sweep the ones a killed predecessor left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

TEMP_MARK = ".ambient-tmp."


def temp_name(directory: str, target_name: str) -> str:
    return os.path.join(directory, f".{target_name}{TEMP_MARK}{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _same_regular_file(path: str, data: bytes, mode: int) -> bool:
    """Whether ``path`` is a regular file holding exactly ``data`` with ``mode``. Opened with O_NONBLOCK and
    checked with fstat before reading at most ``len(data) + 1`` bytes: a FIFO or a device at ``path`` (or
    behind a symlink there) never blocks or floods the comparison."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_mode & 0o7777) != mode or st.st_size != len(data):
            return False
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _create_temp(directory: str, name: str, mode: int) -> tuple[str, int]:
    """A new temp file next to the target (O_EXCL|O_NOFOLLOW: whatever sits at a name is never opened)."""
    attempts = 8
    while True:
        tmp = temp_name(directory, name)
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, mode)
        except FileExistsError:
            attempts -= 1
            if attempts == 0:
                raise


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Replace ``path`` with ``data`` atomically. Returns False (and writes nothing) when already identical
    in content and mode, so watchers of the directory are not woken for nothing. Whatever else sits at
    ``path`` (a FIFO, a device, a symlink) is replaced by the rename, never opened for writing."""
    if _same_regular_file(path, data, mode):
        return False
    directory, name = os.path.split(path)
    tmp, fd = _create_temp(directory or ".", name, mode)
    try:
        os.fchmod(fd, mode)  # umask-independent
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory or ".")
    return True


def remove(path: str) -> bool:
    """Unlink ``path`` and fsync its dir; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(path) or ".")
    return True


def sweep_temps(directory: str) -> list[str]:
    """Remove temp files of ours left by a killed writer; returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if is_temp_name(name):
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.unlink(path)
                removed.append(name)
    return removed
