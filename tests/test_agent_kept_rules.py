"""A CNI DEL keeps an enrolled pod's in-pod rules while its netns lives: ztunnel drops the pod (its listeners
close, so redirected traffic is refused, never unredirected); a re-ADD of the same netns enrolls it again; without
one, the rules go after the grace, on the verified netns only; the pending clean-up survives an agent restart.

Full chain where it matters (libcni driver -> frozen plugin -> agent ``--dataplane inpod --reconcile-interval 1``
-> the real ``zds_peer`` as ztunnel), real netns, bridge, iptables and TCP. A DEL sent to the agent alone (on its
socket, as the plugin does) stands for the moment libcni has run our DEL but not yet the bridge's, which deletes
the pod's interface: the pod still has ``eth0`` then.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir
from nodeagent.core import KEPT_RULES_GRACE_S
from nodeagent.dataplane import guardrails, rules
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.dataplane.inpod import InPodDataplane
from nodeagent.dataplane.rules import Family
from nodeagent.store import KeptRules, PodRecord, PodStore
from testbed.agent import AgentProcess, call, request, write_state
from testbed.cluster import AMBIENT_NS, NAMESPACES, Cluster
from testbed.netns import Netns
from testbed.peer import PeerProcess
from testbed.pods import Node, Pod, TcpServer, as_pod, listening_ports, node_sets, tcp_exchange
from testbed.poll import wait_for
from testbed.runners import run_driver
from tests.dataplane_fixtures import SERVER_PORT as PORT

GRACE_S = KEPT_RULES_GRACE_S
INTERVAL_S = 1.0  # AgentProcess runs the agent with --reconcile-interval 1
SEED = rules.normalise_save((Path(__file__).parent / "golden" / "dataplane" / "seed_iptables_save.txt").read_text())


def ours(save: str) -> list[str]:
    return [line for line in rules.normalise_save(save).splitlines() if "ISTIO" in line]


def seed_rules_in(ns: Netns) -> bool:
    """Exactly the seed's chains and jumps (one copy), no guardrails, and the TPROXY ip rule."""
    save = ns.iptables_save()
    return (ours(save) == ours(SEED) and not guardrails.present(save)
            and "fwmark 0x111/0xfff lookup 100" in ns.run("ip", "rule").stdout)


def no_rules_in(ns: Netns) -> bool:
    return "ISTIO" not in ns.iptables_save() and "0x111" not in ns.run("ip", "rule").stdout


def kept_metric(agent: AgentProcess, event: str) -> float:
    return agent.metric("ambient_cni_agent_kept_rules_total", event=event)


def logged(agent: AgentProcess, prefix: str) -> dict[str, Any]:
    """The agent's first log line whose message starts with ``prefix`` (empty while there is none)."""
    return next((ln for ln in agent.log_lines() if str(ln.get("msg", "")).startswith(prefix)), {})


def kept_rows(agent: AgentProcess) -> list[dict[str, Any]]:
    status, body = agent.http("/debug/kept-rules")
    assert status == 200, body
    rows: list[dict[str, Any]] = json.loads(body)
    return rows


def agent_del(chain: Cluster, pod: Pod) -> None:
    """Our DEL alone, as libcni runs it first (the bridge's DEL, which deletes eth0, comes after it): the plugin
    removes the pod's netns hint and tells the agent."""
    (chain.agent.run_dir / rundir.HINTS / f"{AMBIENT_NS}_{pod.name}").unlink()
    reply = call(chain.agent.sock, request("del", pod.name, AMBIENT_NS, uid=pod.uid, netns=pod.ns.path,
                                             container_id=f"c-{pod.name}"))
    assert reply["ok"] is True and reply["enrolled"] is True, reply


def chain_readd(chain: Cluster, ns: Netns, name: str, uid: str) -> None:
    """The runtime's ADD again for the same container and the same netns (``podman network reload``)."""
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={AMBIENT_NS};K8S_POD_NAME={name};K8S_POD_UID={uid}"
    res = run_driver("add", chain.conf_name, ns.path, container_id=f"c-{name}", cni_args=args, **chain.common)
    assert res.code == 0, res.describe()


def received_netns(chain: Cluster, uid: str) -> int:
    return chain.peer.log().count(f'pod WorkloadUid("{uid}") received netns, starting proxy')


def set_pod_labels(chain: Cluster, name: str, labels: dict[str, str]) -> None:
    for entry in chain.pods:
        if entry["name"] == name:
            entry["labels"] = labels
    write_state(chain.state_file, NAMESPACES, chain.pods)


def test_del_keeps_the_rules_ztunnel_drops_the_pod_and_the_grace_removes_them(
    cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]
) -> None:
    a, b, server = two_pods
    agent = cluster.agent
    node_path = agent.argv()[agent.argv().index("--host-netns") + 1]
    try:
        inode = os.stat(a.ns.path).st_ino
        deleted_at = time.monotonic()
        agent_del(cluster, a)
        # the rules stay, the pod is out of ztunnel, the node no longer lets probes through to it
        assert seed_rules_in(a.ns)
        assert [r["name"] for r in agent.records()] == ["server"]
        (row,) = kept_rows(agent)
        assert (row["name"], row["uid"], row["netns_inode"]) == ("client", a.uid, inode)
        assert os.path.realpath(row["netns_path"]) == os.path.realpath(a.ns.path)
        assert a.ip not in node_sets(node_path)
        wait_for(lambda: f'pod delete request, draining proxy uid="{a.uid}"' in cluster.peer.log(),
                 what="ZDS Del sent to ztunnel")
        wait_for(lambda: not {15001, 15006, 15008} & listening_ports(a.ns), what="A's listeners closed")
        # A still has eth0 and an address: its connection is refused by its own rules, never sent around them
        seen = len(server.seen)
        with pytest.raises(ConnectionRefusedError):
            tcp_exchange(a, (b.ip, PORT), b"escape?")
        assert len(server.seen) == seen and cluster.peer.port_count(a.uid, 15001) == 1
        assert kept_metric(agent, "kept") == 1.0
        # no re-ADD: the grace ends, the reconciler removes the rules from the verified netns
        wait_for(lambda: no_rules_in(a.ns), timeout=GRACE_S + 5, what="the kept rules removed")
        took = time.monotonic() - deleted_at
        assert GRACE_S - 0.5 <= took <= GRACE_S + INTERVAL_S + 1, f"removed {took:.2f} s after the DEL"
        # then (right after the rules) the row goes, the removal is logged and counted
        line = wait_for(lambda: logged(agent, "rules a DEL kept are removed"), what="the removal logged")
        assert kept_rows(agent) == []
        wait_for(lambda: kept_metric(agent, "removed") == 1.0, what="the removal counted")
        assert line["pod_name"] == "client" and line["pod_uid"] == a.uid and "no re-ADD" in line["reason"]
        assert seed_rules_in(b.ns)  # the other pod is untouched
    finally:
        server.close()


def test_a_readd_of_the_same_netns_restores_redirection(
    cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]
) -> None:
    a, b, server = two_pods
    agent = cluster.agent
    try:
        inode = os.stat(a.ns.path).st_ino
        deleted_at = time.monotonic()
        cluster.del_pod(a.ns, "client", a.uid)  # the whole chain's DEL: the bridge deleted A's eth0
        assert seed_rules_in(a.ns) and len(kept_rows(agent)) == 1
        chain_readd(cluster, a.ns, "client", a.uid)  # eth0 back, then our ADD: the same netns again
        (record,) = [r for r in agent.records() if r["name"] == "client"]
        assert record["netns_inode"] == inode and record["uid"] == a.uid
        assert kept_rows(agent) == [] and kept_metric(agent, "readded") == 1.0
        assert seed_rules_in(a.ns)  # re-applied idempotently: one copy of everything
        assert received_netns(cluster, a.uid) == 2
        a = as_pod(a.ns, a.uid, "client")  # host-local may have given it another address
        assert tcp_exchange(a, (b.ip, PORT), b"back") == b"echo:back"
        wait_for(lambda: cluster.peer.port_count(a.uid, 15001) == 2, what="A's traffic through its proxy again")
        # the grace of the DEL passes (the time itself is what is tested), then a pass: the re-enrolled pod's rules
        # are its own now, nothing removes them
        time.sleep(max(0.0, deleted_at + GRACE_S - time.monotonic()))
        agent.wait_reconcile_passes(2)
        assert seed_rules_in(a.ns) and kept_metric(agent, "removed") == 0.0
        assert tcp_exchange(a, (b.ip, PORT), b"still") == b"echo:still"
    finally:
        server.close()


def test_a_replaced_netns_at_the_same_path_is_never_touched(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    ns, uid = cluster.add_pod(netns_factory, "web")
    a = as_pod(ns, uid, "web")
    agent = cluster.agent
    agent_del(cluster, a)
    assert seed_rules_in(a.ns)
    # Another netns (alive before the old one goes, so it cannot reuse its inode) takes over the path, holding
    # the seed's rules of its own.
    other = netns_factory("acdp")
    other.run("iptables-restore", "--noflush", stdin=rules.install_input(Family.V4, ""))
    before = other.iptables_save()
    subprocess.run(["ip", "netns", "del", ns.name], check=True)
    Path(a.ns.path).touch()
    subprocess.run(["mount", "--bind", other.path, a.ns.path], check=True)
    assert os.stat(a.ns.path).st_ino == os.stat(other.path).st_ino
    wait_for(lambda: kept_rows(agent) == [], timeout=GRACE_S + 5, what="the kept-rules row dropped")
    wait_for(lambda: kept_metric(agent, "gone") == 1.0, what="counted as gone")
    assert ours(other.iptables_save()) == ours(before) == ours(SEED)  # never touched
    assert kept_metric(agent, "removed") == 0.0
    assert received_netns(cluster, uid) == 1  # and never handed to ztunnel
    line = wait_for(lambda: logged(agent, "netns whose rules a DEL kept is gone"), what="the drop logged")
    assert line["pod_name"] == "web"


def test_kept_rules_survive_an_agent_restart(
    cluster: Cluster, two_pods: tuple[Pod, Pod, TcpServer]
) -> None:
    a, b, server = two_pods
    agent = cluster.agent
    try:
        deleted_at = time.monotonic()
        cluster.del_pod(a.ns, "client", a.uid)
        cluster.del_pod(b.ns, "server", b.uid)
        assert agent.stop() == 0
        # durable: the rows are in the state database while the agent is down
        db = sqlite3.connect(f"file:{agent.state_dir / 'agent.db'}?mode=ro", uri=True)
        try:
            names = sorted(row[0] for row in db.execute("SELECT name FROM kept_rules"))
        finally:
            db.close()
        assert names == ["client", "server"]
        agent.start(wait_ready=False)
        agent.wait_ready(30)
        assert sorted(r["name"] for r in kept_rows(agent)) == ["client", "server"]
        assert seed_rules_in(a.ns) and seed_rules_in(b.ns)  # nothing removed at start within the grace
        chain_readd(cluster, b.ns, "server", b.uid)  # the server comes back; the client never does
        assert [r["name"] for r in kept_rows(agent)] == ["client"]
        wait_for(lambda: no_rules_in(a.ns), timeout=GRACE_S + 5, what="the client's kept rules removed")
        took = time.monotonic() - deleted_at
        assert GRACE_S - 0.5 <= took <= GRACE_S + INTERVAL_S + 1, f"removed {took:.2f} s after the DEL"
        wait_for(lambda: kept_rows(agent) == [], what="the client's row gone (right after its rules)")
        assert seed_rules_in(b.ns)
        assert [r["name"] for r in agent.records()] == ["server"]
    finally:
        server.close()


def test_a_pod_no_longer_enrolled_loses_kept_rules_at_once_and_a_label_change_removes_rules_at_once(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    a_ns, a_uid = cluster.add_pod(netns_factory, "leaving")
    b_ns, b_uid = cluster.add_pod(netns_factory, "opting-out")
    a, b = as_pod(a_ns, a_uid, "leaving"), as_pod(b_ns, b_uid, "opting-out")
    agent = cluster.agent
    agent_del(cluster, a)
    assert seed_rules_in(a.ns)
    started = time.monotonic()
    set_pod_labels(cluster, "leaving", {"istio.io/dataplane-mode": "none"})
    wait_for(lambda: no_rules_in(a.ns), timeout=INTERVAL_S + 3, what="the kept rules of a pod no longer enrolled")
    assert time.monotonic() - started <= INTERVAL_S + 1 < GRACE_S
    line = wait_for(lambda: logged(agent, "rules a DEL kept are removed"), what="the removal logged")
    assert line["reason"] == "pod no longer enrolled"
    # un-enrolment without a DEL: removed at once, nothing kept
    started = time.monotonic()
    set_pod_labels(cluster, "opting-out", {"istio.io/dataplane-mode": "none"})
    wait_for(lambda: no_rules_in(b.ns), timeout=INTERVAL_S + 3, what="the un-enrolled pod's rules removed")
    assert time.monotonic() - started <= INTERVAL_S + 1
    wait_for(lambda: agent.records() == [], what="the un-enrolled pod's record dropped (right after its rules)")
    assert kept_rows(agent) == [] and kept_metric(agent, "kept") == 1.0


def test_a_failed_readd_keeps_the_kept_rules(node: Node, tmpdir_short: str) -> None:
    """The dataplane alone: a re-add of a netns whose rules a DEL kept that fails (here: no time left for the ZDS
    ack, as when ztunnel is slow) leaves the rules in place; a first add that fails the same way leaves nothing
    (the contrast)."""
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), ack_timeout_s=5.0)
    peer = PeerProcess(dp.zds.path, tmpdir_short)
    try:
        wait_for(lambda: dp.ready()[0], timeout=20, what="peer connected")
        pod, fresh = node.add_pod("kept"), node.add_pod("fresh")

        def work(p: Pod, **more: Any) -> PodWork:
            info = os.stat(p.ns.path)
            return PodWork(uid=p.uid, name=p.name, namespace="ambient-test", netns_path=p.ns.path,
                           ips=(f"{p.ip}/24",), netns_inode=info.st_ino, netns_dev=info.st_dev, **more)

        dp.add(work(pod), time.monotonic() + 10)
        dp.release(work(pod))
        assert seed_rules_in(pod.ns) and pod.uid not in dp.enrolled()
        with pytest.raises(DataplaneError):
            dp.add(work(pod, rules_kept=True), time.monotonic())  # no time left to tell ztunnel
        assert seed_rules_in(pod.ns), "a failed re-add took the kept rules away"
        with pytest.raises(DataplaneError):
            dp.add(work(fresh), time.monotonic())
        assert no_rules_in(fresh.ns)
        dp.discard_kept(work(pod))
        assert no_rules_in(pod.ns)
    finally:
        peer.stop()
        dp.close()


def test_the_schema_3_migration_and_the_kept_rows(tmp_path: Path) -> None:
    """A schema-2 database (no variant column, no kept_rules table) opens as schema 3 with its records; keeping a
    record's rules is one transaction (record gone, row there) and outlives a reopen."""
    db_path = tmp_path / "agent.db"
    db = sqlite3.connect(db_path)
    db.executescript("""
        CREATE TABLE pods (container_id TEXT NOT NULL, ifname TEXT NOT NULL, uid TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL DEFAULT '', namespace TEXT NOT NULL DEFAULT '', netns_path TEXT NOT NULL DEFAULT '',
            netns_inode INTEGER NOT NULL DEFAULT 0, ips TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL DEFAULT 'enrolled', source TEXT NOT NULL DEFAULT 'cni', created_at REAL NOT NULL,
            updated_at REAL NOT NULL, netns_dev INTEGER NOT NULL DEFAULT 0, verified_at REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (container_id, ifname));
        INSERT INTO pods (container_id, ifname, uid, name, namespace, netns_path, netns_inode, ips, created_at,
            updated_at, netns_dev) VALUES ('c1', 'eth0', 'u1', 'web', 'shop', '/run/netns/x', 77, '["10.0.0.5/24"]',
            1, 1, 5);
        PRAGMA user_version=2;
    """)
    db.close()
    store = PodStore(str(tmp_path))
    try:
        (record,) = store.all()
        assert (record.uid, record.netns_inode, record.netns_dev, record.variant) == ("u1", 77, 5, "")
        kept = KeptRules.of(record, dev=5, when=123.0)
        store.keep_rules(record, kept)
        assert store.all() == [] and store.kept() == [kept]
        store.upsert(PodRecord("c2", "eth0", "u2", "api", "shop", "/run/netns/y", 78, variant='{"mode":"tproxy"}'))
    finally:
        store.close()
    store = PodStore(str(tmp_path))
    try:
        assert store.kept_in(77, 5) == kept and store.kept_in(77, 6) is None
        assert [r.variant for r in store.all()] == ['{"mode":"tproxy"}']
        assert store._call(lambda d: d.execute("PRAGMA user_version").fetchone()[0]) == 3
        assert store.drop_kept(77, 5) is True and store.drop_kept(77, 5) is False
    finally:
        store.close()
