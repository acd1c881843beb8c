"""Does a DaemonSet's pod template still target a node? Pure: Kubernetes objects as parsed JSON.

What is evaluated is what decides placement for a DaemonSet: ``spec.template.spec.nodeSelector`` (every
key/value must be among the node's labels) and the required node affinity
(``requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms``: the terms are ORed; inside a term the
``matchExpressions`` on labels and ``matchFields`` on ``metadata.name`` are ANDed; an empty term list or an empty
term matches nothing). Operators: In, NotIn, Exists, DoesNotExist, Gt, Lt, as in the Kubernetes scheduler.
Taints are not evaluated: the shipped DaemonSet tolerates every taint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Obj = Mapping[str, Any]


def _dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def requirement_matches(requirement: Obj, values_by_key: Mapping[str, str]) -> bool:
    """One NodeSelectorRequirement against a label (or field) map."""
    key = requirement.get("key")
    operator = requirement.get("operator")
    values = [str(v) for v in requirement.get("values") or []]
    present = isinstance(key, str) and key in values_by_key
    value = values_by_key.get(key) if isinstance(key, str) else None
    if operator == "In":
        return present and value in values
    if operator == "NotIn":
        return not present or value not in values
    if operator == "Exists":
        return present
    if operator == "DoesNotExist":
        return not present
    if operator in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        try:
            have, want = int(str(value)), int(values[0])
        except ValueError:
            return False
        return have > want if operator == "Gt" else have < want
    return False  # an unknown operator never matches (the API server rejects it anyway)


def term_matches(term: Obj, labels: Mapping[str, str], fields: Mapping[str, str]) -> bool:
    expressions = term.get("matchExpressions") or []
    field_reqs = term.get("matchFields") or []
    if not expressions and not field_reqs:
        return False
    return all(requirement_matches(r, labels) for r in expressions) and all(
        requirement_matches(r, fields) for r in field_reqs
    )


def targets_node(daemonset: Obj, node: Obj) -> tuple[bool, str]:
    """(targets, why not). ``daemonset`` and ``node`` are the API objects."""
    spec = _dig(daemonset, "spec", "template", "spec") or {}
    labels = {str(k): str(v) for k, v in (_dig(node, "metadata", "labels") or {}).items()}
    name = str(_dig(node, "metadata", "name") or "")
    selector = spec.get("nodeSelector") or {}
    for key, want in selector.items():
        if labels.get(key) != want:
            return False, f"nodeSelector {key}={want} does not match the node (label: {labels.get(key)!r})"
    required = _dig(spec, "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
    if required is not None:
        terms = required.get("nodeSelectorTerms") or []
        if not any(term_matches(t, labels, {"metadata.name": name}) for t in terms if isinstance(t, Mapping)):
            return False, "no term of the required node affinity matches the node"
    return True, ""
