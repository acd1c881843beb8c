"""Who is in the mesh: the one pure rule that the plugin and the agent share.

A pod is enrolled when its namespace has ``istio.io/dataplane-mode=ambient`` and the pod does not carry
``istio.io/dataplane-mode=none``, or when the pod itself carries ``istio.io/dataplane-mode=ambient``.
Never enrolled: hostNetwork pods, pods with the ``sidecar.istio.io/status`` annotation, and the exempt pods:
namespaces in ``exclude_namespaces`` and the agent's own pods (recognised from name and namespace alone).

The exemptions are the agent's: it publishes the ones it applies in the enrollment snapshot, and the plugin
follows them (``cni_plugin.commands``); the plugin's own config stands in only while no snapshot carries any.
"""

from __future__ import annotations

from cni_plugin import defaults
from cni_plugin.frozen import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping
    from typing import Any

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
MODE_AMBIENT = "ambient"
MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"


class PodFacts(Frozen):
    """What the rule needs to know about a pod: PodFacts(name=, namespace=, labels=, annotations=,
    host_network=)."""

    __slots__ = ("name", "namespace", "labels", "annotations", "host_network")
    _defaults = {"labels": dict, "annotations": dict, "host_network": False}
    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool


class Exemptions(Frozen):
    """Pods that are never enrolled, decided from the pod's name and namespace alone."""

    __slots__ = ("exclude_namespaces", "agent_pod_namespace", "agent_pod_name_prefix")
    _defaults = {
        "exclude_namespaces": defaults.EXCLUDE_NAMESPACES,
        "agent_pod_namespace": defaults.AGENT_POD_NAMESPACE,
        "agent_pod_name_prefix": defaults.AGENT_POD_NAME_PREFIX,
    }
    exclude_namespaces: Collection[str]
    agent_pod_namespace: str
    agent_pod_name_prefix: str

    def to_json(self) -> dict[str, Any]:
        return {
            "exclude_namespaces": sorted(self.exclude_namespaces),
            "agent_pod_namespace": self.agent_pod_namespace,
            "agent_pod_name_prefix": self.agent_pod_name_prefix,
        }


def is_agent_pod(name: str, namespace: str, exemptions: Exemptions) -> bool:
    prefix = exemptions.agent_pod_name_prefix
    return bool(prefix) and namespace == exemptions.agent_pod_namespace and name.startswith(prefix)


def exemption_reason(name: str, namespace: str, exemptions: Exemptions) -> str | None:
    """Why a pod is exempt from the mesh by name/namespace alone, or None when it is not."""
    if not name or not namespace:
        return "not a Kubernetes pod (no K8S_POD_NAME/K8S_POD_NAMESPACE)"
    if namespace in exemptions.exclude_namespaces:
        return f"namespace {namespace!r} is excluded"
    if is_agent_pod(name, namespace, exemptions):
        return "the node agent's own pod"
    return None


def namespace_enrolled(namespace_labels: Mapping[str, str] | None) -> bool:
    return bool(namespace_labels) and namespace_labels.get(DATAPLANE_MODE_LABEL) == MODE_AMBIENT  # type: ignore[union-attr]


def is_enrolled(pod: PodFacts, namespace_labels: Mapping[str, str] | None, exemptions: Exemptions) -> bool:
    """The enrollment rule. ``namespace_labels`` is None when the namespace is unknown."""
    if exemption_reason(pod.name, pod.namespace, exemptions) is not None:
        return False
    if pod.host_network or SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return False
    pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == MODE_AMBIENT:
        return True
    if pod_mode == MODE_NONE:
        return False
    return namespace_enrolled(namespace_labels)
