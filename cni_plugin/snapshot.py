"""The enrollment snapshot the agent publishes as ``<run_dir>/enrollment.json`` (``cni_plugin.rundir``) and the plugin
reads on every ADD.

Format (one JSON object, atomically replaced; JSON because the plugin parses it with CPython's C scanner
without importing msgpack, whose import costs ~5 ms of every pod start):
``{"v": 1, "node": str, "generation": int, "written_at": float, "namespaces": {name: bool},
"pods": {"namespace/name": bool}, "exemptions": {"exclude_namespaces": [str], "agent_pod_namespace": str,
"agent_pod_name_prefix": str}}``. ``namespaces`` holds each namespace's verdict; ``pods`` holds the verdict of
every pod the agent knows on this node (pod-level opt-ins and opt-outs, hostNetwork and sidecar pods included);
``exemptions`` are the exemptions the agent applies (``--exclude-namespaces``, ``--agent-pod-namespace``,
``--agent-pod-name-prefix``), which the plugin follows instead of its own config. A snapshot without
``exemptions`` (written by an older agent) is valid: the plugin then falls back to its config.

Reading it is bounded and never blocks (``cni_plugin.files.read_bounded``: a symlink or a FIFO is refused at once)
and the file must be a regular file owned by root and not writable by group or others,
at most ``MAX_SNAPSHOT_BYTES``; every field must have its type. Anything else is SnapshotError ("unknown"):
the plugin then fails closed for pods that may be enrolled (CNI code 11).
"""

from __future__ import annotations

import errno
import stat

from cni_plugin.enrollment import Exemptions
from cni_plugin.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SNAPSHOT_VERSION = 1
# Measured: a node with 5,000 pods in a cluster with 1,000 namespaces (realistic generated names) publishes
# 347 KiB; 5,000 pods whose names all have the maximum length (63 + 253 characters) 1.6 MB. The cap is ~12x the
# realistic size; parsing a snapshot that large costs ~25 ms and ~8 MiB.
MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024
OWNER_UID = 0  # the agent runs as root; a snapshot anyone else could have written is not the agent's
_BOOL = {bool}


class Verdict:
    """What the snapshot says about one pod (string constants: cheap to import, easy to log)."""

    ENROLLED = "enrolled"
    NOT_ENROLLED = "not-enrolled"
    UNKNOWN_POD = "unknown-pod"  # namespace not enrolled and the pod not (yet) in the agent's view


class SnapshotError(Exception):
    pass


class Snapshot(Frozen):
    __slots__ = ("node", "generation", "namespaces", "pods", "exemptions")
    _defaults = {"exemptions": None}
    node: str
    generation: int
    namespaces: dict[str, bool]
    pods: dict[str, bool]
    exemptions: Exemptions | None  # None: an agent that did not publish its exemptions

    def to_wire(self, written_at: float) -> dict[str, Any]:
        message: dict[str, Any] = {
            "v": SNAPSHOT_VERSION,
            "node": self.node,
            "generation": self.generation,
            "written_at": written_at,
            "namespaces": self.namespaces,
            "pods": self.pods,
        }
        if self.exemptions is not None:
            message["exemptions"] = self.exemptions.to_json()
        return message

    def verdict(self, namespace: str, name: str) -> str:
        pod_verdict = self.pods.get(f"{namespace}/{name}")
        if pod_verdict is not None:
            return Verdict.ENROLLED if pod_verdict else Verdict.NOT_ENROLLED
        if self.namespaces.get(namespace, False):
            return Verdict.ENROLLED
        return Verdict.UNKNOWN_POD


def encode(snapshot: Snapshot, written_at: float) -> bytes:
    from cni_plugin import fastjson

    return fastjson.dumps(snapshot.to_wire(written_at)).encode()


def _bool_map(value: object) -> bool:
    return isinstance(value, dict) and set(map(type, value.values())) <= _BOOL


def _exemptions(raw: object) -> Exemptions | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SnapshotError("snapshot exemptions are not a map")
    namespaces = raw.get("exclude_namespaces")
    agent_namespace, agent_prefix = raw.get("agent_pod_namespace"), raw.get("agent_pod_name_prefix")
    if (not isinstance(namespaces, list) or not all(isinstance(n, str) for n in namespaces)
            or not isinstance(agent_namespace, str) or not isinstance(agent_prefix, str)):
        raise SnapshotError("snapshot exemptions have missing fields or wrong types")
    return Exemptions(exclude_namespaces=frozenset(namespaces), agent_pod_namespace=agent_namespace,
                      agent_pod_name_prefix=agent_prefix)


def decode(data: bytes) -> Snapshot:
    """The snapshot in ``data``; SnapshotError for anything that is not exactly the format above."""
    from cni_plugin import fastjson

    try:
        raw = fastjson.loads(data)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the recursion limit
        raise SnapshotError(f"corrupt snapshot: {exc}") from exc
    if not isinstance(raw, dict) or type(raw.get("v")) is not int or raw["v"] != SNAPSHOT_VERSION:
        raise SnapshotError("snapshot has an unknown format version")
    node, generation, written_at = raw.get("node"), raw.get("generation"), raw.get("written_at")
    if not isinstance(node, str) or type(generation) is not int or type(written_at) not in (int, float):
        raise SnapshotError("snapshot fields node/generation/written_at are missing or have wrong types")
    namespaces, pods = raw.get("namespaces"), raw.get("pods")
    if not _bool_map(namespaces) or not _bool_map(pods):
        raise SnapshotError("snapshot namespaces/pods are not maps of booleans")
    exemptions = _exemptions(raw.get("exemptions"))
    return Snapshot(node=node, generation=generation, namespaces=namespaces, pods=pods, exemptions=exemptions)


def _read_bounded(path: str) -> bytes:
    from cni_plugin import files

    try:
        info, data = files.read_bounded(path, MAX_SNAPSHOT_BYTES)
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise SnapshotError(f"cannot read enrollment snapshot {path}: {reason}") from exc
    except ValueError as exc:  # an unusable path string
        raise SnapshotError(f"cannot read enrollment snapshot {path!r}: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise SnapshotError(f"enrollment snapshot {path} is not a regular file")
    if info.st_uid != OWNER_UID:
        raise SnapshotError(f"enrollment snapshot {path} is owned by uid {info.st_uid}, not root")
    if info.st_mode & 0o022:
        raise SnapshotError(f"enrollment snapshot {path} is writable by group or others")
    if info.st_size > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(
            f"enrollment snapshot {path} is {info.st_size} bytes, over the {MAX_SNAPSHOT_BYTES}-byte limit"
        )
    if data is None:
        raise SnapshotError(f"enrollment snapshot {path} grew over the {MAX_SNAPSHOT_BYTES}-byte limit")
    return data


def read(path: str) -> Snapshot:
    """The snapshot at ``path`` (see the module docstring); SnapshotError naming ``path`` otherwise."""
    data = _read_bounded(path)
    try:
        return decode(data)
    except SnapshotError as exc:
        raise SnapshotError(f"{path}: {exc}") from exc
