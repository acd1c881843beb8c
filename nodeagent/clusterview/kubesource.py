"""Cluster view from the Kubernetes API: list+watch namespaces and the pods of this node.

Uses the official ``kubernetes`` client (auth, TLS, kubeconfig/in-cluster config, watch framing). Each
resource runs one thread: list (remember ``metadata.resourceVersion``) -> watch from that version -> on
"410 Gone" re-list at once -> on any other failure reconnect with capped exponential backoff. The view
counts as synced once both lists succeeded; it stays (last known) while reconnecting.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import yaml
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import watch as kwatch
from kubernetes.client.rest import ApiException

from nodeagent import logs
from nodeagent.clusterview import kubeobjects
from nodeagent.clusterview.model import Namespace, Pod, ViewHolder
from nodeagent.clusterview.rawapi import CoreV1Raw

WATCH_TIMEOUT_S = 240
CONNECT_TIMEOUT_S = 5.0
BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0


class KubeConfigError(Exception):
    pass


def make_api_client(kubeconfig: str | None) -> kclient.ApiClient:
    """ApiClient from a kubeconfig file, or from the in-cluster service account when ``kubeconfig`` is None."""
    try:
        if kubeconfig:
            return kconfig.new_client_from_config(config_file=kubeconfig)
        configuration = kclient.Configuration()
        kconfig.load_incluster_config(client_configuration=configuration)
        return kclient.ApiClient(configuration)
    except (kconfig.ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config (no --kubeconfig/--cluster-state)"
        detail = " ".join(str(exc).split())  # YAML errors span lines: one line here
        raise KubeConfigError(f"cannot load {source}: {detail}") from exc


class _RawWatch(kwatch.Watch):
    """A Watch that yields raw JSON maps (we convert them ourselves; no model deserialization)."""

    def get_return_type(self, func: Any) -> Any:
        return None


class KubeClusterView(ViewHolder):
    kind = "kubernetes"

    def __init__(self, api_client: kclient.ApiClient, node_name: str) -> None:
        super().__init__()
        self.api = CoreV1Raw(api_client)  # raw: the generated CoreV1Api costs ~1 s and ~21 MB to import
        self.node_name = node_name
        self._lock = threading.Lock()
        self._namespaces: dict[str, Namespace] = {}
        self._pods: dict[tuple[str, str], Pod] = {}
        self._listed: set[str] = set()
        self._stop = threading.Event()
        self._watches: dict[str, _RawWatch] = {}
        self._threads: list[threading.Thread] = []
        self._log = logs.get_logger()
        self.relists = 0
        self._set_reason("waiting for the first list of namespaces and pods from the API server")

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        for resource in ("namespaces", "pods"):
            thread = threading.Thread(target=self._run, args=(resource,), name=f"kube-{resource}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for w in list(self._watches.values()):  # unblocks streams waiting for events
            w.stop()
        for thread in self._threads:
            thread.join(timeout=2)

    # -- API calls ----------------------------------------------------------------------------------
    def _list_func(self, resource: str) -> Callable[..., Any]:
        return self.api.list_namespace if resource == "namespaces" else self.api.list_pod_for_all_namespaces

    def _selector_kwargs(self, resource: str) -> dict[str, Any]:
        return {} if resource == "namespaces" else {"field_selector": f"spec.nodeName={self.node_name}"}

    def _list(self, resource: str) -> str:
        response = self._list_func(resource)(
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT_S, 60), **self._selector_kwargs(resource)
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        items = body.get("items") or []
        with self._lock:
            if resource == "namespaces":
                self._namespaces = {ns.name: ns for ns in (kubeobjects.namespace_from(i) for i in items)}
            else:
                self._pods = {p.key: p for p in (kubeobjects.pod_from(i) for i in items)}
            self._listed.add(resource)
        self._publish_if_listed()
        logs.emit(self._log, logging.INFO, "listed from the API server",
                  {"resource": resource, "items": len(items), "resource_version": kubeobjects.resource_version(body)})
        return kubeobjects.resource_version(body)

    def _apply(self, resource: str, event_type: str, obj: dict[str, Any]) -> None:
        with self._lock:
            if resource == "namespaces":
                ns = kubeobjects.namespace_from(obj)
                if event_type == "DELETED":
                    self._namespaces.pop(ns.name, None)
                else:
                    self._namespaces[ns.name] = ns
            else:
                pod = kubeobjects.pod_from(obj)
                if event_type == "DELETED" or (pod.node_name and pod.node_name != self.node_name):
                    self._pods.pop(pod.key, None)
                else:
                    self._pods[pod.key] = pod
        self._publish_if_listed()

    def _publish_if_listed(self) -> None:
        with self._lock:
            if self._listed != {"namespaces", "pods"}:
                return
            namespaces, pods = dict(self._namespaces), dict(self._pods)
        self._publish(namespaces, pods)

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self, resource: str) -> None:
        """list -> watch from its version; a broken watch resumes from the last version seen (no re-list);
        410 Gone re-lists at once; failures back off exponentially (capped)."""
        backoff = BACKOFF_START_S
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list(resource)
                    backoff = BACKOFF_START_S
                started = time.monotonic()
                rv = self._watch_once(resource, rv)
                if time.monotonic() - started > 1.0:
                    backoff = BACKOFF_START_S
                    continue
                # a watch that ended at once (a proxy, a misbehaving server): back off instead of spinning
            except ApiException as exc:
                if self._stop.is_set():
                    return
                if exc.status == 410:
                    self.relists += 1
                    rv = None
                    logs.emit(self._log, logging.INFO, "watch resource version expired (410 Gone); re-listing",
                              {"resource": resource})
                    continue
                self._note_failure(resource, f"API server answered {exc.status}: {exc.reason}")
            except Exception as exc:  # connection refused, reset, timeouts, bad JSON
                if self._stop.is_set():
                    return
                self._note_failure(resource, f"{type(exc).__name__}: {exc}")
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _note_failure(self, resource: str, error: str) -> None:
        synced, _ = self.synced()
        if not synced:
            self._set_reason(f"cannot list {resource} from the API server: {error}")
        logs.emit(self._log, logging.WARNING, "list/watch failed; reconnecting with backoff",
                  {"resource": resource, "error": error})

    def patch_pod_annotation(self, namespace: str, name: str, uid: str, key: str, value: str | None) -> None:
        """JSON merge patch of one pod annotation (``None`` removes it). The patch names the pod's UID: a pod
        re-created under the same name is refused by the API server (the UID is immutable) instead of patched.
        Raises ``ApiException`` (``.status``) or a connection error."""
        metadata: dict[str, Any] = {"annotations": {key: value}}
        if uid:
            metadata["uid"] = uid
        response: Any = self.api.patch_namespaced_pod(  # raw response: no V1Pod deserialization
            name, namespace, {"metadata": metadata}, _content_type="application/merge-patch+json",
            _preload_content=False, _request_timeout=(CONNECT_TIMEOUT_S, 10),
        )
        response.release_conn()

    def _watch_once(self, resource: str, rv: str) -> str:
        """One watch request; returns the last resourceVersion seen (the server ends it at its timeout)."""
        w = _RawWatch()
        self._watches[resource] = w
        try:
            for event in w.stream(
                self._list_func(resource),
                resource_version=rv,
                timeout_seconds=WATCH_TIMEOUT_S,
                allow_watch_bookmarks=True,
                _request_timeout=(CONNECT_TIMEOUT_S, WATCH_TIMEOUT_S + 30),
                **self._selector_kwargs(resource),
            ):
                if self._stop.is_set():
                    break
                obj = event.get("raw_object") or event.get("object") or {}
                if not isinstance(obj, dict):
                    continue
                new_rv = kubeobjects.resource_version(obj)
                if new_rv:
                    rv = new_rv
                event_type = str(event.get("type", ""))
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(resource, event_type, obj)
        finally:
            self._watches.pop(resource, None)
        return rv
