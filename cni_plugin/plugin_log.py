"""The plugin's log: JSON lines to stderr and to a size-capped file, never to stdout, never fatal.

Lines are buffered and written once when the plugin exits (one ``write`` per destination), so logging
costs no syscalls on the hot path and a broken log destination cannot fail or delay an operation.
The agent tails the file and re-emits the lines under scope ``cni-plugin``.
"""

from __future__ import annotations

import os
import stat
import sys
import time

from cni_plugin import fastjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
MAX_LOG_BYTES = 5 * 1024 * 1024  # rotated to <file>.1 past this size
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


class PluginLog:
    def __init__(self) -> None:
        self.threshold = LEVELS["info"]
        self.path: str | None = None
        self.to_stderr = True
        self.context: dict[str, str] = {}
        self._lines: list[str] = []

    def configure(self, level: str, path: str | None) -> None:
        self.threshold = LEVELS.get(level, LEVELS["info"])
        self.path = path or None

    def log(self, level: str, msg: str, **fields: object) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"time": round(time.time(), 6), "level": level, "msg": msg, **self.context, **fields}
        try:
            line = fastjson.dumps(record)
        except (TypeError, ValueError):
            plain = {k: v if isinstance(v, str | int | float | bool) else str(v) for k, v in record.items()}
            line = fastjson.dumps(plain)
        self._lines.append(line)

    def debug(self, msg: str, **fields: object) -> None:
        self.log("debug", msg, **fields)

    def info(self, msg: str, **fields: object) -> None:
        self.log("info", msg, **fields)

    def warning(self, msg: str, **fields: object) -> None:
        self.log("warning", msg, **fields)

    def error(self, msg: str, **fields: object) -> None:
        self.log("error", msg, **fields)

    def flush(self) -> None:
        if not self._lines:
            return
        payload = "\n".join(self._lines) + "\n"
        self._lines = []
        if self.to_stderr:
            try:
                sys.stderr.write(payload)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        if self.path:
            self._append_file(self.path, payload.encode())

    @staticmethod
    def _append_file(path: str, data: bytes) -> None:
        """Append to a regular file only: a symlink there is not followed, a FIFO never blocks the plugin."""
        try:
            if not os.path.isdir(os.path.dirname(path) or "."):
                return  # never create the agent's run dir
            try:
                if os.stat(path, follow_symlinks=False).st_size + len(data) > MAX_LOG_BYTES:
                    os.replace(path, path + ".1")
            except FileNotFoundError:
                pass
            fd = os.open(path, _APPEND_FLAGS, 0o600)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.write(fd, data)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            pass


LOG = PluginLog()
