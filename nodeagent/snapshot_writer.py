"""Publishes ``<run_dir>/enrollment.json`` after view changes: debounced, written with ``cni_plugin.files`` (temp +
fsync + rename).

Nothing is written before the view is synced: a snapshot from an incomplete view would let enrolled pods
pass as "not enrolled". The file stays in place when the agent stops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from cni_plugin import files, rundir
from cni_plugin import snapshot as snapshot_format
from cni_plugin.enrollment import Exemptions
from nodeagent import decide, logs
from nodeagent.clusterview.model import ClusterState

DEBOUNCE_S = 0.02


class SnapshotPublisher:
    def __init__(
        self,
        run_dir: str,
        node: str,
        exemptions: Exemptions,
        state_source: Callable[[], ClusterState],
        synced: Callable[[], tuple[bool, str]],
        on_write: Callable[[], object] = lambda: None,
    ) -> None:
        self.path = rundir.snapshot_path(run_dir)
        self.node = node
        self.exemptions = exemptions
        self._state_source = state_source
        self._synced = synced
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._published = threading.Event()
        self._thread = threading.Thread(target=self._run, name="snapshot", daemon=True)
        self._generation = int(time.time() * 1000)  # monotonic across restarts without extra state
        self._last: bytes = b""
        self._log = logs.get_logger()
        self._on_write = on_write  # each snapshot written (the agent counts them: ambient_cni_agent_snapshot_writes)

    @property
    def published(self) -> bool:
        return self._published.is_set()

    def start(self) -> None:
        self._thread.start()
        self.notify()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=2)

    def notify(self, _state: ClusterState | None = None) -> None:
        self._dirty.set()

    def publish_now(self) -> bool:
        synced, _ = self._synced()
        if not synced:
            return False
        state = self._state_source()
        snap = decide.build_snapshot(state, self.node, self._generation + 1, self.exemptions)
        body = (snap.namespaces, snap.pods, snap.exemptions)
        fingerprint = repr(body).encode()
        if fingerprint == self._last and os.path.exists(self.path):
            self._published.set()
            return False
        self._generation += 1
        files.write_atomic(self.path, snapshot_format.encode(snap, time.time()), 0o600)
        self._last = fingerprint
        self._on_write()
        self._published.set()
        logs.emit(self._log, logging.INFO, "enrollment snapshot published",
                  {"path": self.path, "generation": self._generation, "namespaces": len(snap.namespaces),
                   "pods": len(snap.pods)})
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            time.sleep(DEBOUNCE_S)
            self._dirty.clear()
            try:
                self.publish_now()
            except OSError as exc:
                logs.emit(self._log, logging.ERROR, "cannot write the enrollment snapshot",
                          {"path": self.path, "error": str(exc)})
                self._stop.wait(0.5)
                self._dirty.set()
