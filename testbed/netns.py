"""Network namespaces with unique names and guaranteed removal (pyroute2; the same files as ``ip netns``).

Everything that runs "inside" a netns here enters it with ``nsenter --net`` (a command) or a thread that joined
it (a socket), never by changing this process's own netns. ``Netns.exec_prefix`` (``ip netns exec``) is kept
for the libcni driver only: the bridge plugin it runs reads ``/sys``, which ``ip netns exec`` remounts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import NetNS, netns

NETNS_DIR = "/var/run/netns"


def sh(
    *argv: str, check: bool = True, stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text; ``check`` raises CalledProcessError (with the output)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=check, timeout=timeout)


def unique_name(prefix: str, length: int = 15) -> str:
    """``prefix`` + 6 random hex digits, checked against Linux's 15-character interface-name limit."""
    name = f"{prefix}{secrets.token_hex(3)}"
    if len(name) > length:
        raise ValueError(f"name {name!r} is longer than {length} characters; use a shorter prefix")
    return name


def netns_path(name: str) -> str:
    return f"{NETNS_DIR}/{name}"


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> str:
        return netns_path(self.name)

    def nsenter_prefix(self) -> list[str]:
        """argv prefix that runs a command inside this netns (nothing else of the command changes)."""
        return ["nsenter", f"--net={self.path}"]

    def exec_prefix(self) -> list[str]:
        """argv prefix through ``ip netns exec`` (also remounts /sys for the command: the driver needs that)."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(*self.nsenter_prefix(), *argv, check=check, stdin=stdin)

    def iptables_save(self, v6: bool = False) -> str:
        return self.run("ip6tables-save" if v6 else "iptables-save").stdout

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created inside this netns."""
        return sock_in(self.path, family, kind)


def create(name: str, loopback_up: bool = True) -> Netns:
    netns.create(name)
    try:
        if loopback_up:
            with NetNS(name) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    except BaseException:
        remove(name)
        raise
    return Netns(name)


def remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def exists(name: str) -> bool:
    return name in netns.listnetns()


@contextlib.contextmanager
def new_netns(prefix: str = "acpt", loopback_up: bool = True) -> Iterator[Netns]:
    """A fresh netns, removed on exit even when the body fails."""
    created = create(unique_name(prefix), loopback_up)
    try:
        yield created
    finally:
        remove(created.name)


@contextlib.contextmanager
def many(names: Iterable[str]) -> Iterator[list[Netns]]:
    """Many netns at once (one ``ip -batch``: what the benchmarks' 110 pods need), all removed on exit."""
    made = [Netns(name) for name in names]
    try:
        sh("ip", "-batch", "-", stdin="".join(f"netns add {ns.name}\n" for ns in made), timeout=120)
        yield made
    finally:
        sh("ip", "-force", "-batch", "-", stdin="".join(f"netns delete {ns.name}\n" for ns in made), check=False,
           timeout=120)


def free_port() -> int:
    """A free TCP port on this machine's loopback (for a health endpoint: nothing is sent anywhere else)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sock_in(ns_path: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket created by a thread that joined ``ns_path`` (the socket stays in that netns)."""
    from netns_threads import NetnsWorker

    fd = os.open(ns_path, os.O_RDONLY)
    try:
        worker = NetnsWorker(fd, "pod-sock")
        try:
            return worker.socket(family, kind)
        finally:
            worker.stop()
    finally:
        os.close(fd)
