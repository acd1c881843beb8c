"""DNS capture with real traffic: UDP and TCP queries from enrolled pods to a DNS server in another test netns.

With capture on for a pod (the agent's default, or the pod's ``ambient.istio.io/dns-capture`` annotation), the
pod's nat rules send port 53 to the peer's 15053 inside the pod, and the peer relays to the original
destination (TCP: SO_ORIGINAL_DST; UDP: the pod's conntrack entry); with it off the UDP query goes straight to
the server and TCP port 53 is ordinary outbound TCP (15001), never the DNS proxy. The annotation overrides the
agent's default both ways. The server is a few lines answering A queries.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from nodeagent import decide
from nodeagent.dataplane.api import PodWork
from nodeagent.dataplane.inpod import InPodDataplane
from nodeagent.dataplane.rules import RedirectMode
from testbed.netns import sock_in
from testbed.peer import PeerProcess
from testbed.pods import Node, Pod
from testbed.poll import wait_for

ANSWER = "10.99.0.42"


def query(qid: int, name: str) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def answer(q: bytes) -> bytes:
    qid = struct.unpack("!H", q[:2])[0]
    question = q[12:]
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + socket.inet_aton(ANSWER)
    return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + record


def answered_ip(reply: bytes) -> str:
    return socket.inet_ntoa(reply[-4:])


class DnsServer:
    """UDP and TCP port 53 in a netns of its own (on the node's bridge); records the queries' sources."""

    def __init__(self, pod: Pod) -> None:
        self.udp = sock_in(pod.ns.path, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((pod.ip, 53))
        self.tcp = pod.socket(socket.AF_INET)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((pod.ip, 53))
        self.tcp.listen(16)
        self.seen: list[tuple[str, str]] = []  # (proto, source ip)
        threading.Thread(target=self._udp_loop, daemon=True).start()
        threading.Thread(target=self._tcp_loop, daemon=True).start()

    def _udp_loop(self) -> None:
        while True:
            try:
                q, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            if not peer:
                return
            self.seen.append(("udp", peer[0]))
            self.udp.sendto(answer(q), peer)

    def _tcp_loop(self) -> None:
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                size = struct.unpack("!H", conn.recv(2))[0]
                q = conn.recv(size)
                self.seen.append(("tcp", peer[0]))
                a = answer(q)
                conn.sendall(struct.pack("!H", len(a)) + a)

    def close(self) -> None:
        for s in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def udp_query(pod: Pod, server: str) -> str:
    s = sock_in(pod.ns.path, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(5)
        s.sendto(query(7, "svc.cluster.local"), (server, 53))
        return answered_ip(s.recv(4096))
    finally:
        s.close()


def tcp_query(pod: Pod, server: str) -> str:
    s = pod.socket(socket.AF_INET)
    try:
        s.settimeout(5)
        s.connect((server, 53))
        q = query(8, "svc.cluster.local")
        s.sendall(struct.pack("!H", len(q)) + q)
        size = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < size:
            data += s.recv(size - len(data))
        return answered_ip(data)
    finally:
        s.close()


@pytest.fixture(params=[False, True], ids=["default-off", "default-on"])
def dns_mesh(
    request: pytest.FixtureRequest, node: Node, tmpdir_short: str
) -> Iterator[tuple[Node, InPodDataplane, PeerProcess]]:
    node.with_gateway()
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), mode=RedirectMode.TPROXY,
                        dns_capture=request.param, host_netns=node.ns.path)
    peer = PeerProcess(dp.zds.path, tmpdir_short)
    try:
        wait_for(lambda: dp.ready()[0], timeout=20, what="peer connected")
        yield node, dp, peer
    finally:
        peer.stop()
        dp.close()


def test_dns_capture_default_and_annotation_override(dns_mesh) -> None:  # type: ignore[no-untyped-def]
    node_, dp, peer = dns_mesh
    dns_pod = node_.add_pod("dns")
    follows, overrides = node_.add_pod("follows"), node_.add_pod("overrides")
    server = DnsServer(dns_pod)
    try:
        flipped = "false" if dp.dns_capture else "true"
        for p, annotations in ((follows, {}), (overrides, {decide.DNS_CAPTURE_ANNOTATION: flipped})):
            dp.add(PodWork(uid=p.uid, name=p.name, namespace="ambient-test", netns_path=p.ns.path,
                           ips=(f"{p.ip}/24",), controls=decide.pod_controls(annotations)),
                   time.monotonic() + 10)
        captured = {follows.uid: dp.dns_capture, overrides.uid: not dp.dns_capture}
        for p in (follows, overrides):
            assert ("--to-ports 15053" in p.ns.iptables_save()) is captured[p.uid]
            assert ("-j CT --zone 1" in p.ns.iptables_save()) is captured[p.uid]
            wait_for(functools.partial(peer.listening, p.uid), what="peer listening")
            assert udp_query(p, dns_pod.ip) == ANSWER
            assert tcp_query(p, dns_pod.ip) == ANSWER
            want = 2 if captured[p.uid] else 0
            wait_for(functools.partial(peer.port_count_is, p.uid, 15053, want), what="15053 counter")
            destinations = peer.stats()["pods"][p.uid]["destinations"]
            if captured[p.uid]:
                assert f"15053->{dns_pod.ip}:53/udp" in destinations and f"15053->{dns_pod.ip}:53" in destinations
                assert peer.port_count(p.uid, 15001) == 0
            else:  # UDP went straight out; TCP 53 is plain outbound TCP: the mesh's 15001, not the DNS proxy
                assert peer.port_count(p.uid, 15001) == 1
                assert destinations == [f"15001->{dns_pod.ip}:53"]
        # every query reached the real server, from the pod's own address (direct or the peer inside the pod)
        assert sorted(server.seen) == sorted(
            [("udp", follows.ip), ("tcp", follows.ip), ("udp", overrides.ip), ("tcp", overrides.ip)]
        )
    finally:
        server.close()
