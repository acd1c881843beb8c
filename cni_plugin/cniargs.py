"""CNI_ARGS parsing with libcni's semantics: ``K=V;K=V``; unknown keys refused unless ``IgnoreUnknown``.

The pod identity in it is checked as Kubernetes checks it (``cni_plugin.k8snames``) before anything uses it.
"""

from __future__ import annotations

from cni_plugin import errors, k8snames
from cni_plugin.wire import PodRef

KNOWN_KEYS = frozenset(
    {
        k8snames.NAME_KEY,
        k8snames.NAMESPACE_KEY,
        k8snames.INFRA_CONTAINER_ID_KEY,
        k8snames.UID_KEY,
        "IgnoreUnknown",
    }
)


def parse(raw: str) -> dict[str, str]:
    """Parse CNI_ARGS into a dict. Raises CniError(INVALID_ENV) like libcni's LoadArgs would."""
    pairs: dict[str, str] = {}
    if not raw:
        return pairs
    for item in raw.split(";"):
        parts = item.split("=")
        if len(parts) != 2:
            raise errors.CniError(
                errors.INVALID_ENV, f"CNI_ARGS: invalid pair {k8snames.shown(item)}", "expected K=V;K=V"
            )
        pairs[parts[0]] = parts[1]
    ignore_unknown = pairs.get("IgnoreUnknown", "").lower() in ("1", "true")
    if not ignore_unknown:
        unknown = sorted(set(pairs) - KNOWN_KEYS)
        if unknown:
            raise errors.CniError(
                errors.INVALID_ENV,
                f"CNI_ARGS: unknown key(s) {', '.join(k8snames.shown(key) for key in unknown)}",
                "set IgnoreUnknown=1 to let the plugin ignore keys it does not know",
            )
    return pairs


def pod_ref(pairs: dict[str, str]) -> PodRef:
    """The pod named in CNI_ARGS. Raises CniError(INVALID_ENV) naming the first value Kubernetes would not
    have produced (see ``k8snames``); absent values are empty. Without a namespace it is not a Kubernetes pod
    and nothing is validated (or kept, but a loggable name)."""
    pod = PodRef(
        name=pairs.get(k8snames.NAME_KEY, ""),
        namespace=pairs.get(k8snames.NAMESPACE_KEY, ""),
        uid=pairs.get(k8snames.UID_KEY, ""),
        infra_container_id=pairs.get(k8snames.INFRA_CONTAINER_ID_KEY, ""),
    )
    if not pod.namespace:
        # Not a Kubernetes pod: without a namespace the other keys are the runtime's own words (podman sends its
        # container name, which may hold "_" or capitals, as K8S_POD_NAME). Nothing is built from them; keep
        # only a name that is safe to log, so a plain container is never refused for its name.
        return PodRef(name=pod.name if k8snames.is_dns1123_subdomain(pod.name) else "")
    problem = k8snames.pod_problem(pod.namespace, pod.name, pod.uid, pod.infra_container_id)
    if problem is not None:
        key, message = problem
        raise errors.CniError(
            errors.INVALID_ENV, f"CNI_ARGS: {message}", f"no Kubernetes pod can have this {key}; nothing was done"
        )
    return pod
