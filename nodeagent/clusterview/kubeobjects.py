"""Kubernetes API objects (raw JSON maps) -> cluster-view records. Pure."""

from __future__ import annotations

from typing import Any

from nodeagent.clusterview.model import Namespace, Pod


def _map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def resource_version(obj: dict[str, Any]) -> str:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("resourceVersion") or "")


def namespace_from(obj: dict[str, Any]) -> Namespace:
    metadata = obj.get("metadata") or {}
    return Namespace(name=str(metadata.get("name") or ""), labels=_map(metadata.get("labels")))


def pod_from(obj: dict[str, Any]) -> Pod:
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    return Pod(
        name=str(metadata.get("name") or ""),
        namespace=str(metadata.get("namespace") or ""),
        uid=str(metadata.get("uid") or ""),
        labels=_map(metadata.get("labels")),
        annotations=_map(metadata.get("annotations")),
        host_network=bool(spec.get("hostNetwork", False)),
        node_name=str(spec.get("nodeName") or ""),
        phase=str(status.get("phase") or ""),
        service_account=str(spec.get("serviceAccountName") or ""),
        ips=pod_ips(status),
    )


def pod_ips(status: dict[str, Any]) -> tuple[str, ...]:
    entries = status.get("podIPs")
    if not isinstance(entries, list):
        entries = []
    ips = [str(e.get("ip")) for e in entries if isinstance(e, dict) and e.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return tuple(ips)
