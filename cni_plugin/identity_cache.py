"""Which Kubernetes pod a container id belongs to, remembered across DEL so that a re-ADD keeps it.

Runtimes built on libcni run DEL then ADD again for the *same* container id: podman on ``network reload``,
``restart`` and ``stop`` + ``start``. The DEL carries the CNI_ARGS cached at the first ADD; the new ADD only
the caller's environment (podman sends ``K8S_POD_NAME=<container name>`` and no namespace). Read alone, that
ADD is "not a Kubernetes pod" and would pass through: an enrolled container out of the mesh for good.

So every ADD that carries a Kubernetes identity (and is not exempt) leaves
``<run_dir>/identities/<container id>`` (``cni_plugin.rundir``; dir 0700, file 0600, written with
``cni_plugin.files``, JSON ``{"v", "container_id", "namespace", "name", "uid", "infra_container_id",
"written_at"}``), and an ADD, CHECK
or DEL of that container id *without* a namespace in CNI_ARGS inherits it. DEL does not remove the entry;
CNI GC removes entries of containers that are not valid attachments any more, and the node agent removes
entries whose pod is gone from its cluster view (``nodeagent/identity_gc.py``).

Fail closed: an entry that exists but cannot be used (not a regular file, too large, not the expected JSON)
is an error for ADD (``IdentityError``), never "no identity"; DEL treats it as no identity. Paths are built
only by ``rundir.identity_path`` (a valid container id, one component inside the directory); what an entry holds
must be a pod identity Kubernetes could have produced (``k8snames``).
"""

from __future__ import annotations

import os
import stat
import time

from cni_plugin import fastjson, files, k8snames, rundir
from cni_plugin.wire import PodRef

FORMAT_VERSION = 1
MAX_ENTRY_BYTES = 4096


class IdentityError(Exception):
    """An entry exists for the container id but cannot be used."""


def valid_identity(pod: PodRef) -> bool:
    """Kubernetes' shape (``k8snames``): namespace and name given and valid, uid and infra container id valid when
    given."""
    return (k8snames.is_pod_name_pair(pod.namespace, pod.name)
            and k8snames.pod_problem(pod.namespace, pod.name, pod.uid, pod.infra_container_id) is None)


def remember(run_dir: str, container_id: str, pod: PodRef) -> bool:
    """Record ``pod`` as the identity of ``container_id``. False (nothing written) when it cannot be done."""
    path = rundir.identity_path(run_dir, container_id)
    if path is None or not valid_identity(pod) or not os.path.isdir(run_dir):
        return False
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
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        files.write_atomic(path, fastjson.dumps(body).encode(), 0o600, durable=False)
        return True
    except OSError:
        return False


def _read(path: str) -> bytes:
    info, data = files.read_bounded(path, MAX_ENTRY_BYTES)
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"identity entry {path} is not a regular file")
    if data is None:
        raise IdentityError(f"identity entry {path} is larger than {MAX_ENTRY_BYTES} bytes")
    return data


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
    path = rundir.identity_path(run_dir, container_id)
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
    path = rundir.identity_path(run_dir, container_id)
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
        names = os.listdir(rundir.identities_dir(run_dir))
    except OSError:
        return []
    return [name for name in names if rundir.identity_name(name) is not None]


def prune(run_dir: str, valid_container_ids: set[str]) -> int:
    """CNI GC: drop the entries of containers that are not valid attachments. Returns how many went."""
    removed = 0
    for container_id in stored_ids(run_dir):
        if container_id not in valid_container_ids and forget(run_dir, container_id):
            removed += 1
    return removed
