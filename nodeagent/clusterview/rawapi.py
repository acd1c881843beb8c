"""Kubernetes API calls over the official client's ``ApiClient`` (auth, TLS, kubeconfig/in-cluster config,
token refresh) with raw JSON, without the generated API classes: importing ``CoreV1Api`` alone costs about
1 s of start-up and 21 MB of memory (measured here), more than the rest of the node process's imports together.

``CoreV1Raw`` offers the calls the cluster view makes, with the generated functions' keyword arguments, so
``kubernetes.watch.Watch`` streams the lists the same way. Each returns the raw urllib3 response; like the
generated functions called with ``_preload_content=False``, a non-2xx answer raises ``ApiException``
(``.status``), except for a watch, whose status ``Watch`` checks itself.
"""

from __future__ import annotations

from typing import Any

_QUERY_NAMES = {
    "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
    "resource_version": "resourceVersion",
    "timeout_seconds": "timeoutSeconds",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "watch": "watch",
    "limit": "limit",
}


def raw_request(api_client: Any, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                headers: dict[str, str] | None = None, timeout: Any = None) -> Any:
    """One request; returns the urllib3 response unread (status not checked)."""
    params = [(k, ("true" if v else "false") if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()]
    serialized = api_client.param_serialize(method=method, resource_path=path, query_params=params,
                                            header_params={"Accept": "application/json", **(headers or {})},
                                            body=body, auth_settings=["BearerToken"])
    return api_client.call_api(*serialized, _request_timeout=timeout).response


def checked(response: Any) -> Any:
    """``response``, or ApiException for a non-2xx status (a refused list must never read as an empty one)."""
    if 200 <= int(response.status) < 300:
        return response
    from kubernetes.client.rest import ApiException

    body = response.data
    response.release_conn()
    error = ApiException(status=int(response.status), reason=str(getattr(response, "reason", "") or ""))
    error.body = body
    raise error


class CoreV1Raw:
    """The core/v1 calls of the cluster view, raw (see the module docstring)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def _list(self, path: str, kwargs: dict[str, Any]) -> Any:
        query = {_QUERY_NAMES[k]: v for k, v in kwargs.items() if k in _QUERY_NAMES and v is not None}
        response = raw_request(self.api_client, "GET", path, query, timeout=kwargs.get("_request_timeout"))
        return response if kwargs.get("watch") else checked(response)

    def list_namespace(self, **kwargs: Any) -> Any:
        """List or watch namespaces."""
        return self._list("/api/v1/namespaces", kwargs)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        """List or watch pods of every namespace."""
        return self._list("/api/v1/pods", kwargs)

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any, _content_type: str,
                             _request_timeout: Any = None, **_: Any) -> Any:
        """PATCH one pod with ``body`` of type ``_content_type`` (e.g. application/merge-patch+json)."""
        response = raw_request(self.api_client, "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body,
                               headers={"Content-Type": _content_type}, timeout=_request_timeout)
        return checked(response)
