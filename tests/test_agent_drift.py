"""Never silently out of the mesh: the agent finds and repairs drift in enrolled pods on its own.

Full chain (libcni driver -> frozen plugin -> agent with the inpod dataplane and ``--reconcile-interval 1`` ->
the real ``zds_peer`` as ztunnel), real netns, bridge, iptables and TCP. Someone flushes a pod's nat table or
deletes its ip rule, or the pod's netns is replaced without a CNI event, or the rules drift while the agent is
down: within the interval + 1 s the pod is repaired (under DROP guardrails) or re-enrolled, real TCP goes
through the proxy again, and the repair is counted and logged with the pod. Plus the guardrails themselves,
applied in real netns: while they are in place no TCP flows, and they lift cleanly.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from cni_plugin import rundir
from nodeagent.dataplane import drift, guardrails, rules
from nodeagent.dataplane.api import PodWork
from nodeagent.dataplane.drift import RouteFacts
from nodeagent.dataplane.inpod import InPodDataplane
from nodeagent.dataplane.rules import Family
from testbed.agent import AgentProcess
from testbed.cluster import Cluster
from testbed.netns import Netns
from testbed.peer import PeerProcess
from testbed.pods import Node, Pod, TcpServer, pod_ip, tcp_exchange
from testbed.poll import wait_for
from tests.dataplane_fixtures import SERVER_PORT as PORT

INTERVAL_S = 1.0  # AgentProcess runs the agent with --reconcile-interval 1


def metric(agent: AgentProcess, name: str) -> float:
    _status, text = agent.http("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def redirection_ok(ns: Netns) -> bool:
    save = ns.iptables_save()
    return (all(d.ok for d in rules.diff_rules(save, Family.V4)) and not guardrails.present(save)
            and "fwmark 0x111/0xfff lookup 100" in ns.run("ip", "rule").stdout)


def wait_repaired(ns: Netns, budget_s: float) -> float:
    started = time.monotonic()
    wait_for(lambda: redirection_ok(ns), timeout=budget_s + 2, what="the redirection repaired")
    return time.monotonic() - started


def test_a_flushed_nat_table_is_repaired_and_traffic_goes_through_the_proxy_again(
    cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]
) -> None:
    a, b, server = two_pods
    try:
        a.ns.run("iptables", "-t", "nat", "-F")  # A's outbound capture is gone: its traffic would skip 15001
        took = wait_repaired(a.ns, INTERVAL_S + 1)
        assert took <= INTERVAL_S + 1, f"repaired after {took:.2f} s"
        assert tcp_exchange(a, (b.ip, PORT), b"again") == b"echo:again"
        wait_for(lambda: cluster.peer.port_count(a.uid, 15001) == 2, what="A's proxy carried the new connection")
        wait_for(lambda: metric(cluster.agent, 'ambient_cni_agent_drift_repairs_total{phase="periodic"}') == 1.0,
                 what="the repair counted (right after the rules are back)")
        line = next(ln for ln in cluster.agent.log_lines() if ln["msg"] == "redirection drift repaired")
        assert line["pod_name"] == "client" and line["pod_uid"] == a.uid
        assert any("iptables -t nat: missing  -A OUTPUT -j ISTIO_OUTPUT" in d for d in line["drift"]), line
    finally:
        server.close()


def test_a_deleted_ip_rule_is_repaired(cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]) -> None:
    a, b, server = two_pods
    try:
        b.ns.run("ip", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")  # B's TPROXY has no route now
        took = wait_repaired(b.ns, INTERVAL_S + 1)
        assert took <= INTERVAL_S + 1, f"repaired after {took:.2f} s"
        assert tcp_exchange(a, (b.ip, PORT), b"in") == b"echo:in"
        wait_for(lambda: cluster.peer.port_count(b.uid, 15006) == 2, what="B's inbound proxy carried it")
        wait_for(lambda: metric(cluster.agent, 'ambient_cni_agent_drift_repairs_total{phase="periodic"}') == 1.0,
                 what="the repair counted (right after the rules are back)")
        line = next(ln for ln in cluster.agent.log_lines() if ln["msg"] == "redirection drift repaired")
        assert line["pod_name"] == "server" and "ip rule: missing  fwmark 0x111/0xfff lookup 100" in line["drift"]
    finally:
        server.close()


def test_a_replaced_netns_is_re_enrolled(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    ns, uid = cluster.add_pod(netns_factory, "web")
    ip = pod_ip(ns)
    agent = cluster.agent
    (old,) = agent.records()
    # the pod's netns is replaced at the same path, without a CNI event, and holds the pod's address
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    replacement = ns  # the same name, a new netns behind it
    replacement.run("ip", "link", "set", "lo", "up")
    replacement.run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    started = time.monotonic()
    wait_for(lambda: [r["netns_inode"] for r in agent.records()] not in ([], [old["netns_inode"]]),
             timeout=INTERVAL_S + 3, what="the record re-enrolled on the new netns")
    assert time.monotonic() - started <= INTERVAL_S + 1
    (new,) = agent.records()
    assert new["uid"] == uid and new["netns_path"] == ns.path and new["source"] == "reconcile"
    assert redirection_ok(replacement)
    wait_for(lambda: cluster.peer.log().count(f'pod WorkloadUid("{uid}") received netns, starting proxy') == 2,
             what="ztunnel got the new netns (ZDS Add with the new fd)")

    def counted() -> bool:
        # one pass saw the new netns ("reenroll"), or, on a loaded machine, a pass ran while the path was empty
        # (between `ip netns del` and `add`): the record was dropped, then the pod enrolled again from the view
        reenroll = metric(agent, 'ambient_cni_agent_reconcile_actions_total{action="reenroll"}')
        removed = metric(agent, 'ambient_cni_agent_reconcile_actions_total{action="remove"}')
        enrolled = metric(agent, 'ambient_cni_agent_reconcile_actions_total{action="enroll"}')
        return reenroll == 1.0 or (removed == 1.0 and enrolled == 1.0)

    wait_for(counted, what="the re-enrollment counted (at the end of the pass)")


def test_a_gone_netns_is_dropped_from_ztunnel(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    ns, uid = cluster.add_pod(netns_factory, "gone")
    hint = cluster.agent.run_dir / rundir.HINTS / "ambient-test_gone"
    assert hint.exists()
    hint.unlink()  # the sandbox vanishes without a CNI DEL (and without a trace the agent could follow)
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    wait_for(lambda: cluster.agent.records() == [], timeout=INTERVAL_S + 3, what="the record dropped")
    wait_for(lambda: f'pod delete request, draining proxy uid="{uid}"' in cluster.peer.log(),
             what="ZDS Del sent to ztunnel")


def test_drift_made_while_the_agent_was_down_is_repaired_at_start(
    cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]
) -> None:
    a, b, server = two_pods
    agent = cluster.agent
    try:
        assert agent.stop() == 0
        a.ns.run("iptables", "-t", "mangle", "-F", "ISTIO_PRERT")
        a.ns.run("ip", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")
        agent.start(wait_ready=False)
        agent.wait_ready(30)
        wait_for(lambda: redirection_ok(a.ns), timeout=10, what="repaired by the start-up reconcile")
        wait_for(lambda: metric(agent, 'ambient_cni_agent_drift_repairs_total{phase="restore"}') == 1.0,
                 what="counted as a start-up repair")
        wait_for(lambda: exchange_or_none(a, (b.ip, PORT), b"back") == b"echo:back", timeout=10,
                 what="traffic once ztunnel has the pods again")
        wait_for(lambda: cluster.peer.port_count(a.uid, 15001) >= 1, what="through A's proxy")
        # ztunnel's first snapshot waited for the take-over: it was never told to drop the enrolled pods
        assert "not in snapshot, draining proxy" not in cluster.peer.log(), cluster.peer.log()
    finally:
        server.close()


# -- the guardrails, pure and applied -----------------------------------------------------------------------
def test_guardrail_inputs_are_single_transactions_and_idempotent() -> None:
    empty = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    text = guardrails.install_input(empty)
    assert text.count("COMMIT") == 1
    assert "-I INPUT 1 -j AMBIENT_GUARD" in text and "-A AMBIENT_GUARD -p udp -j DROP" in text
    guarded = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:AMBIENT_GUARD - [0:0]\n"
               "-A INPUT -j AMBIENT_GUARD\n-A INPUT -j AMBIENT_GUARD\n-A OUTPUT -j AMBIENT_GUARD\n"
               "-A AMBIENT_GUARD -p tcp -j DROP\nCOMMIT\n")
    again = guardrails.install_input(guarded)
    assert again.count("-D INPUT -j AMBIENT_GUARD") == 2 and again.count("-I INPUT 1 -j AMBIENT_GUARD") == 1
    assert guardrails.present(guarded) and not guardrails.present(empty)
    assert guardrails.lift_input(empty) == ""
    lift = guardrails.lift_input(guarded)
    assert lift.count("-D INPUT -j AMBIENT_GUARD") == 2 and "-X AMBIENT_GUARD" in lift and lift.count("COMMIT") == 1
    problems = drift.find_drift({Family.V4: guarded}, {Family.V4: RouteFacts(rule=True, route=False)})
    assert "iptables -t filter: guardrails still in place (AMBIENT_GUARD)" in problems
    assert "ip route table 100: missing  local default dev lo" in problems
    assert drift.find_drift(None, {Family.V4: RouteFacts(True, True)}) == []


def test_guardrails_stop_tcp_and_lift_cleanly(node: Node) -> None:
    a, b = node.add_pod("a"), node.add_pod("b")
    server = TcpServer(b, PORT)
    try:
        assert tcp_exchange(a, (b.ip, PORT)) == b"echo:hi"
        before = a.ns.iptables_save()
        a.ns.run("iptables-restore", "--noflush", stdin=guardrails.install_input(before))
        with pytest.raises(OSError):
            tcp_exchange(a, (b.ip, PORT), timeout=1.5)
        a.ns.run("iptables-restore", "--noflush", stdin=guardrails.lift_input(a.ns.iptables_save()))
        assert not guardrails.present(a.ns.iptables_save())
        assert tcp_exchange(a, (b.ip, PORT), b"open") == b"echo:open"
    finally:
        server.close()


def test_the_dataplane_verifies_and_repairs_both_families(node: Node, tmpdir_short: str) -> None:
    """InPodDataplane.verify / repair directly, on a dual-stack pod: drift in ip6tables and in the v6 route is
    found, the repair restores both families and lifts its guardrails, and a healthy pod verifies clean twice
    (the second time from the nf_tables generation alone)."""
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), ack_timeout_s=5.0)
    peer = PeerProcess(dp.zds.path, tmpdir_short)
    try:
        wait_for(lambda: dp.ready()[0], timeout=20, what="peer connected")
        pod = node.add_pod("dual")
        work = PodWork(uid=pod.uid, name=pod.name, namespace="ambient-test", netns_path=pod.ns.path,
                       ips=(f"{pod.ip}/24", f"{pod.ip6}/64"), netns_inode=os.stat(pod.ns.path).st_ino,
                       netns_dev=os.stat(pod.ns.path).st_dev)
        dp.add(work, time.monotonic() + 10)
        assert dp.verify([work]) == [[]]
        assert dp.verify([work]) == [[]]
        pod.ns.run("ip6tables", "-t", "mangle", "-F", "ISTIO_PRERT")
        pod.ns.run("ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100")
        (problems,) = dp.verify([work])
        assert problems is not None
        assert any(p.startswith("ip6tables -t mangle: missing  -A ISTIO_PRERT") for p in problems), problems
        assert "ip -6 route table 100: missing  local default dev lo" in problems
        assert not any(p.startswith("iptables ") for p in problems), problems
        assert dp.repair(work) == problems
        assert dp.verify([work]) == [[]]
        v6 = pod.ns.iptables_save(v6=True)
        assert all(d.ok for d in rules.diff_rules(v6, Family.V6)) and not guardrails.present(v6)
        assert dp.repair(work) == []  # nothing left to repair: nothing touched
    finally:
        peer.stop()
        dp.close()


@pytest.mark.parametrize("cluster", [["--redirect-mode", "redirect", "--dns-capture"]], indirect=True)
def test_drift_is_judged_against_the_pods_variant(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    """REDIRECT mode with DNS capture: a flushed nat table (REDIRECT to 15001/15006 and DNS to 15053) is found
    and rewritten with that variant's rules, not the default ones."""
    ns, _uid = cluster.add_pod(netns_factory, "web")
    pod_ns = ns
    variant = rules.Variant(rules.RedirectMode.REDIRECT, dns_capture=True)

    def variant_ok() -> bool:
        save = pod_ns.iptables_save()
        return all(d.ok for d in rules.diff_rules(save, Family.V4, variant=variant)) and not guardrails.present(save)

    assert variant_ok()
    pod_ns.run("iptables", "-t", "nat", "-F")
    started = time.monotonic()
    wait_for(variant_ok, timeout=INTERVAL_S + 3, what="the variant's rules back")
    assert time.monotonic() - started <= INTERVAL_S + 1
    wait_for(lambda: metric(cluster.agent, 'ambient_cni_agent_drift_repairs_total{phase="periodic"}') == 1.0,
             what="the repair counted (right after the rules are back)")


def exchange_or_none(pod: Pod, dest: tuple[str, int], payload: bytes) -> bytes | None:
    """One exchange, or None while it is refused (ztunnel's listeners for the pod are not back yet)."""
    try:
        return tcp_exchange(pod, dest, payload, timeout=2)
    except OSError:
        return None
