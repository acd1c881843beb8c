"""Enrollment decisions from the agent's view. Pure: uses the shared rule in ``cni_plugin.enrollment``.

Besides "is this pod in the mesh", the decision carries the pod's own redirection controls (its annotations,
read the same way from the file and the Kubernetes view) into the dataplane: ``pod_controls``.
"""

from __future__ import annotations

from collections.abc import Mapping

from cni_plugin import enrollment
from cni_plugin.snapshot import Snapshot
from nodeagent.clusterview.model import ClusterState, Pod
from nodeagent.dataplane.api import DEFAULT_CONTROLS, PodControls
from nodeagent.dataplane.rules import INTERFACE_NAME

DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"
BYPASS_INBOUND_ANNOTATION = "ambient.istio.io/bypass-inbound-capture"
REROUTE_INTERFACES_ANNOTATION = "istio.io/reroute-virtual-interfaces"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"  # set to "enabled" by the agent (Kubernetes view)
# Go's strconv.ParseBool, as Istio reads these annotations; anything else counts as absent.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def facts(pod: Pod) -> enrollment.PodFacts:
    return enrollment.PodFacts(
        name=pod.name,
        namespace=pod.namespace,
        labels=pod.labels,
        annotations=pod.annotations,
        host_network=pod.host_network,
    )


def pod_enrolled(pod: Pod, state: ClusterState, exemptions: enrollment.Exemptions) -> bool:
    return enrollment.is_enrolled(facts(pod), state.namespace_labels(pod.namespace), exemptions)


def unknown_pod_enrolled(
    name: str, namespace: str, state: ClusterState, exemptions: enrollment.Exemptions
) -> bool:
    """Verdict for a pod not (yet) in the view: the namespace rule with empty pod labels."""
    return enrollment.is_enrolled(
        enrollment.PodFacts(name=name, namespace=namespace), state.namespace_labels(namespace), exemptions
    )


def namespace_verdict(name: str, state: ClusterState, exemptions: enrollment.Exemptions) -> bool:
    if name in exemptions.exclude_namespaces:
        return False
    return enrollment.namespace_enrolled(state.namespace_labels(name))


def build_snapshot(
    state: ClusterState, node: str, generation: int, exemptions: enrollment.Exemptions
) -> Snapshot:
    """The enrollment snapshot of ``state``: every namespace's and pod's verdict, and the exemptions applied (the
    plugin follows them)."""
    namespaces = {name: namespace_verdict(name, state, exemptions) for name in sorted(state.namespaces)}
    pods = {f"{pod.namespace}/{pod.name}": pod_enrolled(pod, state, exemptions) for pod in state.pods.values()}
    return Snapshot(node=node, generation=generation, namespaces=namespaces, pods=dict(sorted(pods.items())),
                    exemptions=exemptions)


def parse_bool(value: str | None) -> bool | None:
    if value is None:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def pod_controls(annotations: Mapping[str, str]) -> PodControls:
    """The pod's redirection controls from its annotations.

    ``ambient.istio.io/dns-capture: "true"|"false"`` overrides the agent's DNS default (other values: absent);
    ``ambient.istio.io/bypass-inbound-capture: "true"`` turns inbound capture off;
    ``istio.io/reroute-virtual-interfaces: "a,b"`` sends those interfaces' inbound TCP to the outbound port. A
    name that is not a valid interface name makes ``problem`` say so (nothing of it reaches iptables)."""
    if not any(k in annotations for k in (DNS_CAPTURE_ANNOTATION, BYPASS_INBOUND_ANNOTATION,
                                          REROUTE_INTERFACES_ANNOTATION)):
        return DEFAULT_CONTROLS
    raw = annotations.get(REROUTE_INTERFACES_ANNOTATION, "")
    interfaces = tuple(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    bad = [name for name in interfaces if not INTERFACE_NAME.match(name)]
    problem = (
        f"annotation {REROUTE_INTERFACES_ANNOTATION}: invalid interface name(s) {', '.join(map(repr, bad))}"
        if bad else ""
    )
    return PodControls(
        dns_capture=parse_bool(annotations.get(DNS_CAPTURE_ANNOTATION)),
        bypass_inbound=parse_bool(annotations.get(BYPASS_INBOUND_ANNOTATION)) is True,
        reroute_interfaces=() if bad else interfaces,
        problem=problem,
    )


def controls_of(pod: Pod | None) -> PodControls:
    return DEFAULT_CONTROLS if pod is None else pod_controls(pod.annotations)
