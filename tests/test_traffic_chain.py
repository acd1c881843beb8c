"""Proof with real traffic through the full chain: libcni driver (tests/tools/bin/cnitool) -> frozen
plugin (dist/ambient-cni) -> agent (``python -m ambient_cni agent --dataplane inpod``, file cluster view with the
namespace labelled ``istio.io/dataplane-mode: ambient``) -> zds_peer. Real netns, bridge, iptables, sockets.
Needs ``make build driver``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from testbed.cluster import AMBIENT_NS, PLAIN_NS, Cluster
from testbed.netns import Netns
from testbed.pods import TcpServer, as_pod, listening_ports, pod_ip, tcp_exchange
from testbed.poll import wait_for
from tests import goldens

PORT = 8080


def proxy_ports_closed(ns: Netns) -> bool:
    return not {15001, 15006, 15008} & listening_ports(ns)


def test_full_chain_traffic(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    a_ns, a_uid = cluster.add_pod(netns_factory, "client")
    b_ns, b_uid = cluster.add_pod(netns_factory, "server")
    c_ns, c_uid = cluster.add_pod(netns_factory, "outsider", namespace=PLAIN_NS)
    a, b, c = as_pod(a_ns, a_uid, "client"), as_pod(b_ns, b_uid, "server"), as_pod(c_ns, c_uid, "outsider")

    # ADD returned only after the ack: rules and listeners are already there
    for p in (a, b):
        assert "ISTIO_PRERT" in p.ns.iptables_save()
        assert {15001, 15006, 15008} <= listening_ports(p.ns)
    assert "ISTIO" not in c.ns.iptables_save()  # not enrolled: untouched
    assert not {15001, 15006, 15008} & listening_ports(c.ns)

    server = TcpServer(b, PORT)
    c_server = TcpServer(c, PORT)
    try:
        assert tcp_exchange(a, (b.ip, PORT), b"mesh") == b"echo:mesh"
        wait_for(lambda: cluster.peer.port_count(a.uid, 15001) == 1 and cluster.peer.port_count(b.uid, 15006) == 1,
                 what="peer counters")
        assert server.seen[-1][0] == b.ip  # delivered by B's proxy, from inside B
        # the unenrolled pod's own traffic is untouched (A -> C leaves A through 15001, but C receives directly)
        assert tcp_exchange(a, (c.ip, PORT), b"x") == b"echo:x"
        assert c_server.seen[-1][0] == a.ip
        assert cluster.peer.port_count(a.uid, 15001) == 2
        assert c.uid not in cluster.peer.stats().get("pods", {})  # type: ignore[operator]

        log = cluster.peer.log()
        assert f'pod WorkloadUid("{a.uid}") received netns, starting proxy' in log

        # DEL: ztunnel drops A (listeners gone); its rules and routes stay until a re-ADD of the same netns or the
        # grace ends (test_agent_kept_rules.py)
        cluster.del_pod(a_ns, "client", a_uid)
        assert "ISTIO" in a.ns.iptables_save()
        assert "0x111" in a.ns.run("ip", "rule").stdout
        wait_for(lambda: not {15001, 15006, 15008} & listening_ports(a.ns), what="A's listeners closed")
        assert f'pod delete request, draining proxy uid="{a.uid}"' in cluster.peer.log()
        # (the chain's DEL also removed A's interface, so there is no "direct again" to test here; see
        # test_traffic_inpod.py for that)
    finally:
        server.close()
        c_server.close()


def test_no_path_around_the_proxy(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    a_ns, a_uid = cluster.add_pod(netns_factory, "client")
    b_ns, b_uid = cluster.add_pod(netns_factory, "server")
    a, b = as_pod(a_ns, a_uid, "client"), as_pod(b_ns, b_uid, "server")
    server = TcpServer(b, PORT)
    try:
        assert tcp_exchange(a, (b.ip, PORT)) == b"echo:hi"
        cluster.peer.stop()  # the node proxy dies: its listeners inside the pods go with it
        for pod in (a, b):
            wait_for(functools.partial(proxy_ports_closed, pod.ns), what=f"{pod.name}'s listeners closed")
        seen = len(server.seen)
        with pytest.raises(OSError):
            tcp_exchange(a, (b.ip, PORT), timeout=2)
        assert len(server.seen) == seen  # nothing got through directly
        # and the agent now refuses new enrolled pods (fail closed: no ztunnel)
        from testbed.runners import run_driver

        ns = netns_factory("acdp")
        res = run_driver("add", cluster.conf_name, ns.path, container_id="c-late",
                         cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={AMBIENT_NS};K8S_POD_NAME=client;"
                                  f"K8S_POD_UID={a_uid}x", **cluster.common)
        assert res.code != 0
    finally:
        server.close()


@pytest.mark.parametrize("cluster", [["--redirect-mode", "redirect"]], indirect=True)
def test_redirect_mode_and_pod_annotations_from_the_file_view(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    """``--redirect-mode redirect``: the pod's rules are the golden ``redirect`` set, TCP still goes in and out
    through 15006/15001; a pod's annotations (file view) pick its own variant; the chain's host-local IPs are
    in the node's probe set with the pods' UIDs."""
    from nodeagent.dataplane import rules
    from testbed.pods import node_sets

    golden = goldens.golden("dataplane", "variants")
    a_ns, a_uid = cluster.add_pod(netns_factory, "client")
    b_ns, b_uid = cluster.add_pod(netns_factory, "server")
    d_ns, d_uid = cluster.add_pod(netns_factory, "dns", annotations={
        "ambient.istio.io/dns-capture": "true", "ambient.istio.io/bypass-inbound-capture": "true"})
    a, b = as_pod(a_ns, a_uid, "client"), as_pod(b_ns, b_uid, "server")
    assert rules.normalise_save(a.ns.iptables_save()) == goldens.read(golden / "redirect_v4.save")
    d_save = rules.normalise_save(d_ns.iptables_save())
    assert d_save == goldens.read(golden / "redirect_dns_ingress_v4.save")

    server = TcpServer(b, PORT)
    try:
        assert tcp_exchange(a, (b.ip, PORT), b"redirect") == b"echo:redirect"
        wait_for(lambda: cluster.peer.port_count(a.uid, 15001) == 1 and cluster.peer.port_count(b.uid, 15006) == 1,
                 what="peer counters")
        assert server.seen[-1][0] == b.ip
    finally:
        server.close()

    node_path = cluster.agent.argv()[cluster.agent.argv().index("--host-netns") + 1]
    assert node_sets(node_path) == {a.ip: a_uid, b.ip: b_uid, pod_ip(d_ns): d_uid}
    cluster.del_pod(a_ns, "client", a_uid)
    assert node_sets(node_path) == {b.ip: b_uid, pod_ip(d_ns): d_uid}
