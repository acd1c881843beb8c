"""The node agent as a real child process, a client of its wire protocol, and cluster-state files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from cni_plugin import rundir, wire
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.poll import wait_for
from testbed.procs import stop_process

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
RECONCILE_PASSES = "ambient_cni_agent_reconcile_passes_total"


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def request(op: str, name: str = "", namespace: str = "", uid: str = "", netns: str = "",
            container_id: str | None = None, ifname: str = "eth0", deadline_ms: int = 5000,
            **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "v": 1, "op": op, "id": uuid.uuid4().hex[:8], "container_id": container_id or f"c-{uuid.uuid4().hex[:12]}",
        "netns": netns, "ifname": ifname,
        "pod": {"name": name, "namespace": namespace, "uid": uid, "infra_container_id": ""},
        "ips": ["10.9.0.5/24", "fd00::5/64"], "cni_version": "1.0.0", "deadline_ms": deadline_ms,
    }
    message.update(extra)
    return message


def send_raw(sock_path: str, data: bytes, timeout: float = 10.0, shut_write: bool = False) -> dict[str, Any] | None:
    """Send raw bytes, read one reply frame (None when the agent closed without one)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(sock_path)
        conn.sendall(data)
        if shut_write:
            conn.shutdown(socket.SHUT_WR)
        return read_reply(conn)


def read_reply(conn: socket.socket) -> dict[str, Any] | None:
    header = _recv(conn, 4)
    if header is None:
        return None
    body = _recv(conn, wire.frame_length(header))
    return None if body is None else wire.decode_body(body)


def _recv(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def call(sock_path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    reply = send_raw(sock_path, wire.encode_frame(message), timeout)
    assert reply is not None, "agent closed the connection without a reply"
    return reply


def write_state(path: Path, namespaces: dict[str, dict[str, str]], pods: list[dict[str, Any]]) -> None:
    """Atomically (temp + rename, like an editor) write a cluster-state YAML file."""
    doc = {"namespaces": [{"name": n, "labels": labels} for n, labels in namespaces.items()], "pods": pods}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.rename(tmp, path)


def pod(name: str, namespace: str, uid: str | None = None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())}
    entry.update(extra)
    return entry


@dataclass
class AgentProcess:
    """``python -m ambient_cni agent`` as a real child process with its own temp dirs."""

    base: Path
    cluster_state: Path | None = None
    kubeconfig: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    health: str = ""

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def sock(self) -> str:
        return str(self.run_dir / rundir.SOCKET)

    @property
    def stderr_path(self) -> Path:
        return self.base / "agent.stderr"

    def argv(self) -> list[str]:
        args = [str(VENV_PYTHON), "-m", "ambient_cni", "agent", "--run-dir", str(self.run_dir),
                "--state-dir", str(self.state_dir), "--dataplane", "noop", "--health-addr", "127.0.0.1:0",
                "--node-name", "node-a", "--reconcile-interval", "1", "--log-level", "debug"]
        if self.cluster_state is not None:
            args += ["--cluster-state", str(self.cluster_state)]
        if self.kubeconfig is not None:
            args += ["--kubeconfig", str(self.kubeconfig)]
        args += self.extra_args
        # Network safety: an inpod agent programs the node netns it is given, and without --host-netns that
        # is its own one, i.e. this machine's. Tests must always pass a netns of their own; fail loudly.
        last = len(args) - 1 - args[::-1].index("--dataplane")  # click takes the last value
        if args[last + 1] == "inpod" and "--host-netns" not in args:
            raise AssertionError("an inpod agent in a test needs --host-netns <a netns the test created>")
        return args

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> AgentProcess:
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / rundir.AGENT_LOG).unlink()
        self.health = ""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIENT_CNI_")}
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.argv(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _health_line(self) -> str | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.stderr_path.read_text()[-3000:]
            raise AssertionError(f"agent exited with {self.proc.returncode}: {tail}")
        with contextlib.suppress(OSError):
            log = (self.run_dir / rundir.AGENT_LOG).read_text()
            match = re.search(r'"health endpoint listening","addr":"([^"]+)"', log)
            if match:
                return match.group(1)
        return None

    def wait_health_addr(self, timeout: float = 30.0) -> str:
        addr = wait_for(self._health_line, timeout, interval=0.05,
                        what=lambda: f"the agent's health endpoint: {self.stderr_path.read_text()[-3000:]}")
        assert addr is not None
        self.health = addr
        return addr

    def http(self, path: str) -> tuple[int, str]:
        if not self.health:
            self.wait_health_addr()
        try:
            with urllib.request.urlopen(f"http://{self.health}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_health_addr(timeout)
        last: list[tuple[int, str]] = []

        def ready() -> bool:
            last[:] = [self.http("/readyz")]
            return last[0][0] == 200

        wait_for(ready, timeout, interval=0.05, what=lambda: f"the agent to be ready (last /readyz: {last})")

    def pending_connections(self) -> int:
        """Connections to the plugin socket the agent has not accepted yet (its listen queue, read with ``ss``)."""
        out = subprocess.run(["ss", "-xlnH", "src", self.sock], capture_output=True, text=True, check=True).stdout
        return sum(int(line.split()[2]) for line in out.splitlines() if line.strip())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the agent's /metrics (0 when absent), e.g.
        ``metric("ambient_cni_agent_reconcile_passes_total")``."""
        status, body = self.http("/metrics")
        assert status == 200, body
        return metric_value(body, name, **labels)

    def wait_reconcile_passes(self, passes: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``passes`` more reconcile passes have completed (its ``reconcile_passes_total`` counter):
        whatever a pass repairs or removes is done then."""
        target = self.metric(RECONCILE_PASSES) + passes
        wait_for(lambda: self.metric(RECONCILE_PASSES) >= target, timeout, interval=0.05,
                 what=f"{passes} more reconcile pass(es) (counter to reach {target:g})")

    def records(self) -> list[dict[str, Any]]:
        status, body = self.http("/debug/pods")
        assert status == 200
        result: list[dict[str, Any]] = json.loads(body)
        return result

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in (self.run_dir / rundir.AGENT_LOG).read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return stop_process(self.proc, timeout, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def running_agent(base: Path, **kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(base, **kwargs)
    try:
        agent.start()
        yield agent
    finally:
        agent.kill()
