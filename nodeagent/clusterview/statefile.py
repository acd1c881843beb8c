"""The cluster-state file format (YAML or JSON), parsed and validated. Pure: text in, state out."""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeagent.clusterview.model import Namespace, Pod


class ClusterStateError(Exception):
    pass


class _NamespaceEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    labels: dict[str, str] = Field(default_factory=dict)


class _PodEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    uid: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    host_network: bool = Field(False, alias="hostNetwork")
    node_name: str = Field("", alias="nodeName")
    phase: str = ""
    service_account: str = Field("", alias="serviceAccount")
    ips: list[str] = Field(default_factory=list, alias="podIPs")


class _StateFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    namespaces: list[_NamespaceEntry] = Field(default_factory=list)
    pods: list[_PodEntry] = Field(default_factory=list)


def _load_document(text: str) -> Any:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClusterStateError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ClusterStateError(f"invalid YAML: {exc}") from exc


def parse(text: str, node_name: str) -> tuple[dict[str, Namespace], dict[tuple[str, str], Pod]]:
    """Parse a cluster-state document. Pods with a ``nodeName`` other than ``node_name`` are skipped."""
    document = _load_document(text)
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ClusterStateError("the cluster-state file must hold a map with 'namespaces' and 'pods'")
    try:
        parsed = _StateFile.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise ClusterStateError(f"invalid cluster-state file: {problems}") from exc
    namespaces = {ns.name: Namespace(name=ns.name, labels=ns.labels) for ns in parsed.namespaces}
    pods: dict[tuple[str, str], Pod] = {}
    for entry in parsed.pods:
        if entry.node_name and node_name and entry.node_name != node_name:
            continue
        pod = Pod(
            name=entry.name,
            namespace=entry.namespace,
            uid=entry.uid,
            labels=entry.labels,
            annotations=entry.annotations,
            host_network=entry.host_network,
            node_name=entry.node_name or node_name,
            phase=entry.phase,
            service_account=entry.service_account,
            ips=tuple(entry.ips),
        )
        pods[pod.key] = pod
    return namespaces, pods
