"""The probe sets and the node-side rule through a real agent process (``--dataplane inpod --host-netns <test
node netns>``, file cluster view, the ZDS peer, real pod netns, requests over the wire protocol).

The sets hold exactly the enrolled pods' IPs with their UIDs through ADD, DEL, IP reuse by a new pod, an agent
restart and a flushed set (repaired by the reconcile); the prune waits while an enrolled pod has no known IP;
the rule goes back to POSTROUTING position 1 when something moved it; ``ambient-cni uninstall`` and the agent's
uninstall path remove both. Nothing here touches this machine's own netns (checked by ``conftest``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.dataplane.hostrules import set_entry
from nodeagent.dataplane.probesets import ProbeSets
from nodeagent.dataplane.rules import Family
from testbed.agent import AMBIENT, AgentProcess, call, pod, request, write_state
from testbed.netns import Netns
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.peer import PeerProcess
from testbed.pods import edit_node_sets, node_sets
from testbed.poll import wait_for

UIDS = {name: f"uid-{name}" for name in ("a", "b", "c", "d")}


def read_sets(node: Netns) -> dict[str, str]:
    return node_sets(node.path)


def edit_sets(node: Netns, fn: Callable[[ProbeSets], Any]) -> Any:
    return edit_node_sets(node.path, fn)


def nat_rules(node: Netns, v6: bool = False) -> str:
    return node.run("ip6tables-save" if v6 else "iptables-save", "-t", "nat").stdout


def host_rule_first(node: Netns, v6: bool = False) -> bool:
    post = [ln for ln in nat_rules(node, v6).splitlines() if ln.startswith("-A POSTROUTING")]
    return bool(post) and post[0] == "-A POSTROUTING -j ISTIO_POSTRT" and sum("ISTIO_POSTRT" in ln for ln in post) == 1


@pytest.fixture
def env(netns_factory: Callable[..., Netns], scratch: Path) -> Iterator[dict[str, Any]]:
    node = netns_factory("acnode")
    state = scratch / "cluster.yaml"
    pods = [pod(n, "shop", uid=u, nodeName="node-a") for n, u in UIDS.items()]
    write_state(state, {"shop": AMBIENT}, pods)
    base = Path(tempfile.mkdtemp(prefix="acdh"))
    zds = str(base / "zds.sock")
    agent = AgentProcess(base, cluster_state=state,
                         extra_args=["--dataplane", "inpod", "--zds-socket", zds, "--host-netns", node.path])
    peer = None
    try:
        agent.start(wait_ready=False)
        peer = PeerProcess(zds, str(base))
        agent.wait_ready(30)
        yield {"node": node, "agent": agent, "peer": peer, "base": base, "pods": {n: netns_factory("acpod")
                                                                                 for n in UIDS}}
    finally:
        if peer is not None:
            peer.stop()
        agent.kill()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def add(env: dict[str, Any], name: str, ips: list[str], uid: str | None = None) -> dict[str, Any]:
    reply = call(env["agent"].sock, request("add", name, "shop", uid=uid or UIDS[name], netns=env["pods"][name].path,
                                            container_id=f"c-{name}", ips=ips))
    assert reply["ok"] is True and reply["enrolled"] is True, reply
    return reply


def delete(env: dict[str, Any], name: str) -> None:
    reply = call(env["agent"].sock, request("del", name, "shop", uid=UIDS[name], netns=env["pods"][name].path,
                                            container_id=f"c-{name}"))
    assert reply["ok"] is True, reply


def test_sets_follow_add_del_reuse_restart_and_flush(env: dict[str, Any]) -> None:
    node, agent = env["node"], env["agent"]
    assert host_rule_first(node) and host_rule_first(node, v6=True)
    assert read_sets(node) == {}

    add(env, "a", ["10.50.0.2/24", "fd00:50::2/64"])
    assert read_sets(node) == {"10.50.0.2": "uid-a", "fd00:50::2": "uid-a"}  # in place before ADD answered
    add(env, "b", ["10.50.0.3/24", "::ffff:10.50.0.4"])
    assert read_sets(node) == {"10.50.0.2": "uid-a", "fd00:50::2": "uid-a", "10.50.0.3": "uid-b",
                               "10.50.0.4": "uid-b"}
    delete(env, "a")
    assert read_sets(node) == {"10.50.0.3": "uid-b", "10.50.0.4": "uid-b"}

    # IP reuse: a new pod got b's address before b's DEL arrived; b's DEL must not evict it
    add(env, "c", ["10.50.0.3/24"])
    assert read_sets(node) == {"10.50.0.3": "uid-c", "10.50.0.4": "uid-b"}
    delete(env, "b")
    assert read_sets(node) == {"10.50.0.3": "uid-c"}

    # restart: nothing removed while the agent is down, nothing duplicated after
    assert agent.stop() == 0
    assert read_sets(node) == {"10.50.0.3": "uid-c"}
    assert host_rule_first(node) and host_rule_first(node, v6=True)
    agent.start()
    agent.wait_reconcile_passes(2)  # whatever a pass would remove or add is done by then
    assert read_sets(node) == {"10.50.0.3": "uid-c"}
    assert host_rule_first(node) and host_rule_first(node, v6=True)

    # a flushed set and a lost rule: the reconcile puts both back (the rule at position 1)
    edit_sets(node, lambda s: s.flush(Family.V4))
    node.run("iptables", "-t", "nat", "-D", "POSTROUTING", "-j", "ISTIO_POSTRT")
    node.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "ACCEPT")
    node.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "ISTIO_POSTRT")
    wait_for(lambda: read_sets(node) == {"10.50.0.3": "uid-c"}, timeout=10, what="set repaired")
    wait_for(lambda: host_rule_first(node), timeout=10, what="rule back at position 1")
    assert any(line.get("msg") == "probe path reconciled" and line.get("rules_repaired") == ["v4"]
               for line in agent.log_lines())

    # a stale entry (no enrolled pod owns it) is pruned
    edit_sets(node, lambda s: s.upsert(set_entry("10.50.0.99"), "uid-ghost"))  # type: ignore[arg-type]
    wait_for(lambda: "10.50.0.99" not in read_sets(node), timeout=10, what="stale entry pruned")
    assert read_sets(node) == {"10.50.0.3": "uid-c"}


def test_prune_waits_while_an_enrolled_pod_has_no_known_ip(env: dict[str, Any]) -> None:
    node = env["node"]
    add(env, "a", ["10.50.0.2/24"])
    add(env, "d", [])  # no IP in the request and none in its (bare) netns: unknown
    edit_sets(node, lambda s: s.upsert(set_entry("10.50.0.98"), "uid-maybe-d"))  # type: ignore[arg-type]
    env["agent"].wait_reconcile_passes(3)
    assert read_sets(node) == {"10.50.0.2": "uid-a", "10.50.0.98": "uid-maybe-d"}
    assert any(line.get("prune_skipped") is True for line in env["agent"].log_lines())
    delete(env, "d")
    wait_for(lambda: read_sets(node) == {"10.50.0.2": "uid-a"}, timeout=10, what="pruned once all IPs known")


def test_node_netns_refused_as_a_pod_netns(env: dict[str, Any]) -> None:
    node = env["node"]
    before = nat_rules(node)
    reply = call(env["agent"].sock, request("add", "a", "shop", uid="uid-a", netns=node.path, container_id="c-x"))
    assert reply["ok"] is False and reply["code"] == 101, reply
    assert "node's network namespace" in reply["msg"]
    assert nat_rules(node) == before and read_sets(node) == {}


def test_ambient_cni_uninstall_removes_the_probe_path(env: dict[str, Any], scratch: Path) -> None:
    node = env["node"]
    add(env, "a", ["10.50.0.2/24"])
    env["agent"].stop()
    conf, bindir = scratch / "net.d", scratch / "bin"
    conf.mkdir()
    bindir.mkdir()
    proc = subprocess.run(
        [str(VENV_PYTHON), "-m", "ambient_cni", "uninstall", "--conf-dir", str(conf), "--bin-dir", str(bindir),
         "--ready-file", "none", "--host-netns", node.path],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("AMBIENT_CNI_")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "rules v4" in proc.stderr and "set istio-inpod-probes-v4" in proc.stderr
    assert "ISTIO" not in nat_rules(node) and "ISTIO" not in nat_rules(node, True)
    assert read_sets(node) == {} and not edit_sets(node, lambda s: s.exists(Family.V4))
    again = subprocess.run(proc.args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "nothing to remove" in again.stderr


_AGENT_UNINSTALLING = textwrap.dedent("""
    import sys
    from nodeagent.agent import Agent
    from nodeagent.config import AgentConfig
    run_dir, state_dir, state, zds, node = sys.argv[1:6]
    config = AgentConfig(run_dir=run_dir, state_dir=state_dir, cluster_state=state, node_name="node-a",
                         zds_socket=zds, health_addr="127.0.0.1:0", host_netns=node, uninstall_on_stop=True)
    sys.exit(Agent(config).run())
""")


def test_agent_uninstall_path_removes_the_probe_path(netns_factory: Callable[..., Netns], scratch: Path) -> None:
    """``AgentConfig.uninstall_on_stop`` (what a real uninstall of the node component sets): the probe path
    is removed after the drain; a plain stop (the other tests) keeps it."""
    node = netns_factory("acnode")
    state = scratch / "cluster.yaml"
    write_state(state, {"shop": AMBIENT}, [])
    base = Path(tempfile.mkdtemp(prefix="acdu"))
    err = open(base / "agent.stderr", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(VENV_PYTHON), "-c", _AGENT_UNINSTALLING, str(base / "run"), str(base / "state"), str(state),
         str(base / "zds.sock"), node.path],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err,
    )
    try:
        try:
            wait_for(lambda: host_rule_first(node) or proc.poll() is not None, timeout=30, what="probe path")
        finally:
            err.close()
        assert proc.poll() is None, (base / "agent.stderr").read_text()[-2000:]
        assert edit_sets(node, lambda s: s.exists(Family.V4))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "ISTIO" not in nat_rules(node) and "ISTIO" not in nat_rules(node, True)
        assert not edit_sets(node, lambda s: s.exists(Family.V4) or s.exists(Family.V6))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", str(base)], check=False)

