"""CNI_ARGS parsing with libcni's semantics: ``K=V;K=V``; unknown keys refused unless ``IgnoreUnknown``."""

from __future__ import annotations

from cni_plugin import errors
from cni_plugin.wire import PodRef

KNOWN_KEYS = frozenset(
    {"K8S_POD_NAME", "K8S_POD_NAMESPACE", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "IgnoreUnknown"}
)


def parse(raw: str) -> dict[str, str]:
    """Parse CNI_ARGS into a dict. Raises CniError(INVALID_ENV) like libcni's LoadArgs would."""
    pairs: dict[str, str] = {}
    if not raw:
        return pairs
    for item in raw.split(";"):
        parts = item.split("=")
        if len(parts) != 2:
            raise errors.CniError(errors.INVALID_ENV, f"CNI_ARGS: invalid pair {item!r}", "expected K=V;K=V")
        pairs[parts[0]] = parts[1]
    ignore_unknown = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    if not ignore_unknown:
        unknown = sorted(set(pairs) - KNOWN_KEYS)
        if unknown:
            raise errors.CniError(
                errors.INVALID_ENV,
                f"CNI_ARGS: unknown key(s) {', '.join(unknown)}",
                "set IgnoreUnknown=1 to let the plugin ignore keys it does not know",
            )
    return pairs


def pod_ref(pairs: dict[str, str]) -> PodRef:
    return PodRef(
        name=pairs.get("K8S_POD_NAME", ""),
        namespace=pairs.get("K8S_POD_NAMESPACE", ""),
        uid=pairs.get("K8S_POD_UID", ""),
        infra_container_id=pairs.get("K8S_POD_INFRA_CONTAINER_ID", ""),
    )
