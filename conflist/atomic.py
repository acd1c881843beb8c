"""Atomic file replacement: temp file in the same dir, fsync, rename, dir fsync.

Temp names start with a dot and end in ``.ambient-tmp.<random>`` so no runtime ever loads them (libcni matches
the extension exactly) and a restarted installer can sweep the ones a killed predecessor left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets

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


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> bool:
    """Replace ``path`` with ``data`` atomically. Returns False (and writes nothing) when already identical
    in content and mode, so watchers of the directory are not woken for nothing."""
    try:
        st = os.stat(path)
        if (st.st_mode & 0o7777) == mode and read_bytes(path) == data:
            return False
    except FileNotFoundError:
        pass
    directory, name = os.path.split(path)
    tmp = temp_name(directory or ".", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
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
