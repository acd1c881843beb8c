"""zds_peer's PodProxy in a real netns: every listener (15001, 15006, 15008, and DNS 15053 over UDP and TCP) is
opened in one trip to the netns thread and served by one accept thread; stop() ends that thread before any socket
is closed; a DNS datagram socket outlives stop() while a query thread still answers on it."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from testbed.netns import Netns
from zds_peer import proxy
from zds_peer.stats import Stats


def _listening(ns: Netns) -> set[tuple[str, str]]:
    """(proto, local address:port) of every listening TCP socket and bound UDP socket in the netns."""
    out = set()
    for line in ns.run("ss", "-Hlntu").stdout.splitlines():
        fields = line.split()
        out.add((fields[0], fields[4]))
    return out


def test_one_trip_one_accept_thread_and_dns_sockets(netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    ns.run("ip", "link", "set", "lo", "up")
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        pod = proxy.PodProxy("uid-proxy-test", fd, Stats(None), "p", "shop")
    finally:
        os.close(fd)
    threads_before = {t.ident for t in threading.enumerate()}
    trips: list[object] = []
    original_call = pod._worker.call

    def counting_call(fn, timeout=10.0):  # type: ignore[no-untyped-def]
        trips.append(fn)
        return original_call(fn, timeout)

    pod._worker.call = counting_call  # type: ignore[method-assign]
    pod.start()
    try:
        assert len(trips) == 1  # every socket in one trip to the netns thread
        started = [t for t in threading.enumerate() if t.ident not in threads_before]
        assert [t.name for t in started] == ["acc-uid-prox"]  # one thread serves every listener
        listening = _listening(ns)
        for port in (15001, 15006, 15008):
            assert ("tcp", f"0.0.0.0:{port}") in listening and ("tcp", f"[::]:{port}") in listening, listening
        for proto in ("tcp", "udp"):
            assert (proto, "127.0.0.1:15053") in listening and (proto, "[::1]:15053") in listening, listening
        acceptor = started[0]
    finally:
        pod.stop()
    assert not acceptor.is_alive()
    assert _listening(ns) == set()


def test_dns_socket_is_closed_by_whoever_lets_go_last() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        shared = proxy._SharedSocket(a)
        assert shared.acquire()  # a query thread takes it
        shared.release()  # stop(): the proxy's own hold goes, the query still answers
        assert a.fileno() != -1
        a.send(b"answer")  # still the same socket
        assert b.recv(16) == b"answer"
        shared.release()  # the query thread is done: now it closes
        assert a.fileno() == -1
        assert not shared.acquire()  # nothing takes a closed socket again
    finally:
        a.close()
        b.close()


def test_stop_is_prompt_with_no_traffic(netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    ns.run("ip", "link", "set", "lo", "up")
    fd = os.open(ns.path, os.O_RDONLY)
    try:
        pod = proxy.PodProxy("uid-proxy-stop", fd, Stats(None))
    finally:
        os.close(fd)
    pod.start()
    started = time.monotonic()
    pod.stop()
    assert time.monotonic() - started < 2.0
