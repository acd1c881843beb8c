"""End to end: the frozen plugin, run by the libcni driver in real network namespaces, and a real agent.

A netns plays the node (bridge + host-local + ambient-cni chain run inside it); each pod gets its own netns.
Stand-ins (docs/testing.md): the agent uses the file cluster view and the recording dataplane (no ztunnel
here), and the fail-closed matrix has a deliberately hanging or refusing "agent": a socket server written here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir, snapshot, wire
from testbed.agent import AMBIENT, AgentProcess, pod, write_state
from testbed.cni import ChainInfo, write_conflist
from testbed.netns import Netns
from testbed.runners import DriverResult, run_driver

DEADLINE_MS = 800


@pytest.fixture
def env(scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path, cni_bin_dir: Path,
        node_netns: Netns, driver_binary: Path) -> dict[str, Any]:
    state = scratch / "cluster" / "state.yaml"
    state.parent.mkdir()
    write_state(state, {"shop": AMBIENT, "plain": {}, "kube-system": AMBIENT, "istio-system": AMBIENT}, [
        pod("cart-0", uid="uid-cart-0", namespace="shop"),
        pod("optout-0", uid="uid-optout-0", namespace="shop", labels={"istio.io/dataplane-mode": "none"}),
        pod("optin-0", uid="uid-optin-0", namespace="plain", labels=AMBIENT),
        pod("plain-0", uid="uid-plain-0", namespace="plain"),
        pod("coredns-0", uid="uid-coredns-0", namespace="kube-system"),
        pod("ambient-cni-node-abc", uid="uid-ambient-cni-node-abc", namespace="istio-system"),
        pod("ambient-cni-probe-0", uid="uid-ambient-cni-probe-0", namespace="istio-system"),
        # never enrolled: redirecting a hostNetwork pod would rewrite the node's own rules
        pod("hostnet-0", uid="uid-hostnet-0", namespace="shop", hostNetwork=True),
        pod("sidecar-0", uid="uid-sidecar-0", namespace="shop", annotations={"sidecar.istio.io/status": "{}"}),
    ])
    agent = AgentProcess(scratch / "agent", cluster_state=state)
    agent.base.mkdir()
    chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir,
                           ambient={"run_dir": str(agent.run_dir), "deadline_ms": DEADLINE_MS})
    return {"agent": agent, "chain": chain, "conf_dir": conf_dir, "cache_dir": cache_dir, "ipam_dir": ipam_dir,
            "bin_dir": cni_bin_dir, "node": node_netns, "state": state}


@pytest.fixture
def agent(env: dict[str, Any]) -> Iterator[AgentProcess]:
    proc: AgentProcess = env["agent"]
    try:
        yield proc.start()
    finally:
        proc.kill()


def _cni(env: dict[str, Any], command: str, netns: Netns, name: str, namespace: str,
         container_id: str, uid: str = "") -> DriverResult:
    chain: ChainInfo = env["chain"]
    args = None
    if name:
        args = (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid or 'uid-' + name}")
    return run_driver(command, chain.name, netns.path, conf_dir=env["conf_dir"], bin_dir=env["bin_dir"],
                      cache_dir=env["cache_dir"], node=env["node"], container_id=container_id, cni_args=args)


@pytest.mark.parametrize(
    ("name", "namespace", "enrolled"),
    [
        ("cart-0", "shop", True),
        ("optout-0", "shop", False),
        ("optin-0", "plain", True),
        ("plain-0", "plain", False),
        ("coredns-0", "kube-system", False),
        ("ambient-cni-node-abc", "istio-system", False),
        ("hostnet-0", "shop", False),  # enrolled namespace, but hostNetwork: never redirected
        ("sidecar-0", "shop", False),  # enrolled namespace, but a sidecar pod
        ("", "", False),  # not a Kubernetes pod: no K8S_* CNI_ARGS
    ],
)
def test_chain_add_del_through_the_agent(
    env: dict[str, Any], agent: AgentProcess, netns_factory: Callable[..., Netns],
    name: str, namespace: str, enrolled: bool,
) -> None:
    pod_ns = netns_factory("acap")
    cid = f"ac{uuid.uuid4().hex}"
    added = _cni(env, "add", pod_ns, name, namespace, cid)
    assert added.code == 0, added.describe()
    records = agent.records()
    assert [(r["namespace"], r["name"], r["container_id"]) for r in records] == (
        [(namespace, name, cid)] if enrolled else []
    )
    if enrolled:
        assert records[0]["netns_inode"] == os.stat(pod_ns.path).st_ino
        assert records[0]["ips"], "the IPs from prevResult reach the agent"
    deleted = _cni(env, "del", pod_ns, name, namespace, cid)
    assert deleted.code == 0, deleted.describe()
    assert agent.records() == []


def test_agent_restart_between_add_and_del(env: dict[str, Any], agent: AgentProcess,
                                           netns_factory: Callable[..., Netns]) -> None:
    pod_ns = netns_factory("acap")
    cid = f"ac{uuid.uuid4().hex}"
    assert _cni(env, "add", pod_ns, "cart-0", "shop", cid).code == 0
    assert agent.stop() == 0
    agent.start()
    assert [r["container_id"] for r in agent.records()] == [cid]
    assert _cni(env, "del", pod_ns, "cart-0", "shop", cid).code == 0
    assert agent.records() == []


# -- fail closed ------------------------------------------------------------------------------------
class FakeAgent:
    """A socket that accepts and then hangs, or answers every request with a fixed reply."""

    def __init__(self, path: str, reply: dict[str, Any] | None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.reply = reply
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                conn.recv(65536)
                conn.sendall(wire.encode_frame(self.reply))
                conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def _publish(run_dir: Path, data: bytes | None) -> None:
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if data is not None:
        (run_dir / rundir.SNAPSHOT).write_bytes(data)


GOOD_SNAPSHOT = snapshot.encode(snapshot.Snapshot("node-a", 1, {"shop": True}, {}), 0.0)


@pytest.mark.parametrize(
    ("case", "code", "text", "max_s"),
    [
        ("snapshot missing", 11, "enrollment of pod shop/cart-0 is unknown", 1.5),
        ("snapshot corrupt", 11, "is unknown", 1.5),
        ("socket missing", 11, "node agent is unreachable", 3.0),
        ("socket refuses", 11, "node agent is unreachable", 3.0),
        ("agent hangs", 11, f"did not answer add for pod shop/cart-0 within {DEADLINE_MS} ms", 3.0),
        ("negative reply", 101, "ztunnel did not ack", 1.5),
    ],
)
def test_fail_closed(env: dict[str, Any], netns_factory: Callable[..., Netns],
                     case: str, code: int, text: str, max_s: float) -> None:
    run_dir: Path = env["agent"].run_dir
    sock = str(run_dir / rundir.SOCKET)
    fake: FakeAgent | None = None
    _publish(run_dir, {"snapshot missing": None, "snapshot corrupt": b"\xc1garbage"}.get(case, GOOD_SNAPSHOT))
    if case == "socket refuses":
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(sock)
        dead.close()  # the file stays, nobody listens: ECONNREFUSED
    elif case == "agent hangs":
        fake = FakeAgent(sock, None)
    elif case == "negative reply":
        fake = FakeAgent(sock, {"v": 1, "id": "", "ok": False, "enrolled": True, "code": 101,
                                "msg": "ztunnel did not ack the pod: no ztunnel connected"})
    try:
        pod_ns = netns_factory("acap")
        started = time.monotonic()
        result = _cni(env, "add", pod_ns, "cart-0", "shop", f"ac{uuid.uuid4().hex}")
        elapsed = time.monotonic() - started
    finally:
        if fake is not None:
            fake.close()
    assert result.code != 0, result.describe()
    assert result.json is not None and result.json["code"] == code, result.describe()
    assert text in result.json["msg"], result.describe()
    assert elapsed < max_s, f"{case}: {elapsed:.2f}s"


# -- exemptions: the agent's decide (a namespace excluded by one side only never lets a pod start unredirected) --
def _plugin_config(env: dict[str, Any], **keys: Any) -> None:
    """The chain's ambient-cni entry with ``keys`` (a new conflist; the driver runs it by its name)."""
    env["chain"] = write_conflist(env["conf_dir"], "1.0.0", ipam_dir=env["ipam_dir"],
                                  ambient={"run_dir": str(env["agent"].run_dir), "deadline_ms": DEADLINE_MS, **keys})


def _add_del(env: dict[str, Any], agent: AgentProcess, pod_ns: Netns, name: str, namespace: str) -> list[str]:
    """ADD then DEL of the pod through libcni; the names the agent recorded after the ADD."""
    cid = f"ac{uuid.uuid4().hex}"
    added = _cni(env, "add", pod_ns, name, namespace, cid)
    assert added.code == 0, added.describe()
    recorded = [r["name"] for r in agent.records()]
    deleted = _cni(env, "del", pod_ns, name, namespace, cid)
    assert deleted.code == 0, deleted.describe()
    assert agent.records() == []
    return recorded


@pytest.mark.parametrize(("plugin_keys", "name", "namespace"), [
    ({"exclude_namespaces": ["kube-system", "shop"]}, "cart-0", "shop"),
    ({"agent_pod_name_prefix": "ambient-cni-"}, "ambient-cni-probe-0", "istio-system"),
])
def test_a_pod_only_the_plugins_config_exempts_is_enrolled_by_the_agent(
    env: dict[str, Any], netns_factory: Callable[..., Netns], plugin_keys: dict[str, Any], name: str,
    namespace: str,
) -> None:
    agent: AgentProcess = env["agent"].start()
    try:
        _plugin_config(env, **plugin_keys)
        assert _add_del(env, agent, netns_factory("acap"), name, namespace) == [name]
        assert "the plugin's config exempts this pod but the node agent does not" in \
            (agent.run_dir / rundir.PLUGIN_LOG).read_text()
    finally:
        agent.kill()


def test_a_namespace_only_the_agent_excludes_passes_without_asking_it(
    env: dict[str, Any], netns_factory: Callable[..., Netns],
) -> None:
    agent: AgentProcess = env["agent"]
    agent.extra_args += ["--exclude-namespaces", "kube-system,shop"]
    agent.start()
    try:
        published = snapshot.read(str(agent.run_dir / rundir.SNAPSHOT)).exemptions
        assert published is not None and set(published.exclude_namespaces) == {"kube-system", "shop"}
        assert _add_del(env, agent, netns_factory("acap"), "cart-0", "shop") == []
        assert agent.metric("ambient_cni_agent_requests_total", op="add", result="not_enrolled") == 0
        assert "not enrolled: namespace 'shop' is excluded" in (agent.run_dir / rundir.PLUGIN_LOG).read_text()
    finally:
        agent.kill()
