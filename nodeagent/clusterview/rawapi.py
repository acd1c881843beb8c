"""Kubernetes API calls over the official client's ``ApiClient`` (auth, TLS, kubeconfig/in-cluster config,
token refresh) with raw JSON, without the generated API classes: importing ``CoreV1Api`` alone costs about
1 s of start-up and 21 MB of memory (measured here), more than the rest of the node process's imports together.

``CoreV1Lists`` offers the two list functions the cluster view calls, with the generated functions' keyword
arguments, so ``kubernetes.watch.Watch`` streams them the same way; they return the raw urllib3 response.
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


class CoreV1Lists:
    """``list_namespace`` and ``list_pod_for_all_namespaces``, raw (see the module docstring)."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def _list(self, path: str, kwargs: dict[str, Any]) -> Any:
        query = {_QUERY_NAMES[k]: v for k, v in kwargs.items() if k in _QUERY_NAMES and v is not None}
        response = raw_request(self.api_client, "GET", path, query, timeout=kwargs.get("_request_timeout"))
        if not kwargs.get("watch") and not 200 <= int(response.status) < 300:
            # a refused list (401/403/5xx) is an error, never an empty list: an empty view would pass enrolled
            # pods as not enrolled (the watch path checks the status itself)
            from kubernetes.client.rest import ApiException

            body = response.data
            response.release_conn()
            raise ApiException(status=int(response.status), reason=body[:300].decode(errors="replace"))
        return response

    def list_namespace(self, **kwargs: Any) -> Any:
        """List or watch namespaces."""
        return self._list("/api/v1/namespaces", kwargs)

    def list_pod_for_all_namespaces(self, **kwargs: Any) -> Any:
        """List or watch pods of every namespace."""
        return self._list("/api/v1/pods", kwargs)
