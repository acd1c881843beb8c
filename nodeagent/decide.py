"""Enrollment decisions from the agent's view. Pure: uses the shared rule in ``cni_plugin.enrollment``."""

from __future__ import annotations

from cni_plugin import enrollment
from cni_plugin.snapshot import Snapshot
from nodeagent.clusterview.model import ClusterState, Pod


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
    namespaces = {name: namespace_verdict(name, state, exemptions) for name in sorted(state.namespaces)}
    pods = {f"{pod.namespace}/{pod.name}": pod_enrolled(pod, state, exemptions) for pod in state.pods.values()}
    return Snapshot(node=node, generation=generation, namespaces=namespaces, pods=dict(sorted(pods.items())))
