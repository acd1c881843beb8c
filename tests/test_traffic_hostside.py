"""The kubelet probe path with real traffic (both redirection modes, IPv4 and IPv6).

A bridge "node" netns with the node's addresses (10.77.0.1, fd00:77::1) and pods with a default route through
it; ``InPodDataplane(host_netns=<that node netns>)`` and the ``zds_peer`` process. A "kubelet" is a separate
process in the node netns: its connection to an enrolled pod is SNATed there to 169.254.7.127 (v6:
fd16:9254:7127:1337:ffff:ffff:ffff:ffff), so the pod's server sees that source and the pod's rules let it
through without the proxy (the peer's 15006 counter does not move), while pod-to-pod traffic still goes
through 15001 and 15006. The node-side state lives only in the test's node netns.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from nodeagent.dataplane import rules
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.dataplane.hostrules import set_entry
from nodeagent.dataplane.inpod import InPodDataplane
from nodeagent.dataplane.rules import Family, RedirectMode
from testbed.peer import PeerProcess
from testbed.pods import Node, Pod, TcpServer, kubelet_probe, tcp_exchange
from testbed.poll import wait_for
from tests import goldens

PORT = 8080
SNAT4 = "169.254.7.127"
SNAT6 = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"


def work(pod: Pod) -> PodWork:
    return PodWork(uid=pod.uid, name=pod.name, namespace="ambient-test", netns_path=pod.ns.path,
                   ips=(f"{pod.ip}/24", f"{pod.ip6}/64"))


@pytest.fixture(params=[RedirectMode.TPROXY, RedirectMode.REDIRECT], ids=lambda m: m.value)
def mesh(
    request: pytest.FixtureRequest, node: Node, tmpdir_short: str
) -> Iterator[tuple[Node, InPodDataplane, PeerProcess]]:
    node.with_gateway()
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), mode=request.param, host_netns=node.ns.path)
    peer = PeerProcess(dp.zds.path, tmpdir_short)
    try:
        wait_for(lambda: dp.ready()[0], timeout=20, what="peer connected")
        yield node, dp, peer
    finally:
        peer.stop()
        dp.close()


def set_entries(dp: InPodDataplane) -> dict[str, str]:
    assert dp.host is not None
    return {e.ip: uid for e, uid in dp.host.entries().items()}


def test_kubelet_probe_is_snated_and_skips_the_proxy(mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, peer = mesh
    a, b = node_.add_pod("client"), node_.add_pod("server")
    server = TcpServer(b, PORT)
    server6 = TcpServer(b, PORT + 1, socket.AF_INET6)
    try:
        # not enrolled yet: the probe arrives from the node's own address (the set does not hold the pod)
        assert kubelet_probe(node_.ns, (b.ip, PORT)) == "echo:probe"
        assert server.seen[-1][0] == Node.GATEWAY4

        for p in (a, b):
            dp.add(work(p), time.monotonic() + 10)
        assert set_entries(dp) == {a.ip: a.uid, a.ip6: a.uid, b.ip: b.uid, b.ip6: b.uid}
        if dp.mode is RedirectMode.REDIRECT:
            assert rules.normalise_save(b.ns.iptables_save()) == goldens.read(
                goldens.golden("dataplane", "variants", "redirect_v4.save"))
            assert rules.normalise_save(b.ns.iptables_save(True)) == goldens.read(
                goldens.golden("dataplane", "variants", "redirect_v6.save"))

        # the kubelet's probe: SNATed in the node netns, let through by the pod's rules, no proxy involved
        assert kubelet_probe(node_.ns, (b.ip, PORT), "v4") == "echo:v4"
        assert server.seen[-1][0] == SNAT4
        assert kubelet_probe(node_.ns, (b.ip6, PORT + 1), "v6") == "echo:v6"
        assert server6.seen[-1][0] == SNAT6
        assert peer.port_count(b.uid, 15006) == 0

        # pod-to-pod still goes through A's 15001 and B's 15006 (v4 and v6)
        assert tcp_exchange(a, (b.ip, PORT), b"mesh") == b"echo:mesh"
        assert tcp_exchange(a, (b.ip6, PORT + 1), b"mesh6") == b"echo:mesh6"
        wait_for(lambda: peer.port_count(a.uid, 15001) == 2 and peer.port_count(b.uid, 15006) == 2,
                 what="pod-to-pod through the proxy")
        assert server.seen[-1][0] == b.ip and server6.seen[-1][0] == b.ip6
        # the peer counts a connection before relaying a byte of it: every count of the probes and exchanges
        # above is in its stats by now, so nothing more can arrive
        assert peer.port_count(b.uid, 15006) == 2  # the probes never touched it

        # removed: its entries go first; the probe arrives from the node's address again
        dp.remove(work(b))
        assert set_entries(dp) == {a.ip: a.uid, a.ip6: a.uid}
        assert kubelet_probe(node_.ns, (b.ip, PORT), "after") == "echo:after"
        assert server.seen[-1][0] == Node.GATEWAY4
    finally:
        server.close()
        server6.close()


def test_the_node_netns_is_never_a_pod_netns(mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, _peer = mesh
    pod = PodWork(uid="u-node", name="sneaky", namespace="ambient-test", netns_path=node_.ns.path,
                  ips=("10.77.0.1/24",))
    before = node_.ns.iptables_save()
    with pytest.raises(DataplaneError) as err:
        dp.add(pod, time.monotonic() + 5)
    assert "node's network namespace" in err.value.msg and err.value.retryable is False
    assert node_.ns.iptables_save() == before and "ISTIO_PRERT" not in before
    assert set_entries(dp) == {}


def test_probe_set_failure_fails_the_add_and_leaves_nothing(mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, peer = mesh
    pod = node_.add_pod("victim")
    assert dp.host is not None
    dp.host.uninstall()  # the sets are gone (and the rule): the upsert cannot succeed
    with pytest.raises(DataplaneError) as err:
        dp.add(work(pod), time.monotonic() + 10)
    assert err.value.retryable is True and "probe set" in err.value.msg
    assert "ISTIO" not in pod.ns.iptables_save() and dp.enrolled() == {}
    wait_for(lambda: not peer.listening(pod.uid), what="peer drained the pod")
    dp.host.start()  # repaired (the agent's reconcile does this): the retry works
    dp.add(work(pod), time.monotonic() + 10)
    assert set_entry(pod.ip) in dp.host.entries()
    assert dp.host.saves()[Family.V4].count("-A POSTROUTING -j ISTIO_POSTRT") == 1
