"""Netns hints: where each Kubernetes pod's netns is, for the agent, written without contacting it.

A pod that was not enrolled at ADD time may become enrolled later (its namespace gets labelled). The
agent then needs its netns without a CNI event; the plugin leaves ``<run_dir>/pods/<namespace>_<name>``
(JSON: netns, container_id, ifname, uid, ips, written_at) on every ADD and removes it on DEL. Best
effort: a missing run dir or a failed write never affects the operation.

This module is the format's only writer and only reader (the plugin, the agent's netns finder and
``ambient-cni doctor`` all use it). Confinement:

- the file name is ``cni_plugin.rundir.hint_name``: ``<namespace>_<name>`` of a pair that passed ``k8snames``
  (one path component, never ``.``/``..``, never shared by two pods); anything else is never looked up;
- every operation is relative to a descriptor of ``<run_dir>/pods`` opened with ``O_NOFOLLOW|O_DIRECTORY``
  (a symlink there is refused), so no name can reach outside that directory;
- files are written with ``cni_plugin.files`` (temp file and rename) and read with ``files.read_bounded``
  (no symlink followed, no FIFO waited on, at most ``MAX_HINT_BYTES``), and every field is type-checked.
  Anything else is "unusable": None, never an exception. DEL and GC remove unusable entries (not directories).
"""

from __future__ import annotations

import os
import time

from cni_plugin import fastjson, files, k8snames, rundir
from cni_plugin.frozen import Frozen

MAX_HINT_BYTES = 16 * 1024  # a hint is ~300 bytes (dual-stack, long names); anything larger is not ours
STALE_TEMP_S = 600.0  # GC removes temp files of writers killed mid-write after this long
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Hint(Frozen):
    """One pod's hint. ``written_at`` is stamped by ``write``."""

    __slots__ = ("netns", "container_id", "ifname", "uid", "ips", "written_at")
    _defaults = {"container_id": "", "ifname": "eth0", "uid": "", "ips": (), "written_at": 0.0}
    netns: str
    container_id: str
    ifname: str
    uid: str
    ips: tuple[str, ...]
    written_at: float

    def to_json(self, written_at: float) -> bytes:
        return fastjson.dumps({
            "netns": self.netns, "container_id": self.container_id, "ifname": self.ifname, "uid": self.uid,
            "ips": list(self.ips), "written_at": written_at,
        }).encode()


# -- pure ------------------------------------------------------------------------------------------
def _text(value: object) -> bool:
    """A string every os call and encoder accepts (UTF-8, no NUL)."""
    return isinstance(value, str) and k8snames.is_text(value) and "\x00" not in value


def parse(data: bytes | str) -> Hint | None:
    """A hint from file content, or None when it is not one (any content: never raises)."""
    try:
        raw = fastjson.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the recursion limit
        return None
    if not isinstance(raw, dict):
        return None
    netns = raw.get("netns")
    container_id = raw.get("container_id", "")
    ifname = raw.get("ifname", "eth0")
    uid = raw.get("uid", "")
    ips = raw.get("ips", [])
    written_at = raw.get("written_at", 0.0)
    if not _text(netns) or not netns or not _text(container_id) or not _text(ifname) or not _text(uid):
        return None
    if uid and not k8snames.is_uid(uid):
        return None
    if not isinstance(ips, list) or not all(_text(ip) for ip in ips):
        return None
    if type(written_at) not in (int, float):
        return None
    return Hint(netns=netns, container_id=container_id, ifname=ifname or "eth0", uid=uid, ips=tuple(ips),
                written_at=float(written_at))


# -- effects ---------------------------------------------------------------------------------------
def _open_dir(run_dir: str, create: bool = False) -> int | None:
    directory = rundir.hints_dir(run_dir)
    try:
        return os.open(directory, _DIR_FLAGS)
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError):  # a symlink (ELOOP), not a directory, or an unencodable run_dir
        return None
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    try:
        return os.open(directory, _DIR_FLAGS)
    except OSError:
        return None


def _load(dir_fd: int, entry: str) -> Hint | None:
    try:
        _, data = files.read_bounded(entry, MAX_HINT_BYTES, dir_fd=dir_fd)
    except OSError:
        return None
    return None if data is None else parse(data)


def _unlink(dir_fd: int, entry: str) -> bool:
    try:
        os.unlink(entry, dir_fd=dir_fd)
        return True
    except OSError:  # gone already, or a directory (EISDIR): left alone
        return False


def read(run_dir: str, namespace: str, name: str) -> Hint | None:
    """The pod's hint, or None (no hint, an invalid pair, or unusable content)."""
    entry = rundir.hint_name(namespace, name)
    if entry is None:
        return None
    dir_fd = _open_dir(run_dir)
    if dir_fd is None:
        return None
    try:
        return _load(dir_fd, entry)
    finally:
        os.close(dir_fd)


def write(run_dir: str, namespace: str, name: str, hint: Hint) -> bool:
    """Write (atomically replace) the pod's hint. Never creates the run dir; False when not written."""
    entry = rundir.hint_name(namespace, name)
    if entry is None or not os.path.isdir(run_dir):
        return False
    dir_fd = _open_dir(run_dir, create=True)
    if dir_fd is None:
        return False
    try:
        files.write_at(dir_fd, entry, hint.to_json(time.time()), 0o600, durable=False)
        return True
    except OSError:
        return False
    finally:
        os.close(dir_fd)


def remove(run_dir: str, namespace: str, name: str, container_id: str) -> None:
    """Remove the pod's hint unless it belongs to another sandbox (a newer one keeps its own).

    An unusable entry under the pod's name is removed too."""
    entry = rundir.hint_name(namespace, name)
    if entry is None:
        return
    dir_fd = _open_dir(run_dir)
    if dir_fd is None:
        return
    try:
        current = _load(dir_fd, entry)
        if current is not None and container_id and current.container_id not in (container_id, ""):
            return
        _unlink(dir_fd, entry)
    finally:
        os.close(dir_fd)


def _stale_temp(dir_fd: int, entry: str, now: float) -> bool:
    if not files.is_temp_name(entry):
        return False
    try:
        return now - os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mtime > STALE_TEMP_S
    except OSError:
        return False


def prune(run_dir: str, valid_container_ids: set[str]) -> int:
    """GC: drop hints whose sandbox is not a valid attachment any more, unusable hints and stale temp files.

    Entries that are neither hints nor our temp files are left alone. Returns how many hints were removed."""
    dir_fd = _open_dir(run_dir)
    if dir_fd is None:
        return 0
    removed = 0
    now = time.time()
    try:
        for entry in os.listdir(dir_fd):
            if rundir.is_hint_name(entry):
                hint = _load(dir_fd, entry)
                if hint is not None and hint.container_id in valid_container_ids:
                    continue
                removed += _unlink(dir_fd, entry)
            elif _stale_temp(dir_fd, entry, now):
                _unlink(dir_fd, entry)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return removed
