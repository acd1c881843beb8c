"""Proof with real traffic: two pods on a bridge node, the agent's InPodDataplane and the zds_peer
process. A TCP client in pod A reaches a server in pod B only through A's 15001 and B's 15006; with the peer
gone, the connection fails instead of going direct; an unenrolled pod is untouched; remove cleans up."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from nodeagent.dataplane.api import PodWork
from nodeagent.dataplane.inpod import InPodDataplane
from testbed.peer import PeerProcess
from testbed.pods import Node, Pod, TcpServer, tcp_exchange
from testbed.poll import wait_for

PORT = 8080


def work(pod: Pod, v6: bool = False) -> PodWork:
    ips = (f"{pod.ip}/24", f"{pod.ip6}/64") if v6 else (f"{pod.ip}/24",)
    return PodWork(uid=pod.uid, name=pod.name, namespace="ambient-test", netns_path=pod.ns.path, ips=ips)


@pytest.fixture
def mesh(node: Node, tmpdir_short: str) -> Iterator[tuple[Node, InPodDataplane, PeerProcess]]:
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), ack_timeout_s=5.0)
    peer = PeerProcess(dp.zds.path, tmpdir_short)
    try:
        wait_for(lambda: dp.ready()[0], timeout=20, what="peer connected")
        yield node, dp, peer
    finally:
        peer.stop()
        dp.close()


def listening(pod: Pod) -> set[int]:
    out = pod.ns.run("ss", "-Hntl").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def test_traffic_goes_through_the_peer_and_cannot_skip_it(mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, peer = mesh
    a, b, c = node_.add_pod("client"), node_.add_pod("server"), node_.add_pod("plain")
    server = TcpServer(b, PORT)
    try:
        # before enrollment: direct
        assert tcp_exchange(a, (b.ip, PORT)) == b"echo:hi"
        assert server.seen[-1][0] == a.ip

        for p in (a, b):
            dp.add(work(p), time.monotonic() + 10)
        wait_for(lambda: {15001, 15006, 15008} <= listening(a) and {15001, 15006, 15008} <= listening(b))

        assert tcp_exchange(a, (b.ip, PORT), b"mesh") == b"echo:mesh"
        wait_for(lambda: peer.port_count(a.uid, 15001) == 1 and peer.port_count(b.uid, 15006) == 1,
                 what="peer counters")
        assert peer.port_count(b.uid, 15001) == 0 and peer.port_count(a.uid, 15006) == 0
        # the server saw the proxy's own connection (created inside B, from B's address), not A directly
        assert server.seen[-1][0] == b.ip
        log = peer.log()
        assert f'pod WorkloadUid("{a.uid}") received netns, starting proxy' in log
        assert "pod received snapshot sent" in log

        # an unenrolled pod talks to B directly? No: B is enrolled, inbound goes through B's 15006.
        assert tcp_exchange(c, (b.ip, PORT), b"c") == b"echo:c"
        wait_for(lambda: peer.port_count(b.uid, 15006) == 2, what="inbound from unenrolled pod")
        # ... and an unenrolled pod's own traffic is untouched: C's server is reached directly
        c_server = TcpServer(c, PORT)
        try:
            before = peer.stats()
            assert tcp_exchange(node_.pods[2], (c.ip, PORT), b"self") == b"echo:self"
            assert "ISTIO" not in c.ns.iptables_save()
            assert c.uid not in before.get("pods", {})
        finally:
            c_server.close()

        # no way around the proxy: with the peer gone, A's connection is refused instead of going direct
        peer.stop()
        n_seen = len(server.seen)
        with pytest.raises(OSError):
            tcp_exchange(a, (b.ip, PORT), timeout=2)
        # and a client outside the mesh cannot reach B's app either (inbound is captured too)
        with pytest.raises(OSError):
            tcp_exchange(c, (b.ip, PORT), timeout=2)
        assert len(server.seen) == n_seen

        # remove: rules, routes and listeners gone, direct traffic again
        for p in (a, b):
            dp.remove(work(p))
            assert "ISTIO" not in p.ns.iptables_save()
            assert "0x111" not in p.ns.run("ip", "rule").stdout
            assert not {15001, 15006, 15008} & listening(p)
        assert tcp_exchange(a, (b.ip, PORT), b"after") == b"echo:after"
        assert server.seen[-1][0] == a.ip
    finally:
        server.close()


def test_ipv6_traffic_goes_through_the_peer(mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, peer = mesh
    a, b = node_.add_pod("client6"), node_.add_pod("server6")
    server = TcpServer(b, PORT, socket.AF_INET6)
    try:
        for p in (a, b):
            dp.add(work(p, v6=True), time.monotonic() + 10)
        assert "ISTIO_PRERT" in a.ns.iptables_save(v6=True)
        wait_for(lambda: tcp_exchange(a, (b.ip6, PORT), b"six", timeout=2) == b"echo:six", timeout=10,
                 what="v6 exchange")
        wait_for(lambda: peer.port_count(a.uid, 15001) >= 1 and peer.port_count(b.uid, 15006) >= 1,
                 what="v6 counters")
        assert server.seen[-1][0] == b.ip6
    finally:
        server.close()
