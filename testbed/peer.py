"""``python -m zds_peer`` (the ztunnel stand-in: a real ZDS client that opens the pods' listeners and relays
TCP, see ``zds_peer/``) as a real child process, with its log and per-pod counters."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

from testbed.paths import REPO_ROOT
from testbed.procs import stop_process


class PeerProcess:
    """``python -m zds_peer`` connected to ``zds_socket``; its log and stats files live in ``workdir``."""

    def __init__(self, zds_socket: str, workdir: str, *extra: str) -> None:
        self.log_file = os.path.join(workdir, f"peer-{secrets.token_hex(2)}.log")
        self.stats_file = os.path.join(workdir, f"peer-{secrets.token_hex(2)}.json")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zds_peer", "--zds-socket", zds_socket, "--log-file", self.log_file,
             "--stats-file", self.stats_file, *extra],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def stats(self) -> dict[str, object]:
        try:
            with open(self.stats_file) as fh:
                data: dict[str, object] = json.load(fh)
                return data
        except (OSError, ValueError):
            return {}

    def port_count(self, uid: str, port: int) -> int:
        """Connections relayed for pod ``uid`` on ``port``. The peer counts a connection before it relays a
        byte, so a reply that came through the proxy is always counted by the time it arrives."""
        pods = self.stats().get("pods", {})
        assert isinstance(pods, dict)
        return int(pods.get(uid, {}).get("ports", {}).get(str(port), 0))

    def port_count_is(self, uid: str, port: int, count: int) -> bool:
        return self.port_count(uid, port) == count

    def listening(self, uid: str) -> bool:
        """Whether the peer holds pod ``uid``'s listeners (False for a pod it never had or has drained)."""
        pods = self.stats().get("pods", {})
        assert isinstance(pods, dict)
        return bool(pods.get(uid, {}).get("listening"))

    def log(self) -> str:
        try:
            return Path(self.log_file).read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
