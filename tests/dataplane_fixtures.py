"""Real network namespaces for the dataplane tests (issue 5): pods on a bridge "node", sockets inside them.

Everything is created with unique names (``acdp`` + 6 hex) and removed in ``finally`` blocks, also when a test
fails. Traffic only flows between addresses inside these namespaces (10.77.0.0/24, fd00:77::/64).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zds_peer.nsworker import NetnsWorker

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=check, timeout=30)


def uniq(prefix: str = "acdp") -> str:
    return f"{prefix}{secrets.token_hex(3)}"


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(self, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", f"--net={self.path}", *argv, check=check, stdin=stdin)

    def iptables_save(self, v6: bool = False) -> str:
        return self.run("ip6tables-save" if v6 else "iptables-save").stdout


def create_netns() -> Netns:
    name = uniq()
    sh("ip", "netns", "add", name)
    ns = Netns(name)
    ns.run("ip", "link", "set", "lo", "up")
    return ns


def delete_netns(ns: Netns) -> None:
    sh("ip", "netns", "del", ns.name, check=False)


@pytest.fixture
def netns_factory() -> Iterator[Callable[[], Netns]]:
    made: list[Netns] = []

    def make() -> Netns:
        ns = create_netns()
        made.append(ns)
        return ns

    try:
        yield make
    finally:
        for ns in made:
            delete_netns(ns)


@dataclass
class Pod:
    ns: Netns
    ip: str
    ip6: str
    uid: str
    name: str

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket created inside this pod's netns."""
        return sock_in(self.ns.path, family)


@dataclass
class Node:
    """A node netns with a bridge; pods attach by veth (10.77.0.x/24 and fd00:77::x/64).

    ``with_gateway()`` gives the bridge the node's addresses (10.77.0.1, fd00:77::1) and every pod a default
    route through them, as a real node has: what a "kubelet" on the node needs to probe pods."""

    ns: Netns
    bridge: str = "br0"
    pods: list[Pod] = field(default_factory=list)
    gateway: bool = False

    GATEWAY4 = "10.77.0.1"
    GATEWAY6 = "fd00:77::1"

    def with_gateway(self) -> Node:
        self.ns.run("ip", "addr", "add", f"{self.GATEWAY4}/24", "dev", self.bridge)
        self.ns.run("ip", "-6", "addr", "add", f"{self.GATEWAY6}/64", "dev", self.bridge, "nodad")
        self.gateway = True
        return self

    def add_pod(self, name: str = "") -> Pod:
        idx = len(self.pods) + 2
        pod_ns = create_netns()
        host_if = f"v{secrets.token_hex(3)}"
        try:
            # create the veth inside the node netns, then move the peer end into the pod
            self.ns.run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0")
            self.ns.run("ip", "link", "set", "eth0", "netns", pod_ns.path)
            self.ns.run("ip", "link", "set", host_if, "master", self.bridge, "up")
            ip, ip6 = f"10.77.0.{idx}", f"fd00:77::{idx}"
            pod_ns.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            pod_ns.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            pod_ns.run("ip", "link", "set", "eth0", "up")
            if self.gateway:
                pod_ns.run("ip", "route", "add", "default", "via", self.GATEWAY4)
                pod_ns.run("ip", "-6", "route", "add", "default", "via", self.GATEWAY6)
        except BaseException:
            delete_netns(pod_ns)
            raise
        pod = Pod(pod_ns, ip, ip6, uid=f"uid-{secrets.token_hex(8)}", name=name or f"pod{idx}")
        self.pods.append(pod)
        return pod


@pytest.fixture
def node() -> Iterator[Node]:
    ns = create_netns()
    n = Node(ns)
    try:
        ns.run("ip", "link", "add", n.bridge, "type", "bridge")
        ns.run("ip", "link", "set", n.bridge, "up")
        yield n
    finally:
        for pod in n.pods:
            delete_netns(pod.ns)
        delete_netns(ns)


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    """A short temp dir (UNIX socket paths are limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="acdp")
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


class TcpServer:
    """A TCP echo server listening inside a pod netns; records the peers it saw."""

    def __init__(self, pod: Pod, port: int, family: int = socket.AF_INET) -> None:
        self.sock = pod.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        self.sock.listen(16)
        self.seen: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.seen.append(addr[:2])
            with conn, contextlib.suppress(OSError):
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def tcp_exchange(pod: Pod, dest: tuple[str, int], payload: bytes = b"hi", timeout: float = 3.0) -> bytes:
    """Connect from inside ``pod`` to ``dest``, send ``payload``, return the reply. Raises OSError."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    s = pod.socket(family)
    try:
        s.settimeout(timeout)
        s.connect(dest)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(1024)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


class PeerProcess:
    """``python -m zds_peer`` as a real process."""

    def __init__(self, zds_socket: str, workdir: str, *extra: str) -> None:
        self.log_file = os.path.join(workdir, f"peer-{secrets.token_hex(2)}.log")
        self.stats_file = os.path.join(workdir, f"peer-{secrets.token_hex(2)}.json")
        self.proc = subprocess.Popen(
            [PY, "-m", "zds_peer", "--zds-socket", zds_socket, "--log-file", self.log_file,
             "--stats-file", self.stats_file, *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def stats(self) -> dict[str, object]:
        try:
            with open(self.stats_file) as fh:
                data: dict[str, object] = json.load(fh)
                return data
        except (OSError, ValueError):
            return {}

    def port_count(self, uid: str, port: int) -> int:
        pods = self.stats().get("pods", {})
        assert isinstance(pods, dict)
        return int(pods.get(uid, {}).get("ports", {}).get(str(port), 0))

    def log(self) -> str:
        try:
            return Path(self.log_file).read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


_KUBELET = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(1024):
        out += chunk
sys.stdout.write(out.decode())
"""


def kubelet_probe(node_ns: Netns, dest: tuple[str, int], payload: str = "probe") -> str:
    """A "kubelet": a separate process in the node netns (a local socket there) connects to a pod's port."""
    proc = sh("nsenter", f"--net={node_ns.path}", PY, "-c", _KUBELET, dest[0], str(dest[1]), payload, check=False)
    if proc.returncode != 0:
        raise OSError(f"probe to {dest} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def node_sets(node_path: str) -> dict[str, str]:
    """The probe sets of a test's node netns: {ip: uid comment} (read only)."""
    from nodeagent.dataplane.hostprobe import HostProbe

    probe = HostProbe(node_path)
    try:
        return {e.ip: uid for e, uid in probe.entries().items()}
    finally:
        probe.close()


def edit_node_sets(node_path: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(ProbeSets)`` in a test's node netns: changes behind the agent's back (lost state, strangers)."""
    from nodeagent.dataplane.probesets import ProbeSets

    fd = os.open(node_path, os.O_RDONLY)
    try:
        worker = NetnsWorker(fd, "test-sets")
    finally:
        os.close(fd)
    sets = ProbeSets()
    try:
        return worker.call(lambda: fn(sets))
    finally:
        worker.call(sets.close)
        worker.stop()


def wait_for(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _snapshot_pods(path: Path) -> dict[str, object]:
    """The pods the agent's enrollment snapshot names (empty while it is not written yet)."""
    try:
        pods = json.loads(path.read_bytes()).get("pods", {})
    except (OSError, ValueError):
        return {}
    return pods if isinstance(pods, dict) else {}


# -- the full chain: libcni driver -> frozen plugin -> agent (inpod) -> zds_peer ---------------------------------
AMBIENT_NS = "ambient-test"
PLAIN_NS = "plain-test"


@dataclass
class Cluster:
    """A throwaway node: node netns (bridge via the chain), agent with --dataplane inpod, zds_peer."""

    agent: Any
    peer: PeerProcess
    conf_name: str
    common: dict[str, Any]
    state_file: Path
    pods: list[dict[str, Any]] = field(default_factory=list)

    def add_pod(self, make_netns: Callable[..., Any], name: str, namespace: str = AMBIENT_NS,
                annotations: dict[str, str] | None = None) -> tuple[Any, str]:
        """Create a netns and run the chain's ADD for it; returns (netns, uid)."""
        from tests.agent_fixtures import pod as pod_entry
        from tests.agent_fixtures import write_state
        from tests.harness.runners import run_driver

        ns = make_netns("acdp")
        entry = pod_entry(name, namespace, nodeName="node-a", annotations=annotations or {})
        self.pods.append(entry)
        write_state(self.state_file, {AMBIENT_NS: {"istio.io/dataplane-mode": "ambient"}, PLAIN_NS: {}}, self.pods)
        # The pod object exists before its sandbox: wait until the agent's view has it (its enrollment snapshot
        # names it), else the ADD could be decided by the namespace alone, before the pod's annotations are known.
        snapshot = self.agent.run_dir / "enrollment.json"
        wait_for(lambda: f"{namespace}/{name}" in _snapshot_pods(snapshot), timeout=15,
                 what=f"pod {namespace}/{name} in the agent's view")
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={entry['uid']}"
        deadline = time.monotonic() + 15
        while True:  # ADD is retried like a runtime would (e.g. ztunnel not connected yet)
            res = run_driver("add", self.conf_name, ns.path, container_id=f"c-{name}", cni_args=args, **self.common)
            if res.code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert res.code == 0, res.describe()
        return ns, str(entry["uid"])

    def del_pod(self, ns: Any, name: str, uid: str, namespace: str = AMBIENT_NS) -> None:
        from tests.harness.runners import run_driver

        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={uid}"
        res = run_driver("del", self.conf_name, ns.path, container_id=f"c-{name}", cni_args=args, **self.common)
        assert res.code == 0, res.describe()


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, driver_binary: Path, cni_bin_dir: Path, scratch: Path, conf_dir: Path,
    cache_dir: Path, ipam_dir: Path, node_netns: Any,
) -> Iterator[Cluster]:
    """The node; ``@pytest.mark.parametrize("cluster", [[agent flags...]], indirect=True)`` adds agent flags."""
    from tests.agent_fixtures import AgentProcess, write_state
    from tests.harness.cni import write_conflist

    state = scratch / "cluster.yaml"
    write_state(state, {AMBIENT_NS: {"istio.io/dataplane-mode": "ambient"}, PLAIN_NS: {}}, [])
    base = Path(tempfile.mkdtemp(prefix="acdp"))  # short: UNIX socket paths are limited
    zds = str(base / "zds.sock")
    agent = AgentProcess(base, cluster_state=state, extra_args=["--dataplane", "inpod", "--zds-socket", zds,
                                                                "--host-netns", node_netns.path,
                                                                *getattr(request, "param", [])])
    peer: PeerProcess | None = None
    try:
        agent.start(wait_ready=False)
        peer = PeerProcess(zds, str(base))
        agent.wait_ready(30)
        chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir,
                               ambient={"run_dir": str(agent.run_dir), "deadline_ms": 5000})
        common = dict(conf_dir=conf_dir, bin_dir=cni_bin_dir, cache_dir=cache_dir, node=node_netns)
        yield Cluster(agent, peer, chain.name, common, state)
    finally:
        if peer is not None:
            peer.stop()
        agent.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def pod_ip(ns: Any) -> str:
    out = sh("ip", "-n", ns.name, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    return out.split()[3].split("/")[0]


def sock_in(ns_path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        worker = NetnsWorker(fd, "pod-sock")
        try:
            return worker.socket(family, kind)
        finally:
            worker.stop()
    finally:
        os.close(fd)
