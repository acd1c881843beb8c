"""Network namespaces with unique names and guaranteed cleanup (pyroute2; same files as `ip netns`)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import NetNS, netns

NETNS_DIR = "/var/run/netns"


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

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside this netns (``ip netns exec`` also remounts /sys)."""
        return ["ip", "netns", "exec", self.name]


def create(name: str, loopback_up: bool = True) -> Netns:
    netns.create(name)
    if loopback_up:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    return Netns(name)


def remove(name: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        netns.remove(name)


def exists(name: str) -> bool:
    return name in netns.listnetns()


@contextlib.contextmanager
def new_netns(prefix: str = "acpt", loopback_up: bool = True) -> Iterator[Netns]:
    """A fresh netns, removed on exit even when the body fails."""
    name = unique_name(prefix)
    created = create(name, loopback_up)
    try:
        yield created
    finally:
        remove(name)
