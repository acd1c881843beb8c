"""A bridge "node" netns with pods attached by veth, and sockets and traffic inside them.

Everything is created with unique names (``acdp`` + 6 hex) and removed on exit, also when the body fails.
Traffic only flows between addresses inside these namespaces (10.77.0.0/24, fd00:77::/64).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from testbed import netns
from testbed.netns import Netns, sh, sock_in


@dataclass
class Pod:
    ns: Netns
    ip: str
    ip6: str
    uid: str
    name: str

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket created inside this pod's netns."""
        return sock_in(self.ns.path, family)


@dataclass
class Node:
    """A node netns with a bridge; pods attach by veth (10.77.0.x/24 and fd00:77::x/64).

    ``with_gateway()`` gives the bridge the node's addresses (10.77.0.1, fd00:77::1) and every pod a default
    route through them, as a real node has: what a "kubelet" on the node needs to probe pods."""

    ns: Netns
    bridge: str = "br0"
    pods: list[Pod] = field(default_factory=list)
    gateway: bool = False

    GATEWAY4 = "10.77.0.1"
    GATEWAY6 = "fd00:77::1"

    def with_gateway(self) -> Node:
        self.ns.run("ip", "addr", "add", f"{self.GATEWAY4}/24", "dev", self.bridge)
        self.ns.run("ip", "-6", "addr", "add", f"{self.GATEWAY6}/64", "dev", self.bridge, "nodad")
        self.gateway = True
        return self

    def add_pod(self, name: str = "") -> Pod:
        idx = len(self.pods) + 2
        pod_ns = netns.create(netns.unique_name("acdp"))
        host_if = f"v{secrets.token_hex(3)}"
        try:
            # create the veth inside the node netns, then move the peer end into the pod
            self.ns.run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0")
            self.ns.run("ip", "link", "set", "eth0", "netns", pod_ns.path)
            self.ns.run("ip", "link", "set", host_if, "master", self.bridge, "up")
            ip, ip6 = f"10.77.0.{idx}", f"fd00:77::{idx}"
            pod_ns.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
            pod_ns.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
            pod_ns.run("ip", "link", "set", "eth0", "up")
            if self.gateway:
                pod_ns.run("ip", "route", "add", "default", "via", self.GATEWAY4)
                pod_ns.run("ip", "-6", "route", "add", "default", "via", self.GATEWAY6)
        except BaseException:
            netns.remove(pod_ns.name)
            raise
        pod = Pod(pod_ns, ip, ip6, uid=f"uid-{secrets.token_hex(8)}", name=name or f"pod{idx}")
        self.pods.append(pod)
        return pod


@contextlib.contextmanager
def bridge_node() -> Iterator[Node]:
    """A fresh node netns with its bridge up; the node and every pod added to it are removed on exit."""
    node = Node(netns.create(netns.unique_name("acdp")))
    try:
        node.ns.run("ip", "link", "add", node.bridge, "type", "bridge")
        node.ns.run("ip", "link", "set", node.bridge, "up")
        yield node
    finally:
        for pod in node.pods:
            netns.remove(pod.ns.name)
        netns.remove(node.ns.name)


class TcpServer:
    """A TCP echo server listening inside a pod netns; records the peers it saw."""

    def __init__(self, pod: Pod, port: int, family: int = socket.AF_INET) -> None:
        self.sock = pod.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        self.sock.listen(16)
        self.seen: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.seen.append(addr[:2])
            with conn, contextlib.suppress(OSError):
                data = conn.recv(1024)
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def tcp_exchange(pod: Pod, dest: tuple[str, int], payload: bytes = b"hi", timeout: float = 3.0) -> bytes:
    """Connect from inside ``pod`` to ``dest``, send ``payload``, return the reply. Raises OSError."""
    family = socket.AF_INET6 if ":" in dest[0] else socket.AF_INET
    s = pod.socket(family)
    try:
        s.settimeout(timeout)
        s.connect(dest)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(1024)
            if not chunk:
                return out
            out += chunk
    finally:
        s.close()


def listening_ports(ns: Netns) -> set[int]:
    """The TCP ports something listens on inside ``ns``."""
    out = ns.run("ss", "-Hntl").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


_KUBELET = """
import socket, sys
host, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect((host, port))
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(1024):
        out += chunk
sys.stdout.write(out.decode())
"""


def kubelet_probe(node_ns: Netns, dest: tuple[str, int], payload: str = "probe") -> str:
    """A "kubelet": a separate process in the node netns (a local socket there) connects to a pod's port."""
    proc = node_ns.run(sys.executable, "-c", _KUBELET, dest[0], str(dest[1]), payload, check=False)
    if proc.returncode != 0:
        raise OSError(f"probe to {dest} failed: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def node_sets(node_path: str) -> dict[str, str]:
    """The probe sets of a test's node netns: {ip: uid comment} (read only)."""
    from nodeagent.dataplane.hostprobe import HostProbe

    probe = HostProbe(node_path)
    try:
        return {e.ip: uid for e, uid in probe.entries().items()}
    finally:
        probe.close()


def edit_node_sets(node_path: str, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(ProbeSets)`` in a test's node netns: changes behind the agent's back (lost state, strangers)."""
    from netns_threads import NetnsWorker
    from nodeagent.dataplane.probesets import ProbeSets

    fd = os.open(node_path, os.O_RDONLY)
    try:
        worker = NetnsWorker(fd, "test-sets")
    finally:
        os.close(fd)
    sets = ProbeSets()
    try:
        return worker.call(lambda: fn(sets))
    finally:
        worker.call(sets.close)
        worker.stop()


def pod_ip(ns: Netns) -> str:
    out = sh("ip", "-n", ns.name, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    return out.split()[3].split("/")[0]


def as_pod(ns: Netns, uid: str, name: str) -> Pod:
    """The pod a netns plays (IPv4 address read from its eth0; no IPv6)."""
    return Pod(ns, pod_ip(ns), "", uid, name)
