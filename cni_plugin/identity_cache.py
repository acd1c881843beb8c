"""Which Kubernetes pod a container id belongs to, remembered across DEL so that a re-ADD keeps it.

Runtimes built on libcni run DEL then ADD again for the *same* container id: podman on ``network reload``,
``restart`` and ``stop`` + ``start``. The DEL carries the CNI_ARGS cached at the first ADD; the new ADD only
the caller's environment (podman sends ``K8S_POD_NAME=<container name>`` and no namespace). Read alone, that
ADD is "not a Kubernetes pod" and would pass through: an enrolled container out of the mesh for good.

So every ADD that carries a Kubernetes identity (and is not exempt) leaves
``<run_dir>/identities/<container id>`` (dir 0700, file 0600, temp file + rename, JSON
``{"v", "container_id", "namespace", "name", "uid", "infra_container_id", "written_at"}``), and an ADD, CHECK
or DEL of that container id *without* a namespace in CNI_ARGS inherits it. DEL does not remove the entry;
CNI GC removes entries of containers that are not valid attachments any more, and the node agent removes
entries whose pod is gone from its cluster view (``nodeagent/identity_gc.py``).

Fail closed: an entry that exists but cannot be used (not a regular file, too large, not the expected JSON)
is an error for ADD (``IdentityError``), never "no identity"; DEL treats it as no identity. Paths are built
only from a validated container id and checked to stay inside the directory.
"""

from __future__ import annotations

import os
import stat
import time

from cni_plugin import fastjson
from cni_plugin.wire import PodRef

IDENTITIES_DIR = "identities"
FORMAT_VERSION = 1
MAX_ENTRY_BYTES = 4096
_MAX_ID = 255  # one path component (NAME_MAX); runtimes use 64 hex digits
_ID_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_ID_CHARS = _ID_FIRST | frozenset("_.-")
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_UID_CHARS = _ID_FIRST | frozenset("-")


class IdentityError(Exception):
    """An entry exists for the container id but cannot be used."""


def valid_container_id(value: str) -> bool:
    """libcni's rule (``[a-zA-Z0-9][a-zA-Z0-9_.-]*``) and short enough to be one file name."""
    return 0 < len(value) <= _MAX_ID and value[0] in _ID_FIRST and all(c in _ID_CHARS for c in value)


def _dns_label(value: str) -> bool:
    return 0 < len(value) <= 63 and value[0] != "-" and value[-1] != "-" and all(c in _DNS_CHARS for c in value)


def valid_identity(pod: PodRef) -> bool:
    """Kubernetes' shape: namespace a DNS-1123 label, name a DNS-1123 subdomain, uid and infra id plain tokens."""
    name = pod.name
    return (
        _dns_label(pod.namespace)
        and 0 < len(name) <= 253
        and all(_dns_label(part) for part in name.split("."))
        and len(pod.uid) <= 128
        and all(c in _UID_CHARS for c in pod.uid)
        and (not pod.infra_container_id or valid_container_id(pod.infra_container_id))
    )


def directory(run_dir: str) -> str:
    return os.path.join(run_dir, IDENTITIES_DIR)


def entry_path(run_dir: str, container_id: str) -> str | None:
    """``<run_dir>/identities/<container_id>``, or None when the id could leave (or not name) a file there."""
    if not valid_container_id(container_id):
        return None
    parent = directory(run_dir)
    path = os.path.join(parent, container_id)
    if os.path.dirname(path) != parent or os.path.basename(path) != container_id:
        return None
    return path


def remember(run_dir: str, container_id: str, pod: PodRef) -> bool:
    """Record ``pod`` as the identity of ``container_id``. False (nothing written) when it cannot be done."""
    path = entry_path(run_dir, container_id)
    if path is None or not valid_identity(pod) or not os.path.isdir(run_dir):
        return False
    parent = os.path.dirname(path)
    tmp = os.path.join(parent, f".{os.getpid()}-{os.urandom(4).hex()}.tmp")
    body = {
        "v": FORMAT_VERSION,
        "container_id": container_id,
        "namespace": pod.namespace,
        "name": pod.name,
        "uid": pod.uid,
        "infra_container_id": pod.infra_container_id,
        "written_at": time.time(),
    }
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, fastjson.dumps(body).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(f"identity entry {path} is not a regular file")
        if info.st_size > MAX_ENTRY_BYTES:
            raise IdentityError(f"identity entry {path} is larger than {MAX_ENTRY_BYTES} bytes")
        return os.read(fd, MAX_ENTRY_BYTES + 1)
    finally:
        os.close(fd)


def decode(data: bytes, container_id: str, path: str = "") -> PodRef:
    """The identity an entry holds. Raises IdentityError for anything but a well-formed entry of this id."""
    where = path or "identity entry"
    try:
        raw = fastjson.loads(data)
    except (ValueError, RecursionError) as exc:
        raise IdentityError(f"{where} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("v") != FORMAT_VERSION:
        raise IdentityError(f"{where} has an unknown format")
    fields = [raw.get(key) for key in ("container_id", "namespace", "name", "uid", "infra_container_id")]
    if not all(isinstance(value, str) for value in fields):
        raise IdentityError(f"{where} has fields of the wrong type")
    if fields[0] != container_id:
        raise IdentityError(f"{where} belongs to container {fields[0]!r}")
    pod = PodRef(namespace=fields[1], name=fields[2], uid=fields[3], infra_container_id=fields[4])
    if not valid_identity(pod):
        raise IdentityError(f"{where} holds an invalid pod identity")
    return pod


def recall(run_dir: str, container_id: str) -> PodRef | None:
    """The identity remembered for ``container_id``; None when there is no entry (or no usable id).

    Raises IdentityError when an entry exists but cannot be used.
    """
    path = entry_path(run_dir, container_id)
    if path is None:
        return None
    try:
        data = _read(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read identity entry {path}: {exc.strerror or exc}") from None
    return decode(data, container_id, path)


def forget(run_dir: str, container_id: str) -> bool:
    path = entry_path(run_dir, container_id)
    if path is None:
        return False
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


def stored_ids(run_dir: str) -> list[str]:
    """Container ids that have an entry (temp files and foreign names skipped)."""
    try:
        names = os.listdir(directory(run_dir))
    except OSError:
        return []
    return [name for name in names if valid_container_id(name)]


def prune(run_dir: str, valid_container_ids: set[str]) -> int:
    """CNI GC: drop the entries of containers that are not valid attachments. Returns how many went."""
    removed = 0
    for container_id in stored_ids(run_dir):
        if container_id not in valid_container_ids and forget(run_dir, container_id):
            removed += 1
    return removed
