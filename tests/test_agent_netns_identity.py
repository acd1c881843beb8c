"""A netns path is only a name: the agent acts on the netns it recorded (inode and device), never on whatever
sits at the path now (real agent with the inpod dataplane, real zds_peer as ztunnel, the frozen plugin through the
libcni driver in a node netns, real netns).

The story: pod A is enrolled in netns X; the node loses A's sandbox while the agent is down (no CNI DEL), and the
runtime creates pod B's sandbox at the same path X. Before, the restarted agent reopened X, took it for A's
"replaced" netns, removed the rules in it and handed it to ztunnel as pod A.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from nodeagent.dataplane import rules
from nodeagent.dataplane.rules import Family
from testbed import netns as netns_mod
from testbed.agent import AgentProcess
from testbed.cluster import Cluster
from testbed.netns import Netns
from testbed.poll import wait_for


def run_in(ns: Netns, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={ns.path}", *argv], capture_output=True, text=True, check=True).stdout


def received(cluster: Cluster, uid: str) -> int:
    return cluster.peer.log().count(f'pod WorkloadUid("{uid}") received netns, starting proxy')


def passes(agent: AgentProcess) -> float:
    _status, metrics = agent.http("/metrics")
    for line in metrics.splitlines():
        if line.startswith("ambient_cni_agent_reconcile_passes_total "):
            return float(line.split()[1])
    return 0.0


def test_a_reused_netns_path_is_never_taken_for_the_old_pod(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    x = netns_factory("acid")
    _, uid_a = cluster.add_pod(lambda *_: x, "pod-a")
    assert received(cluster, uid_a) == 1
    agent = cluster.agent
    assert agent.stop() == 0

    # A's sandbox vanishes without a DEL; B's sandbox gets the very same path
    netns_mod.remove(x.name)
    netns_mod.create(x.name)
    agent.start(wait_ready=False)
    agent.wait_ready(30)
    before = passes(agent)
    wait_for(lambda: passes(agent) >= before + 2, timeout=15, what="two reconcile passes after the restart")
    assert received(cluster, uid_a) == 1, "the restarted agent handed the netns now at X to ztunnel as pod A"
    _, uid_b = cluster.add_pod(lambda *_: x, "pod-b")
    before = passes(agent)
    wait_for(lambda: passes(agent) >= before + 2, timeout=15, what="two reconcile passes after B's ADD")

    # B's redirection in X is intact ...
    save = run_in(x, "iptables-save")
    assert all(d.ok for d in rules.diff_rules(save, Family.V4)), save
    assert "fwmark 0x111/0xfff lookup 100" in run_in(x, "ip", "rule")
    # ... X went to ztunnel as B only, never again as A, and A's stale record is gone
    assert received(cluster, uid_b) >= 1
    assert received(cluster, uid_a) == 1, cluster.peer.log()
    records = {r["name"]: r for r in agent.records()}
    assert set(records) == {"pod-b"}, records
    refused = [line for line in agent.log_lines() if line.get("pod_uid") == uid_a and "refused" in str(line)]
    assert refused, "the agent says why it did not follow A to X"
