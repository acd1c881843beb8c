"""Stopping the child processes a test, benchmark or the demo started: politely, then firmly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGTERM,
                 group: bool = False) -> int:
    """Send ``sig`` to ``proc`` (to its whole process group with ``group``: it was started with
    ``start_new_session``), wait up to ``timeout`` seconds, then SIGKILL it. Returns its exit code."""
    if proc.poll() is None:
        def send(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)

        send(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()
    return proc.returncode
