"""``ambient.istio.io/redirection: enabled`` on the pod, as Istio's agent sets it (Kubernetes view only).

Set once redirection is in place (after the ZDS ack), removed on un-enroll: a JSON merge patch of the pod's
annotations that also names the pod's UID, so a patch meant for a pod that was deleted and re-created under the
same name is refused by the API server instead of landing on the new pod. Patches run on one background thread,
coalesced per pod (the last wish wins), and are retried with exponential backoff until they succeed or the pod
is gone (404, or the API server refuses the UID: 409/422). A failed patch never fails an ADD; every attempt is
counted in ``ambient_cni_agent_annotation_patches{result}``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent import logs
from nodeagent.metrics import Metrics

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0
GONE_STATUSES = frozenset({404, 409, 422})
ENABLED = "enabled"

# (namespace, name, uid, value or None to remove) -> None; raises on failure (``status`` attribute if HTTP)
PatchFn = Callable[[str, str, str, "str | None"], None]


@dataclass
class _Pending:
    value: str | None
    attempts: int = 0
    due: float = 0.0


class RedirectionAnnotator:
    def __init__(self, patch: PatchFn, metrics: Metrics, backoff_start_s: float = BACKOFF_START_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self._patch = patch
        self._metrics = metrics
        self._backoff_start = backoff_start_s
        self._backoff_max = backoff_max_s
        self._pending: dict[tuple[str, str, str], _Pending] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pod-annotations", daemon=True)
        self._log = logs.get_logger()

    def start(self) -> RedirectionAnnotator:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def enabled(self, namespace: str, name: str, uid: str) -> None:
        self._want(namespace, name, uid, ENABLED)

    def removed(self, namespace: str, name: str, uid: str) -> None:
        self._want(namespace, name, uid, None)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _want(self, namespace: str, name: str, uid: str, value: str | None) -> None:
        if not name or not namespace:
            return
        with self._cond:
            self._pending[(namespace, name, uid)] = _Pending(value)  # replaces an older wish, backoff reset
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    now = time.monotonic()
                    due = [(k, p) for k, p in self._pending.items() if p.due <= now]
                    if due:
                        key, item = min(due, key=lambda kp: kp[1].due)
                        break
                    wait = min((p.due for p in self._pending.values()), default=now + 3600) - now
                    self._cond.wait(max(0.01, wait))
                else:
                    return
            self._attempt(key, item)

    def _attempt(self, key: tuple[str, str, str], item: _Pending) -> None:
        namespace, name, uid = key
        fields = logs.pod_fields(namespace, name, uid, annotation=f"redirection={item.value or '(removed)'}")
        try:
            self._patch(namespace, name, uid, item.value)
        except Exception as exc:
            status = getattr(exc, "status", None)
            with self._cond:
                current = self._pending.get(key)
                if status in GONE_STATUSES:
                    if current is item:
                        del self._pending[key]
                    result = "gone"
                else:
                    item.attempts += 1
                    item.due = time.monotonic() + min(self._backoff_max, self._backoff_start * 2 ** (item.attempts - 1))
                    result = "failed"
            self._metrics.annotation_patches.labels(result).inc()
            logs.emit(self._log, logging.INFO if result == "gone" else logging.WARNING,
                      "pod annotation not patched" + ("; pod gone" if result == "gone" else "; will retry"),
                      {**fields, "status": status, "error": f"{type(exc).__name__}: {exc}"[:300],
                       "attempts": item.attempts})
            return
        with self._cond:
            if self._pending.get(key) is item:
                del self._pending[key]
        self._metrics.annotation_patches.labels("ok").inc()
        logs.emit(self._log, logging.DEBUG, "pod annotation patched", {**fields, "attempts": item.attempts + 1})
