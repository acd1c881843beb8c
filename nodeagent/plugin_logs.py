"""Re-emits the plugin's JSON-lines log (``<run_dir>/plugin.log``) in the agent log under scope cni-plugin.

Best effort and one-way: the plugin never waits for the agent. Polls the file (cheap stat), follows
rotation (inode change) and truncation (size below the offset); starts at the end of an existing file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from cni_plugin import rundir
from nodeagent import logs

POLL_S = 0.25
MAX_LINE = 64 * 1024

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR}


def parse_line(line: bytes) -> tuple[int, str, dict[str, Any]]:
    """(level, msg, other fields) of one plugin log line; non-JSON lines are passed on as text. Pure."""
    text = line.decode("utf-8", errors="replace").strip()
    try:
        raw = json.loads(text)
    except ValueError:
        return logging.INFO, text, {}
    if not isinstance(raw, dict):
        return logging.INFO, text, {}
    level = _LEVELS.get(str(raw.pop("level", "info")).lower(), logging.INFO)
    msg = str(raw.pop("msg", ""))
    raw.pop("scope", None)
    if "time" in raw:
        raw["plugin_time"] = raw.pop("time")
    return level, msg, raw


class PluginLogTailer:
    def __init__(self, run_dir: str, on_line: Callable[[], None] | None = None) -> None:
        self.path = rundir.plugin_log_path(run_dir)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plugin-log", daemon=True)
        self._log = logs.get_logger()
        self._on_line = on_line
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""

    def start(self) -> None:
        try:
            info = os.stat(self.path)
            self._inode, self._offset = info.st_ino, info.st_size
        except OSError:
            pass
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def poll(self) -> int:
        """Read what was appended since the last call; returns the number of lines emitted."""
        try:
            info = os.stat(self.path)
        except OSError:
            return 0
        if info.st_ino != self._inode or info.st_size < self._offset:
            self._inode, self._offset, self._partial = info.st_ino, 0, b""  # rotated or truncated
        if info.st_size == self._offset:
            return 0
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read(max(0, min(info.st_size - self._offset, 4 * 1024 * 1024)))
        except OSError:
            return 0
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()[:MAX_LINE]
        emitted = 0
        for line in lines:
            if not line.strip():
                continue
            level, msg, fields = parse_line(line[:MAX_LINE])
            fields["scope"] = "cni-plugin"
            self._log.log(level, msg, extra=logs.safe_extra(fields))
            emitted += 1
            if self._on_line:
                self._on_line()
        return emitted

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception as exc:  # never let log forwarding take the agent down
                logs.emit(self._log, logging.DEBUG, "plugin log tail failed", {"error": str(exc)})
