"""A fake kube-apiserver that speaks list+watch for namespaces and pods, faithfully enough for an informer.

There is no kube-apiserver to be had on this machine, so the agent's ``kubernetes`` cluster-view source is
tested against this. It covers what the agent uses, with the upstream wire behaviour:

- ``GET /api/v1/namespaces`` and ``GET /api/v1/pods`` (``fieldSelector=spec.nodeName=<node>``): JSON
  ``NamespaceList``/``PodList`` with ``metadata.resourceVersion`` (one global, increasing counter, as etcd's).
- ``?watch=true&resourceVersion=N`` (``timeoutSeconds``, ``allowWatchBookmarks`` accepted): a chunked HTTP/1.1
  stream of JSON lines ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": {...}}`` for every change after N,
  then live changes until ``timeoutSeconds``. A version older than the compaction point gets, like the real
  server, a 200 stream with one ``ERROR`` event carrying a ``Status`` with ``code: 410`` (reason Expired).
- ``PATCH /api/v1/namespaces/<ns>/pods/<name>`` with ``Content-Type: application/merge-patch+json``: the
  RFC 7386 JSON merge patch applied to the stored pod (``null`` removes a key), ``resourceVersion`` bumped and
  a ``MODIFIED`` event sent only when something changed, the updated pod returned (200). As the real server:
  404 ``NotFound`` for a missing pod; 422 ``Invalid`` ("field is immutable") when the patch changes
  ``metadata.uid``; 409 ``Conflict`` when it names a ``metadata.resourceVersion`` that is not the current one;
  400 ``BadRequest`` for a body that is not a JSON object or renames the pod; 415 for the other patch types
  (which the real server does accept: JSON patch, strategic merge, apply).
- Test controls: upsert/delete objects, ``compact()`` the event history, ``drop_watches()`` (closes open
  streams, as an API server restart does), ``hold_watches()`` (new watch requests wait), ``fail_patches(n)``
  (the next n PATCHes get a 500, as an overloaded server or a failing webhook answers) and ``pod()`` (read one).

Not covered: authentication (any bearer token is accepted), label selectors, protobuf, pagination
(``limit``/``continue``), bookmarks being sent, PATCH of pods other than the merge patch above. The node-lifecycle
resources (DaemonSet GET, Node GET and JSON PATCH, failure modes for every request) are in
``testbed/fakekube/lifecycle.py``.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from testbed.fakekube import lifecycle as lifecycle_mod


class FakeKube:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._rv = 100
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"namespaces": {}, "pods": {}}
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, object)
        self._compacted = 0
        self._drop_generation = 0
        self._watches_allowed = threading.Event()
        self._watches_allowed.set()
        self._patch_failures = 0
        self.requests: list[str] = []
        self.patches: list[tuple[str, str, dict[str, Any]]] = []  # (namespace, name, body) of accepted PATCHes
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._stopping = False
        self.lifecycle = lifecycle_mod.Lifecycle(self._next_rv)  # DaemonSets, Nodes, failure modes

    def _next_rv(self) -> int:
        with self._cond:
            self._rv += 1
            return self._rv

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._watches_allowed.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: agent, user: {token: fake-token}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: agent}}]\n"
            "current-context: fake\n"
        )

    # -- test controls ------------------------------------------------------------------------------
    def upsert_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        self._upsert("namespaces", {"metadata": {"name": name, "labels": labels or {}}, "spec": {}, "status": {}})

    def upsert_pod(self, name: str, namespace: str, node: str, uid: str | None = None,
                   labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                   host_network: bool = False, phase: str = "Running") -> None:
        existing = self._objects["pods"].get((namespace, name))
        obj = {
            "metadata": {"name": name, "namespace": namespace,
                         "uid": uid or (existing["metadata"]["uid"] if existing else str(uuid.uuid4())),
                         "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": "default",
                     "containers": [{"name": "app", "image": "app:1"}]},
            "status": {"phase": phase},
        }
        self._upsert("pods", obj)

    def delete(self, resource: str, name: str, namespace: str = "") -> None:
        with self._cond:
            obj = self._objects[resource].pop((namespace, name))
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append((self._rv, resource, "DELETED", obj))
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the event history: watches from any version before now get 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def drop_watches(self) -> None:
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()

    def hold_watches(self, hold: bool) -> None:
        if hold:
            self._watches_allowed.clear()
        else:
            self._watches_allowed.set()

    def count(self, prefix: str) -> int:
        return sum(1 for r in self.requests if r.startswith(prefix))

    def fail_patches(self, n: int) -> None:
        """The next ``n`` PATCH requests are answered 500 InternalError."""
        with self._cond:
            self._patch_failures = n

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self._objects["pods"].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def patch_pod(self, namespace: str, name: str, patch: Any) -> tuple[int, dict[str, Any]]:
        """Apply a JSON merge patch as the API server does; returns (HTTP status, body)."""
        with self._cond:
            if self._patch_failures > 0:
                self._patch_failures -= 1
                return 500, _status(500, "InternalError", "Internal error occurred: injected by the test")
            stored = self._objects["pods"].get((namespace, name))
            if stored is None:
                return 404, _status(404, "NotFound", f'pods "{name}" not found', name)
            if not isinstance(patch, dict):
                return 400, _status(400, "BadRequest", "the body of the request must be a JSON object")
            metadata = patch.get("metadata")
            meta_patch = metadata if isinstance(metadata, dict) else {}
            want_rv = meta_patch.get("resourceVersion")
            if want_rv is not None and str(want_rv) != stored["metadata"]["resourceVersion"]:
                return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on pods "{name}": the object '
                                    "has been modified; please apply your changes to the latest version and try again",
                                    name)
            updated = merge_patch(stored, patch)
            meta = updated.get("metadata") or {}
            if meta.get("name") != name or meta.get("namespace") != namespace:
                return 400, _status(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not "
                                    f"match the name on the URL ({name})", name)
            if meta.get("uid") != stored["metadata"]["uid"]:
                return 422, _status(422, "Invalid", f'Pod "{name}" is invalid: metadata.uid: Invalid value: '
                                    f'"{meta.get("uid")}": field is immutable', name)
            self.patches.append((namespace, name, copy.deepcopy(patch)))
            if updated == stored:
                return 200, copy.deepcopy(stored)
            self._rv += 1
            updated["metadata"]["resourceVersion"] = str(self._rv)
            self._objects["pods"][(namespace, name)] = updated
            self._events.append((self._rv, "pods", "MODIFIED", copy.deepcopy(updated)))
            self._cond.notify_all()
            return 200, copy.deepcopy(updated)

    # -- internals ----------------------------------------------------------------------------------
    def _upsert(self, resource: str, obj: dict[str, Any]) -> None:
        with self._cond:
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            event = "MODIFIED" if key in self._objects[resource] else "ADDED"
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            obj["metadata"].setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self._objects[resource][key] = obj
            self._events.append((self._rv, resource, event, copy.deepcopy(obj)))
            self._cond.notify_all()

    @staticmethod
    def _matches(resource: str, obj: dict[str, Any], node: str | None) -> bool:
        return resource != "pods" or node is None or obj["spec"].get("nodeName") == node

    def list(self, resource: str, node: str | None) -> dict[str, Any]:
        with self._cond:
            items = [copy.deepcopy(o) for o in self._objects[resource].values() if self._matches(resource, o, node)]
            kind = "NamespaceList" if resource == "namespaces" else "PodList"
            return {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _status(code: int, reason: str, message: str, name: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": message, "reason": reason, "code": code}
    if name:
        body["details"] = {"name": name, "kind": "pods"}
    return body


def _node_from_selector(selector: str | None) -> str | None:
    if not selector:
        return None
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key.strip() == "spec.nodeName":
            return value.strip().lstrip("=")
    return None


def _handler(fake: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return

        def _lifecycle(self, method: str, raw: bytes = b"") -> bool:
            """Failure modes and the node-lifecycle resources (testbed/fakekube/lifecycle.py); ``raw``: the body
            of a PATCH, already read."""
            answer = fake.lifecycle.failure_response()
            if answer is None:
                path = urlparse(self.path).path
                if method == "PATCH":
                    answer = fake.lifecycle.patch(path, self.headers.get("Content-Type", ""), raw)
                else:
                    answer = fake.lifecycle.get(path)
            if answer is None:
                return False
            lifecycle_mod.respond(self, *answer)
            return True

        def do_GET(self) -> None:
            if self._lifecycle("GET"):
                return
            parsed = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
            resource = {"/api/v1/namespaces": "namespaces", "/api/v1/pods": "pods"}.get(parsed.path)
            if resource is None:
                self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                 "reason": "NotFound", "message": f"{parsed.path} not found"})
                return
            node = _node_from_selector(query.get("fieldSelector"))
            watching = query.get("watch") in ("true", "1")
            fake.requests.append(f"{'watch' if watching else 'list'} {resource}")
            if not watching:
                self._json(200, fake.list(resource, node))
                return
            self._watch(resource, node, int(query.get("resourceVersion") or 0),
                        float(query.get("timeoutSeconds") or 1800))

        def do_PATCH(self) -> None:
            parsed = urlparse(self.path)
            parts = parsed.path.strip("/").split("/")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self._lifecycle("PATCH", raw):
                return
            if len(parts) != 6 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] != "pods":
                self._json(404, _status(404, "NotFound", f"{parsed.path} not found"))
                return
            namespace, name = parts[3], parts[5]
            fake.requests.append("patch pods")
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type != "application/merge-patch+json":
                self._json(415, _status(415, "UnsupportedMediaType",
                                        f"the body of the request was in an unknown format - accepted media types "
                                        f"of this fake include: application/merge-patch+json (got {content_type!r})"))
                return
            try:
                patch = json.loads(raw)
            except ValueError:
                self._json(400, _status(400, "BadRequest", "the body of the request is not valid JSON"))
                return
            self._json(*fake.patch_pod(namespace, name, patch))

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _chunk(self, event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, resource: str, node: str | None, since: int, timeout: float) -> None:
            fake._watches_allowed.wait()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            end = time.monotonic() + timeout
            try:
                with fake._cond:
                    generation = fake._drop_generation
                    if since < fake._compacted:
                        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": f"too old resource version: {since} ({fake._compacted})",
                                  "reason": "Expired", "code": 410}
                        self._chunk({"type": "ERROR", "object": status})
                        self.wfile.write(b"0\r\n\r\n")
                        return
                while True:
                    with fake._cond:
                        pending = [e for e in fake._events if e[0] > since and e[1] == resource]
                        if not pending:
                            remaining = end - time.monotonic()
                            if remaining <= 0 or fake._stopping or generation != fake._drop_generation:
                                break
                            fake._cond.wait(min(remaining, 0.5))
                            continue
                    for rv, _, event_type, obj in pending:
                        since = rv
                        if fake._matches(resource, obj, node):
                            self._chunk({"type": event_type, "object": obj})
                if generation != fake._drop_generation or fake._stopping:
                    self.close_connection = True
                    return  # dropped: end without the terminating chunk, like a broken connection
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler
