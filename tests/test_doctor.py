"""``ambient-cni doctor`` against a real enrolled pod (full chain: driver -> plugin -> agent -> zds_peer, the
probe path in the test's node netns): passes when all is in place, fails with the missing rule, listener or
probe-set entry shown otherwise."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from nodeagent.dataplane.hostrules import set_entry
from testbed.cluster import Cluster
from testbed.netns import Netns
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.pods import edit_node_sets, node_sets
from testbed.poll import wait_for


def doctor(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VENV_PYTHON), "-m", "ambient_cni", "doctor", *args, "--run-dir", str(cluster.agent.run_dir),
         "--health-addr", cluster.agent.health, "--peer-log", cluster.peer.log_file],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


# a long reconcile interval: the agent would otherwise repair the probe-set entry this test removes
@pytest.mark.parametrize("cluster", [["--reconcile-interval", "600"]], indirect=True)
def test_doctor_pass_then_fail(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    ns, uid = cluster.add_pod(netns_factory, "curl")
    ok = doctor(cluster, "--pod", "ambient-test/curl")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "agent's last verification: " in ok.stdout, ok.stdout
    assert "[PASS] 1. logs" in ok.stdout and "[PASS] 2. sockets" in ok.stdout and "[PASS] 3. iptables" in ok.stdout
    assert "[PASS] 4. probe path" in ok.stdout
    assert "received netns, starting proxy" in ok.stdout and uid in ok.stdout
    assert "0.0.0.0:15006" in ok.stdout
    assert "redirection mode: tproxy (from the agent)" in ok.stdout and "DNS capture: off" in ok.stdout
    assert "POSTROUTING rule 1 -j ISTIO_POSTRT" in ok.stdout and f"comment {uid}" in ok.stdout
    assert "Traceback" not in ok.stderr

    by_netns = doctor(cluster, "--netns", ns.path)
    assert by_netns.returncode == 0, by_netns.stdout

    # the pod's entry disappears from the node's probe set -> check 4 fails and says which IP
    node = cluster.agent.argv()[cluster.agent.argv().index("--host-netns") + 1]
    (ip,) = node_sets(node)
    edit_node_sets(node, lambda sets: sets.delete(set_entry(ip)))
    no_entry = doctor(cluster, "--pod", "ambient-test/curl")
    assert no_entry.returncode == 1 and "[FAIL] 4. probe path" in no_entry.stdout
    assert f"istio-inpod-probes-v4: {ip} missing" in no_entry.stdout

    # a rule goes missing -> FAIL showing that line
    ns.run("iptables", "-t", "nat", "-D", "ISTIO_OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x111/0xfff", "-j",
           "ACCEPT")
    bad = doctor(cluster, "--pod", "ambient-test/curl")
    assert bad.returncode == 1
    assert "[FAIL] 3. iptables" in bad.stdout
    assert "missing  -A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT" in bad.stdout
    assert "the agent repairs it under DROP guardrails at its next reconcile pass" in bad.stdout

    # the proxy stops -> the listeners are gone -> FAIL
    cluster.peer.stop()
    gone = doctor(cluster, "--pod", "ambient-test/curl")
    assert gone.returncode == 1
    assert "[FAIL] 2. sockets" in gone.stdout and "nothing listens on 15001" in gone.stdout


def test_doctor_clear_errors(cluster: Cluster) -> None:
    missing = doctor(cluster, "--pod", "ambient-test/nope")
    assert missing.returncode != 0 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    host = doctor(cluster, "--netns", "/proc/1/ns/net")
    # refused: either recognised as the host's netns, or not even openable (pid 1 in another user namespace)
    assert host.returncode != 0 and "/proc/1/ns/net" in host.stderr and "Traceback" not in host.stderr
    both = doctor(cluster, "--netns", "/x", "--pod", "a/b")
    assert both.returncode == 2 and "exactly one" in both.stderr


def test_doctor_says_when_the_agent_last_verified_the_pod(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    cluster.add_pod(netns_factory, "web")
    wait_for(lambda: all(r["verified_at"] for r in cluster.agent.records()), what="the agent verified the pod")
    out = doctor(cluster, "--pod", "ambient-test/web")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "agent's last verification: 20" in out.stdout and "s ago): rules as expected" in out.stdout, out.stdout
