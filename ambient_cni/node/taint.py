"""Removing the node taint ``cni.istio.io/not-ready`` once the node is ready.

A provisioner adds the taint (with effect NoSchedule) to a new node so that pods wait until redirection works
there; we only ever remove it. The removal is one atomic JSON patch: ``test`` that ``/spec/taints`` is exactly
the list we read, then ``replace`` it with that list minus our key. If anything changed the taints in between
the ``test`` fails (the API server answers 422) and we read again; 409 Conflict is retried the same way.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ambient_cni.node.kubeapi import ApiError, LifecycleApi
from nodeagent import logs

DEFAULT_TAINT = "cni.istio.io/not-ready"
CONFLICT_ATTEMPTS = 8
RETRYABLE = frozenset({409, 422})


def untaint_patch(node: Mapping[str, Any], key: str) -> list[dict[str, Any]] | None:
    """The JSON patch removing every taint with ``key``, or None when the node does not carry it."""
    taints = (node.get("spec") or {}).get("taints") or []
    if not isinstance(taints, list):
        return None
    kept = [t for t in taints if not (isinstance(t, Mapping) and t.get("key") == key)]
    if len(kept) == len(taints):
        return None
    return [
        {"op": "test", "path": "/spec/taints", "value": taints},
        {"op": "replace", "path": "/spec/taints", "value": kept},
    ]


def remove_taint(api: LifecycleApi, node: str, key: str, attempts: int = CONFLICT_ATTEMPTS) -> bool:
    """Remove ``key`` from ``node``'s taints. True when a patch removed it, False when it was not there.
    Raises ApiError for an error that is not a conflict, or when conflicts outlast ``attempts``."""
    for attempt in range(attempts):
        patch = untaint_patch(api.get_node(node), key)
        if patch is None:
            return False
        try:
            api.json_patch_node(node, patch)
            return True
        except ApiError as exc:
            if exc.status not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0, 0.05 * (attempt + 1)))  # another writer: read again
    return False


class Untainter:
    """A thread: whenever ``ready()`` holds, make sure the node does not carry the taint (re-checked every
    ``recheck_s``, since a provisioner or a node restart may put it back); API errors back off."""

    def __init__(self, api: LifecycleApi, node: str, key: str, ready: Callable[[], tuple[bool, str]],
                 recheck_s: float = 30.0, poll_s: float = 0.2, backoff_max_s: float = 30.0) -> None:
        self.api = api
        self.node = node
        self.key = key
        self.ready = ready
        self.recheck_s = recheck_s
        self.poll_s = poll_s
        self.backoff_max_s = backoff_max_s
        self.removed = 0
        self.done = threading.Event()  # set after the first successful check (removed or absent)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="untaint", daemon=True)
        self._log = logs.get_logger()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            if not self.ready()[0]:
                self._stop.wait(self.poll_s)
                continue
            try:
                removed = remove_taint(self.api, self.node, self.key)
            except ApiError as exc:
                logs.emit(self._log, logging.WARNING, "cannot remove the node taint; retrying",
                          {"node": self.node, "taint": self.key, "error": str(exc), "retry_s": backoff})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max_s)
                continue
            backoff = 1.0
            if removed:
                self.removed += 1
                logs.emit(self._log, logging.INFO, "node ready: taint removed", {"node": self.node, "taint": self.key})
            self.done.set()
            self._stop.wait(self.recheck_s)
