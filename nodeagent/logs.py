"""Structured JSON-lines logging for the agent: stderr plus a size-capped ``<run_dir>/agent.log``.

One idiom everywhere in the agent: ``emit(logger, level, msg, fields)``, a fixed message and its facts as fields
(never formatted into the message). Pod-related lines carry the pod through ``pod_fields`` (namespace, name, uid),
which is how ``ambient-cni doctor`` finds a pod's lines (``nodeagent.dataplane.diagnose.agent_log_lines``).
Parts of the agent with a scope of their own (the dataplane, ZDS) log through ``Scoped``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from cni_plugin import rundir

LOGGER_NAME = "ambient-cni.agent"
AGENT_LOG_MAX_BYTES = 10 * 1024 * 1024
AGENT_LOG_BACKUPS = 1

RESERVED_KEYS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, scope, msg and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "scope": getattr(record, "scope", "agent"),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in RESERVED_KEYS and key not in line and not key.startswith("_"):
                line[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            line["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str, separators=(",", ":"))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-capped log file that is created 0600 (also after each rotation) and forced to 0600 if it existed
    wider, never opened through a symlink."""

    def _open(self) -> Any:
        from nodeagent.instance import open_private

        fd = open_private(self.baseFilename, os.O_WRONLY | os.O_APPEND)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def pod_fields(namespace: str, name: str, uid: str, **more: Any) -> dict[str, Any]:
    return {"pod_namespace": namespace, "pod_name": name, "pod_uid": uid, **more}


def setup(run_dir: str | None, level: str = "info", stream: Any = None) -> logging.Logger:
    logger = get_logger()
    logger.handlers.clear()
    logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    logger.propagate = False
    formatter = JsonFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if run_dir:
        file_handler = PrivateRotatingFileHandler(
            rundir.agent_log_path(run_dir), maxBytes=AGENT_LOG_MAX_BYTES, backupCount=AGENT_LOG_BACKUPS,
            encoding="utf-8",
        )
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def emit(logger: logging.Logger, level: int, msg: str, fields: Mapping[str, Any] | None = None) -> None:
    logger.log(level, msg, extra=safe_extra(fields or {}))


class Scoped:
    """``emit`` for one part of the agent: its lines carry ``"scope": scope`` and go through the agent's logger
    (a child of it, so they land wherever the agent's lines do)."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self.logger = logging.getLogger(f"{LOGGER_NAME}.{scope}")

    def __call__(self, level: int, msg: str, fields: Mapping[str, Any] | None = None) -> None:
        emit(self.logger, level, msg, {"scope": self.scope, **(fields or {})})


def safe_extra(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fields renamed where they would collide with LogRecord attributes (logging raises on those)."""
    return {(f"field_{k}" if k in RESERVED_KEYS else k): v for k, v in fields.items()}
