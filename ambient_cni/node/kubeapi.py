"""The few Kubernetes API calls of the node lifecycle, over the official client's ``ApiClient`` (auth, TLS,
kubeconfig or in-cluster config) with raw JSON in and out (no generated models: less memory, no surprises).

- ``GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}`` (RBAC: daemonsets get, in our namespace)
- ``GET /api/v1/nodes/{name}`` and ``PATCH`` with ``application/json-patch+json`` (RBAC: nodes get, patch)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ambient_cni.node.decision import Observation

REQUEST_TIMEOUT = (2.0, 5.0)  # connect, read (seconds)


class ApiError(Exception):
    """A call failed. ``status`` is the HTTP status (0: no answer at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status
        self.message = message


def _status_message(status: int, data: bytes) -> str:
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        return f"{body.get('reason') or ''}: {body.get('message') or ''}".strip(": ")
    return data[:200].decode(errors="replace") or f"HTTP {status}"


class LifecycleApi:
    def __init__(self, api_client: Any, timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.client = api_client
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            serialized = self.client.param_serialize(
                method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
            )
            response = self.client.call_api(*serialized, _request_timeout=self.timeout)
            data = response.read() or b""
            status = int(response.status)
        except Exception as exc:  # connection refused/reset, timeouts, TLS, token file unreadable
            raise ApiError(0, f"{type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise ApiError(status, _status_message(status, data))
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            raise ApiError(status, "the API server answered with something that is not JSON") from None
        return doc if isinstance(doc, dict) else {}

    def get_daemonset(self, namespace: str, name: str) -> dict[str, Any]:
        return self.request("GET", f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}")

    def get_node(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/nodes/{name}")

    def json_patch_node(self, name: str, operations: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/v1/nodes/{name}", operations, "application/json-patch+json")


def _classify(exc: ApiError) -> str:
    if exc.status == 404:
        return "not_found"
    if exc.status == 401:
        return "unauthorized"
    return "error"


def observe(api: LifecycleApi, namespace: str, name: str, node: str, attempts: int = 3,
            retry_delay_s: float = 1.0, budget_s: float = 12.0) -> Observation:
    """Read the DaemonSet and, when found, the node. Answers that decide (found, 404, 401) are final; anything
    else is tried up to ``attempts`` times within ``budget_s``, then reported as an error (the caller keeps
    everything)."""
    ref = f"{namespace}/{name}"
    last = "no attempt made"
    deadline = time.monotonic() + budget_s
    for attempt in range(attempts):
        if attempt:
            if time.monotonic() + retry_delay_s >= deadline:
                break
            time.sleep(retry_delay_s)
        try:
            daemonset = api.get_daemonset(namespace, name)
        except ApiError as exc:
            kind = _classify(exc)
            if kind != "error":
                return Observation(kind, error=str(exc), daemonset_ref=ref)  # type: ignore[arg-type]
            last = f"reading DaemonSet {ref}: {exc}"
            continue
        try:
            node_obj = api.get_node(node)
        except ApiError as exc:
            if exc.status == 401:
                return Observation("unauthorized", error=str(exc), daemonset_ref=ref)
            last = f"reading node {node}: {exc}"
            if exc.status == 404:  # a node object gone is ambiguous (the kubelet may register it again): keep
                return Observation("error", daemonset=daemonset, error=last, daemonset_ref=ref)
            continue
        return Observation("found", daemonset=daemonset, node=node_obj, daemonset_ref=ref)
    return Observation("error", error=last, daemonset_ref=ref)
