"""The one way the parts write and read their small shared files: replaced atomically, read bounded.

Writers: the installer (conflists, backups, its readiness file, the bundle's directory syncs), the agent's
enrollment snapshot, the plugin's netns hints and identity cache. Readers: the snapshot, the hints and the
identity cache (``read_bounded``).

A write goes to a temp file in the target's own directory, ``.<name>.ambient-tmp.<random>``, created with
``O_CREAT|O_EXCL|O_NOFOLLOW`` (whatever sits at a name is never opened, a symlink never followed), written in
full, then renamed over the target: a reader sees the old content or the new, never a part. ``durable`` adds an
``fsync`` of the file before the rename and of the directory after it, for files that must survive a power loss
(the conflists, the snapshot); the plugin's run-dir files (hints, identities) skip both: they describe pods that a
reboot ends, and a crash of the writer leaves the page cache intact. A failed write removes its temp file; the
temp files of a writer killed mid-write are recognised by ``is_temp_name`` (no runtime loads them: libcni matches
the extension exactly) and removed by ``sweep_temps``.

Stdlib only, no ``secrets`` or ``contextlib``: the plugin imports it on every exec.
"""

from __future__ import annotations

import os
import stat
import time

TEMP_MARK = ".ambient-tmp."
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_ATTEMPTS = 8


def temp_name(target_name: str) -> str:
    return f".{target_name}{TEMP_MARK}{os.urandom(4).hex()}"


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


# -- writing -----------------------------------------------------------------------------------------------
def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> None:
    """Replace ``name`` in the open directory ``dir_fd`` with ``data`` (mode ``mode``, whatever the umask).
    Raises OSError; nothing of this call stays behind then."""
    tmp, fd = _create_temp(dir_fd, name, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, *, durable: bool = True) -> bool:
    """Replace ``path`` with ``data`` (see the module doc). Returns False, writing nothing, when ``path`` already
    is a regular file with exactly this content and mode, so watchers of the directory are not woken for nothing.
    Whatever else sits at ``path`` (a FIFO, a device, a symlink) is replaced by the rename, never written
    through. Raises OSError."""
    if _same_regular_file(path, data, mode):
        return False
    directory, name = os.path.split(path)
    dir_fd = os.open(directory or ".", _DIR_FLAGS)
    try:
        write_at(dir_fd, name, data, mode, durable=durable)
    finally:
        os.close(dir_fd)
    return True


def remove(path: str, *, durable: bool = True) -> bool:
    """Unlink ``path`` (and fsync its directory when ``durable``); False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if durable:
        fsync_dir(os.path.dirname(path) or ".")
    return True


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep_temps(directory: str, older_than_s: float = 0.0) -> list[str]:
    """Remove the temp files a killed writer left in ``directory`` (only those last changed more than
    ``older_than_s`` ago, when given: a live writer's temp is young). Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        if not is_temp_name(name):
            continue
        path = os.path.join(directory, name)
        try:
            if older_than_s and now - os.lstat(path).st_mtime <= older_than_s:
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:  # gone already, or a directory: left alone
            continue
    return removed


def _create_temp(dir_fd: int, name: str, mode: int) -> tuple[str, int]:
    attempts = _TEMP_ATTEMPTS
    while True:
        tmp = temp_name(name)
        try:
            return tmp, os.open(tmp, _CREATE_FLAGS, mode, dir_fd=dir_fd)
        except FileExistsError:
            attempts -= 1
            if attempts == 0:
                raise


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
        return _read_up_to(fd, len(data) + 1) == data
    except OSError:
        return False
    finally:
        os.close(fd)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


# -- reading -----------------------------------------------------------------------------------------------
def read_bounded(path: str, limit: int, dir_fd: int | None = None) -> tuple[os.stat_result, bytes | None]:
    """(what ``path`` is, its content) for a file of at most ``limit`` bytes. Opened with
    ``O_NOFOLLOW|O_NONBLOCK`` (a symlink fails with ELOOP, a FIFO never blocks); the content is None when it is not
    a regular file or holds more than ``limit`` bytes (also when it grew while being read). OSError for what
    cannot be opened or read; the caller says what the file is and why it is refused."""
    fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return info, None
        data = _read_up_to(fd, limit + 1)
    finally:
        os.close(fd)
    return info, (data if len(data) <= limit else None)


def read_bytes(path: str) -> bytes | None:
    """The content of the file at ``path`` (symlinks followed), or None when there is none."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _read_up_to(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
