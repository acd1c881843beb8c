"""Concise structured log lines on stderr: ``<UTC time> <level> <message>``."""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower()} install: {record.getMessage()}"

def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("ambient_cni.install")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
