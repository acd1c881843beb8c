"""The enrollment snapshot the agent publishes in its run dir and the plugin reads on every ADD.

Format (one JSON object, atomically replaced; JSON because the plugin parses it with CPython's C scanner
without importing msgpack, whose import costs ~5 ms of every pod start):
``{"v": 1, "node": str, "generation": int, "written_at": float, "namespaces": {name: bool},
"pods": {"namespace/name": bool}}``. ``namespaces`` holds each namespace's
verdict; ``pods`` holds the verdict of every pod the agent knows on this node (pod-level opt-ins and
opt-outs, hostNetwork and sidecar pods included).
"""

from __future__ import annotations

from cni_plugin.record import Record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SNAPSHOT_NAME = "enrollment.json"
SNAPSHOT_VERSION = 1


class Verdict:
    """What the snapshot says about one pod (string constants: cheap to import, easy to log)."""

    ENROLLED = "enrolled"
    NOT_ENROLLED = "not-enrolled"
    UNKNOWN_POD = "unknown-pod"  # namespace not enrolled and the pod not (yet) in the agent's view


class SnapshotError(Exception):
    pass


class Snapshot(Record):
    __slots__ = ("node", "generation", "namespaces", "pods")
    node: str
    generation: int
    namespaces: dict[str, bool]
    pods: dict[str, bool]

    def to_wire(self, written_at: float) -> dict[str, Any]:
        return {
            "v": SNAPSHOT_VERSION,
            "node": self.node,
            "generation": self.generation,
            "written_at": written_at,
            "namespaces": self.namespaces,
            "pods": self.pods,
        }

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


def decode(data: bytes) -> Snapshot:
    from cni_plugin import fastjson

    try:
        raw = fastjson.loads(data)
    except ValueError as exc:
        raise SnapshotError(f"corrupt snapshot: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("v") != SNAPSHOT_VERSION:
        raise SnapshotError("snapshot has an unknown format version")
    namespaces, pods = raw.get("namespaces"), raw.get("pods")
    if not isinstance(namespaces, dict) or not isinstance(pods, dict):
        raise SnapshotError("snapshot lacks its namespaces/pods maps")
    return Snapshot(
        node=str(raw.get("node", "")),
        generation=int(raw.get("generation", 0)),
        namespaces=namespaces,
        pods=pods,
    )


def read(path: str) -> Snapshot:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise SnapshotError(f"cannot read enrollment snapshot {path}: {exc.strerror or exc}") from exc
    return decode(data)
