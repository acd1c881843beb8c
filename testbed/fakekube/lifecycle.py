"""The fake API server's node-lifecycle resources (used by ``ambient-cni node``): a stand-in, because no
kube-apiserver can run here. Kept apart from the list+watch part in ``server.py``, which only routes to it.

Covered, with the real server's status codes and ``Status`` bodies:

- ``GET /apis/apps/v1/namespaces/{ns}/daemonsets/{name}``: the object, or 404 NotFound.
- ``GET /api/v1/nodes/{name}``: the object, or 404 NotFound.
- ``PATCH /api/v1/nodes/{name}`` with ``Content-Type: application/json-patch+json`` (RFC 6902, every op incl.
  ``test``; applied with the ``jsonpatch`` library): 200 with the patched object (resourceVersion bumped); a body
  that is not a JSON patch: 400 BadRequest; an op that fails (a ``test`` that does not hold, a missing path):
  422 Invalid, as the API server answers when the patch cannot be applied; a patched ``metadata.resourceVersion``
  that is not the current one: 409 Conflict; any other patch type: 415 UnsupportedMediaType (merge and
  strategic-merge patches exist on the real server but are not used by us, so not faked).
- Failure modes for every request (lists and watches included): ``fail(401)`` answers as for a deleted service
  account's token (Unauthorized); ``fail(403)`` as for missing RBAC (Forbidden); ``fail(500|503)``.
- Test controls: ``conflict_next_patches(n)`` (the next n node patches get 409, as an update race does) and
  ``before_node_patch`` (a hook run between reading the node and applying a patch: a concurrent writer).

Not covered: field selectors on these resources, dry-run, server-side apply, status subresources.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import jsonpatch

_DAEMONSET = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/daemonsets/([^/]+)$")
_NODE = re.compile(r"^/api/v1/nodes/([^/]+)$")
JSON_PATCH = "application/json-patch+json"


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if details:
        body["details"] = details
    return body


_FAILURES = {
    401: ("Unauthorized", "Unauthorized"),
    403: ("Forbidden", "forbidden: User \"system:serviceaccount:istio-system:ambient-cni-node\" cannot do this"),
    500: ("InternalError", "Internal error occurred: etcdserver: request timed out"),
    503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
}


class Lifecycle:
    """DaemonSets and Nodes of the fake. ``next_rv`` hands out the server's global resourceVersion."""

    def __init__(self, next_rv: Callable[[], int]) -> None:
        self._lock = threading.Lock()
        self._next_rv = next_rv
        self.daemonsets: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.failure: int | None = None
        self.conflicts_left = 0
        self.before_node_patch: Callable[[str], None] | None = None
        self.node_patches: list[list[dict[str, Any]]] = []  # every patch body received, applied or not
        self.requests: list[str] = []

    # -- test controls ------------------------------------------------------------------------------
    def fail(self, status: int | None) -> None:
        """Answer every request with this error status from now on (None: serve normally again)."""
        if status is not None and status not in _FAILURES:
            raise ValueError(f"no canned failure for {status}")
        self.failure = status

    def conflict_next_patches(self, count: int) -> None:
        self.conflicts_left = count

    def upsert_daemonset(self, name: str, namespace: str, node_selector: dict[str, str] | None = None,
                         affinity: dict[str, Any] | None = None, deleting: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {"containers": [{"name": "node", "image": "ambient-cni"}]}
        if node_selector is not None:
            spec["nodeSelector"] = node_selector
        if affinity is not None:
            spec["affinity"] = affinity
        obj: dict[str, Any] = {
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace, "uid": f"ds-{name}-{time.monotonic_ns()}",
                         "resourceVersion": str(self._next_rv()),
                         "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}},
        }
        if deleting:
            obj["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
        with self._lock:
            self.daemonsets[(namespace, name)] = obj
        return obj

    def delete_daemonset(self, name: str, namespace: str) -> None:
        with self._lock:
            self.daemonsets.pop((namespace, name), None)

    def upsert_node(self, name: str, labels: dict[str, str] | None = None,
                    taints: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}
        obj: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"node-{name}", "labels": all_labels,
                         "resourceVersion": str(self._next_rv())},
            "spec": {"podCIDR": "10.244.0.0/24"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        }
        if taints is not None:
            obj["spec"]["taints"] = taints
        with self._lock:
            self.nodes[name] = obj
        return copy.deepcopy(obj)

    def node(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self.nodes.get(name)
            return copy.deepcopy(obj) if obj is not None else None

    def set_node_taints(self, name: str, taints: list[dict[str, Any]]) -> None:
        """A concurrent writer (another controller) changing the taints."""
        with self._lock:
            self.nodes[name]["spec"]["taints"] = copy.deepcopy(taints)
            self.nodes[name]["metadata"]["resourceVersion"] = str(self._next_rv())

    # -- serving ------------------------------------------------------------------------------------
    def failure_response(self) -> tuple[int, dict[str, Any]] | None:
        if self.failure is None:
            return None
        reason, message = _FAILURES[self.failure]
        return self.failure, status_body(self.failure, reason, message)

    def get(self, path: str) -> tuple[int, dict[str, Any]] | None:
        """(status, body) for a path of ours, None for a path that is not ours."""
        if m := _DAEMONSET.match(path):
            namespace, name = m.groups()
            self.requests.append(f"get daemonset {namespace}/{name}")
            with self._lock:
                obj = self.daemonsets.get((namespace, name))
                if obj is not None:
                    return 200, copy.deepcopy(obj)
            return 404, status_body(404, "NotFound", f'daemonsets.apps "{name}" not found',
                                    {"name": name, "group": "apps", "kind": "daemonsets"})
        if m := _NODE.match(path):
            (name,) = m.groups()
            self.requests.append(f"get node {name}")
            obj = self.node(name)
            if obj is not None:
                return 200, obj
            return 404, status_body(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"})
        return None

    def patch(self, path: str, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]] | None:
        m = _NODE.match(path)
        if m is None:
            return None
        (name,) = m.groups()
        self.requests.append(f"patch node {name}")
        if content_type.split(";")[0].strip() != JSON_PATCH:
            return 415, status_body(415, "UnsupportedMediaType",
                                    f"the body of the request was in an unknown format - accepted media types "
                                    f"include: {JSON_PATCH} (this fake)")
        try:
            operations = json.loads(raw)
            patch = jsonpatch.JsonPatch(operations)
            if not isinstance(operations, list):
                raise ValueError("not a list")
        except (ValueError, jsonpatch.JsonPatchException) as exc:
            return 400, status_body(400, "BadRequest", f"invalid JSON patch: {exc}")
        self.node_patches.append(operations)
        if self.before_node_patch is not None:
            self.before_node_patch(name)
        with self._lock:
            current = self.nodes.get(name)
            if current is None:
                return 404, status_body(404, "NotFound", f'nodes "{name}" not found', {"name": name, "kind": "nodes"})
            if self.conflicts_left > 0:
                self.conflicts_left -= 1
                return 409, _conflict(name)
            try:
                patched = patch.apply(copy.deepcopy(current))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, status_body(422, "Invalid", str(exc))
            wanted_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
                return 409, _conflict(name)
            patched["metadata"]["resourceVersion"] = str(self._next_rv())
            self.nodes[name] = patched
            return 200, copy.deepcopy(patched)


def _conflict(name: str) -> dict[str, Any]:
    return status_body(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the object has been '
                       "modified; please apply your changes to the latest version and try again",
                       {"name": name, "kind": "nodes"})


def respond(handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
