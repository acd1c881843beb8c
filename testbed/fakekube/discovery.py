"""A fake API server's discovery endpoints, enough for ``kubectl`` to map the kinds in ``deploy/`` to
resources (legacy discovery: ``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>/<version>``). A stand-in,
because no kube-apiserver can run here; it lets the tests run the real ``kubectl`` over ``deploy/`` and see
which files it reads as objects. Every other path answers 404 with a Status, as the real server does."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# group/version -> [(plural, kind, namespaced)]
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("namespaces", "Namespace", False), ("nodes", "Node", False), ("pods", "Pod", True),
           ("serviceaccounts", "ServiceAccount", True), ("configmaps", "ConfigMap", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False),
                                     ("roles", "Role", True), ("rolebindings", "RoleBinding", True)],
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _resource_list(group_version: str) -> dict[str, Any]:
    return {
        "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
        "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                       "verbs": VERBS} for plural, kind, namespaced in RESOURCES[group_version]],
    }


def documents() -> dict[str, dict[str, Any]]:
    groups = []
    for group_version in RESOURCES:
        if "/" not in group_version:
            continue
        group, version = group_version.split("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    docs: dict[str, dict[str, Any]] = {
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups},
        "/api/v1": _resource_list("v1"),
    }
    for group_version in RESOURCES:
        if "/" in group_version:
            docs[f"/apis/{group_version}"] = _resource_list(group_version)
    return docs


class DiscoveryServer:
    def __init__(self) -> None:
        docs = documents()
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                outer.requests.append(path)
                doc = docs.get(path)
                status = 200 if doc is not None else 404
                if doc is None:
                    doc = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": "the server could not find the requested resource", "reason": "NotFound",
                           "code": 404}
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: '{self.url}'}}}}]\n"
            "users: [{name: admin, user: {token: fake-token}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: admin}}]\n"
            "current-context: fake\n"
        )

    def start(self) -> DiscoveryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
