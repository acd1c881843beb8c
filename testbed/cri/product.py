"""Our product wired into a containerd environment the way a node runs it: the installer chains the frozen
plugin behind the primary conflist in containerd's CNI dirs, the node agent runs as a host process with a
file cluster view, and (for ``--dataplane inpod``) a ztunnel-compatible ZDS peer holds the pods' listeners."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from cni_plugin import rundir
from testbed.netns import free_port
from testbed.paths import CLEAN_ENV, REPO_ROOT, VENV_PYTHON
from testbed.poll import wait_for
from testbed.procs import stop_process


class NodeEnv(Protocol):
    """What the product needs from a runtime environment (testbed.cri.env.CriEnv, testbed.podman.env.PodmanEnv)."""

    name: str
    root: str

    @property
    def conf_dir(self) -> Path: ...

    @property
    def bin_dir(self) -> Path: ...

    @property
    def netns_path(self) -> str: ...


# AMBIENT_CNI_PRODUCT: test another build of the frozen binary (default: the one `make build` makes)
PRODUCT = Path(os.environ.get("AMBIENT_CNI_PRODUCT", str(REPO_ROOT / "dist" / "ambient-cni")))
ENROLLED_NS_LABELS = {"istio.io/dataplane-mode": "ambient"}


class ProductError(RuntimeError):
    pass


def run_product(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PRODUCT), *args], capture_output=True, text=True, timeout=timeout, check=False, env=CLEAN_ENV
    )


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is not None:
        stop_process(proc, timeout, group=True)


@dataclass
class Node:
    """The product's pieces on one environment. All paths live under the environment's temp root."""

    env: NodeEnv
    dataplane: str = "noop"
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    agent: subprocess.Popen[bytes] | None = None
    peer: subprocess.Popen[bytes] | None = None
    health_port: int = 0
    agent_args: list[str] = field(default_factory=list)  # extra `ambient-cni agent` flags

    @property
    def base(self) -> Path:
        return Path(self.env.root) / "product"

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def cluster_state(self) -> Path:
        return self.base / "cluster.json"

    @property
    def zds_socket(self) -> Path:
        return self.base / "zds.sock"

    @property
    def agent_log(self) -> Path:
        return self.base / "agent.log"

    @property
    def peer_log(self) -> Path:
        return self.base / "peer.log"

    @property
    def peer_stats(self) -> Path:
        """The ZDS peer's counters (JSON): connections per pod uid and listener port."""
        return self.base / "peer-stats.json"

    @property
    def health_addr(self) -> str:
        return f"127.0.0.1:{self.health_port}"

    # ------------------------------------------------------------------ installer

    def install(self, *extra: str) -> subprocess.CompletedProcess[str]:
        self.base.mkdir(parents=True, exist_ok=True)
        res = run_product(
            "install",
            "--conf-dir",
            str(self.env.conf_dir),
            "--bin-dir",
            str(self.env.bin_dir),
            "--once",
            "--run-dir",
            str(self.run_dir),
            *extra,
        )
        if res.returncode != 0:
            raise ProductError(f"ambient-cni install failed (exit {res.returncode}): {res.stderr.strip()}")
        return res

    def our_conflist(self) -> Path | None:
        for path in sorted(self.env.conf_dir.iterdir()):
            if path.suffix == ".conflist" and "ambient-cni" in path.name:
                return path
        return None

    # ------------------------------------------------------------------ cluster view

    def write_cluster_state(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        doc = {
            "namespaces": [{"name": n, "labels": labels} for n, labels in sorted(self.namespaces.items())],
            "pods": self.pods,
        }
        tmp = self.cluster_state.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.rename(self.cluster_state)

    # ------------------------------------------------------------------ agent

    def start_agent(self, timeout: float = 30.0, wait_ready: bool = True) -> None:
        """Start the agent; wait until it serves (and, with ``wait_ready``, until /readyz says ready)."""
        if self.agent is not None and self.agent.poll() is None:
            return
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.cluster_state.exists():
            self.write_cluster_state()
        self.health_port = self.health_port or free_port()
        with open(self.agent_log, "ab") as log:
            self.agent = subprocess.Popen(
                [
                    str(PRODUCT),
                    "agent",
                    "--run-dir",
                    str(self.run_dir),
                    "--state-dir",
                    str(self.state_dir),
                    "--cluster-state",
                    str(self.cluster_state),
                    "--node-name",
                    self.env.name,
                    "--dataplane",
                    self.dataplane,
                    "--zds-socket",
                    str(self.zds_socket),
                    "--health-addr",
                    self.health_addr,
                    # network safety: the probe path goes to the environment's node netns, never this machine's
                    "--host-netns",
                    self.env.netns_path,
                    *self.agent_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                env=CLEAN_ENV,
            )
        agent = self.agent

        def serving() -> bool:
            if agent.poll() is not None:
                raise ProductError(f"the agent exited with {agent.returncode}:\n{self.agent_log_tail()}")
            return (self.run_dir / rundir.SOCKET).exists() and self._http_ok("/readyz" if wait_ready else "/healthz")

        wait_for(serving, timeout, interval=0.05, what=lambda: f"the agent to serve:\n{self.agent_log_tail()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self._http_ok("/readyz"), timeout, interval=0.05,
                 what=lambda: f"the agent to be ready:\n{self.agent_log_tail()}")

    def stop_agent(self) -> None:
        _stop(self.agent)
        self.agent = None

    def agent_log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.health_addr}{path}", timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    def _http_ok(self, path: str) -> bool:
        try:
            return self._http(path, timeout=1.0)[0] == 200
        except OSError:
            return False

    def debug_pods(self) -> list[dict[str, Any]]:
        """The agent's records (``/debug/pods``), as a list of dicts."""
        status, body = self._http("/debug/pods")
        if status != 200:
            raise ProductError(f"/debug/pods answered {status}: {body[:200]!r}")
        doc = json.loads(body)
        if isinstance(doc, dict):
            doc = doc.get("pods", doc)
        if isinstance(doc, dict):
            doc = list(doc.values())
        return list(doc)

    def metrics_text(self) -> str:
        status, body = self._http("/metrics")
        if status != 200:
            raise ProductError(f"/metrics answered {status}")
        return body.decode()

    def request_counts(self) -> dict[tuple[str, str], float]:
        """``ambient_cni_agent_requests_total`` by (op, result)."""
        counts: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == "ambient_cni_agent_requests_total":
                    counts[(sample.labels.get("op", ""), sample.labels.get("result", ""))] = sample.value
        return counts

    # ------------------------------------------------------------------ ZDS peer

    def start_peer(self, timeout: float = 20.0) -> None:
        """Start the ztunnel-compatible peer; when the agent runs, wait until it is ready with the peer."""
        if self.peer is not None and self.peer.poll() is None:
            return
        self.base.mkdir(parents=True, exist_ok=True)
        with open(self.peer_log, "ab") as log:
            self.peer = subprocess.Popen(
                [str(VENV_PYTHON), "-m", "zds_peer", "--zds-socket", str(self.zds_socket),
                 "--stats-file", str(self.peer_stats)],
                cwd=str(REPO_ROOT),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        peer = self.peer

        def ready_with_peer() -> bool:
            if peer.poll() is not None:
                raise ProductError(f"the ZDS peer exited with {peer.returncode}: {self.peer_log.read_text()}")
            return self.agent is None or self._http_ok("/readyz")

        wait_for(ready_with_peer, timeout, interval=0.05,
                 what=lambda: f"the agent to be ready with the ZDS peer:\n{self.agent_log_tail()}")

    def stop_peer(self) -> None:
        _stop(self.peer)
        self.peer = None

    # ------------------------------------------------------------------ doctor

    def doctor(self, *args: str) -> subprocess.CompletedProcess[str]:
        extra = ["--peer-log", str(self.peer_log)] if self.peer_log.exists() else []
        return run_product("doctor", "--run-dir", str(self.run_dir), "--health-addr", self.health_addr, *extra, *args)

    def close(self) -> None:
        self.stop_agent()
        self.stop_peer()


def require_product() -> Path:
    if not (PRODUCT.exists() and os.access(PRODUCT, os.X_OK)):
        raise ProductError(f"{PRODUCT} is missing: build it with `make build`")
    return PRODUCT
