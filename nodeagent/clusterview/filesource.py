"""Cluster view from a YAML/JSON file, reloaded on change.

inotify (inotify_simple) watches the file's *directory*, so editors that write a temp file and rename it
over the original, and Kubernetes ConfigMap mounts (``..data`` symlink swaps), are seen. Every event in the
directory triggers a (debounced) re-read; the view changes only when the content does. A broken file keeps
the last good view and logs an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

from inotify_simple import INotify
from inotify_simple import flags as iflags

from nodeagent import logs
from nodeagent.clusterview import statefile
from nodeagent.clusterview.model import ViewHolder

DEBOUNCE_S = 0.03
WAKE_S = 0.25  # how often the watcher checks for stop
POLL_S = 5.0  # safety net: re-read this often even without events (e.g. the directory was replaced)

_WATCH_FLAGS = (
    iflags.CLOSE_WRITE
    | iflags.MOVED_TO
    | iflags.MOVED_FROM
    | iflags.CREATE
    | iflags.DELETE
    | iflags.ATTRIB
    | iflags.DELETE_SELF
    | iflags.MOVE_SELF
)


class FileClusterView(ViewHolder):
    kind = "file"

    def __init__(self, path: str, node_name: str) -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.node_name = node_name
        self._digest = b""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = logs.get_logger()
        self._inotify: INotify | None = None

    def start(self) -> None:
        self.reload()
        self._thread = threading.Thread(target=self._run, name="clusterview-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._inotify is not None:
            try:
                self._inotify.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=2)

    def reload(self) -> bool:
        """Re-read the file; returns True when the view changed."""
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            reason = f"cannot read cluster-state file {self.path}: {exc.strerror or exc}"
            self._set_reason(reason)
            logs.emit(self._log, logging.ERROR, "cluster-state file unreadable; keeping the last good view",
                      {"path": self.path, "error": reason})
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False
        try:
            namespaces, pods = statefile.parse(data.decode("utf-8", errors="replace"), self.node_name)
        except statefile.ClusterStateError as exc:
            self._set_reason(f"cluster-state file {self.path} is invalid: {exc}")
            logs.emit(self._log, logging.ERROR, "cluster-state file invalid; keeping the last good view",
                      {"path": self.path, "error": str(exc)})
            return False
        self._digest = digest
        self._publish(namespaces, pods)
        logs.emit(self._log, logging.INFO, "cluster view loaded from file",
                  {"path": self.path, "namespaces": len(namespaces), "pods": len(pods),
                   "generation": self.state().generation})
        return True

    def _run(self) -> None:
        directory = os.path.dirname(self.path) or "."
        while not self._stop.is_set():
            try:
                inotify = INotify()
                self._inotify = inotify
                inotify.add_watch(directory, _WATCH_FLAGS)
            except OSError as exc:
                logs.emit(self._log, logging.WARNING, "cannot watch the cluster-state directory; polling",
                          {"path": directory, "error": str(exc)})
                if self._stop.wait(POLL_S):
                    return
                self.reload()
                continue
            self.reload()  # catch changes between the first load and the watch
            try:
                last = time.monotonic()
                while not self._stop.is_set():
                    events = inotify.read(timeout=int(WAKE_S * 1000))
                    if self._stop.is_set():
                        return
                    if any(e.mask & (iflags.DELETE_SELF | iflags.MOVE_SELF | iflags.IGNORED) for e in events):
                        break  # the directory went away: re-establish the watch
                    if not events and time.monotonic() - last < POLL_S:
                        continue
                    if events:
                        # coalesce a burst of events (write + rename) into one re-read
                        while inotify.read(timeout=int(DEBOUNCE_S * 1000)):
                            pass
                    last = time.monotonic()
                    self.reload()
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
            finally:
                try:
                    inotify.close()
                except OSError:
                    pass
            if self._stop.wait(0.2):
                return
