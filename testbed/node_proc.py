"""``ambient-cni node`` (the frozen product) as a child process with temp CNI dirs, and the fake API server.

There is no kube-apiserver on this machine: ``testbed.fakekube`` stands in for it (see its docstrings)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.netns import free_port
from testbed.paths import CLEAN_ENV, FIXTURES, PLUGIN
from testbed.poll import wait_for

PRIMARY = FIXTURES / "conflists" / "containerd__10-containerd-net.conflist"
PRIMARY_NAME = "10-containerd-net.conflist"


def tree_bytes(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: file bytes, or ``-> target`` for a symlink, or ``<dir>``."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = path.read_bytes()
    return out


@dataclass
class NodeProc:
    base: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def conf_dir(self) -> Path:
        return self.base / "net.d"

    @property
    def bin_dir(self) -> Path:
        return self.base / "bin"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def stderr_path(self) -> Path:
        return self.base / "node.stderr"

    def prepare(self, primary: bool = True) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        if primary:
            shutil.copy(PRIMARY, self.conf_dir / PRIMARY_NAME)

    def start(self, *extra: str) -> NodeProc:
        self.port = self.port or free_port()
        argv = [str(PLUGIN), "node", "--conf-dir", str(self.conf_dir), "--bin-dir", str(self.bin_dir),
                "--run-dir", str(self.run_dir), "--state-dir", str(self.base / "state"), "--dataplane", "noop",
                "--node-name", "node-a", "--health-addr", f"127.0.0.1:{self.port}", *self.args, *extra]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=CLEAN_ENV)
        return self

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=3) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_http(self, path: str, status: int = 200, timeout: float = 30.0) -> str:
        """The body of the first answer of ``path`` with ``status`` (fails at once when the node exits)."""
        last: list[tuple[int, str]] = []

        def answered() -> tuple[int, str] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.stderr_tail()}")
            last[:] = [self.http(path)]
            return last[0] if last[0][0] == status else None

        answer = wait_for(answered, timeout, interval=0.05, tolerate=(OSError,),
                          what=lambda: f"{path} to answer {status} (last {last}):\n{self.stderr_tail()}")
        assert answer is not None
        return answer[1]

    def stop(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"node did not stop within {timeout:.0f}s:\n{self.stderr_tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stderr_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-chars:]
        return ""

    def log(self) -> list[dict[str, Any]]:
        """stderr, every line parsed as JSON (fails on a line that is not)."""
        lines = []
        for line in self.stderr_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"stderr line is not JSON: {line!r}") from None
        return lines

    def messages(self) -> list[str]:
        return [str(entry.get("msg")) for entry in self.log()]
