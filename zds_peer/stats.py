"""Per-pod, per-port counters of relayed connections, mirrored to a JSON file for tests."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


class Stats:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {"connected": False, "replays": 0, "pods": {}}

    def pod(self, uid: str, name: str = "", namespace: str = "", listening: bool = True) -> None:
        with self._lock:
            entry = self._data["pods"].setdefault(
                uid, {"name": name, "namespace": namespace, "ports": {}, "destinations": [], "errors": 0}
            )
            entry["listening"] = listening
            self._flush()

    def count(self, uid: str, port: int, destination: str) -> None:
        with self._lock:
            entry = self._data["pods"].get(uid)
            if entry is None:
                return
            key = str(port)
            entry["ports"][key] = entry["ports"].get(key, 0) + 1
            entry["destinations"] = [*entry["destinations"], f"{port}->{destination}"][-50:]
            self._flush()

    def error(self, uid: str) -> None:
        with self._lock:
            entry = self._data["pods"].get(uid)
            if entry is not None:
                entry["errors"] += 1
                self._flush()

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._flush()

    def incr(self, key: str) -> None:
        with self._lock:
            self._data[key] = self._data.get(key, 0) + 1
            self._flush()

    def _flush(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(self._data, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
