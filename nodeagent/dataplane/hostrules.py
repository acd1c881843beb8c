"""The node-side (host netns) probe rules and probe-set planning, generated (pure: no effects here).

Kubelet health probes come from a process on the node. In the node's network namespace the agent SNATs
them to a fixed link-local address (169.254.7.127, IPv6 ``fd16:9254:7127:1337:ffff:ffff:ffff:ffff``), and the
pod's rules let TCP from that address through without capture. One nat chain, its jump first in POSTROUTING:

    -A POSTROUTING -j ISTIO_POSTRT                     (inserted at position 1: other CNIs' rules come after)
    -A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst
                    -j SNAT --to-source 169.254.7.127

``--socket-exists`` matches packets a local socket sent (kubelet), not packets forwarded for others
(kube-proxy's service traffic keeps its source and is still captured). The set holds the IPs of the enrolled
pods, each entry's comment is the pod UID; IPv4-mapped IPv6 addresses are stored as IPv4.

Lines are written the way ``iptables-save`` prints them, so the generated and the expected text are one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodeagent.dataplane.rules import (
    DEFAULT_PARAMS,
    Family,
    RuleDiff,
    RuleParams,
    _diff,
    _is_jump_into,
    _removal,
    _rules,
    parse_save,
)

HOST_CHAIN = "ISTIO_POSTRT"
HOST_CHAINS = (HOST_CHAIN,)
HOST_TABLE = "nat"
HOST_JUMP = f"-A POSTROUTING -j {HOST_CHAIN}"


def host_chain_rule(family: Family, p: RuleParams = DEFAULT_PARAMS) -> str:
    return (
        f"-A {HOST_CHAIN} -p tcp -m owner --socket-exists -m set --match-set {p.probe_set(family)} dst "
        f"-j SNAT --to-source {p.probe_address(family)}"
    )


def host_expected_rules(family: Family, p: RuleParams = DEFAULT_PARAMS) -> dict[str, list[str]]:
    """{"nat": [jump, chain rule]}; the jump must also be the first rule of POSTROUTING."""
    return {HOST_TABLE: [HOST_JUMP, host_chain_rule(family, p)]}


def _postrouting(lines: list[str]) -> list[str]:
    return [r for r in _rules(lines) if r.split()[1] == "POSTROUTING"]


def host_install_input(family: Family, existing_save: str = "", p: RuleParams = DEFAULT_PARAMS) -> str:
    """``iptables-restore --noflush`` input (one transaction) leaving exactly our chain, and our jump as the
    first POSTROUTING rule. When the jump is already first and unique it is left alone; otherwise every copy
    is deleted and one is inserted at position 1."""
    lines = parse_save(existing_save).get(HOST_TABLE, [])
    post = _postrouting(lines)
    jumps = [r for r in _rules(lines) if _is_jump_into(r, HOST_CHAINS)]
    out = [f"*{HOST_TABLE}", f":{HOST_CHAIN} - [0:0]"]
    in_place = bool(post) and post[0] == HOST_JUMP and jumps == [HOST_JUMP]
    if not in_place:
        out.extend("-D" + r[2:] for r in jumps)
        out.append(f"-I POSTROUTING 1 -j {HOST_CHAIN}")
    out.append(host_chain_rule(family, p))
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def host_removal_input(existing_save: str) -> str:
    """Input removing our jump(s) and chain from the node netns, or "" when none exist."""
    return _removal(existing_save, HOST_CHAINS)


def host_diff(existing_save: str, family: Family, p: RuleParams = DEFAULT_PARAMS) -> RuleDiff:
    lines = parse_save(existing_save).get(HOST_TABLE, [])
    have = [r for r in _rules(lines) if r.split()[1] == HOST_CHAIN or _is_jump_into(r, HOST_CHAINS)]
    missing, extra = _diff(have, host_expected_rules(family, p)[HOST_TABLE])
    post = _postrouting(lines)
    misplaced = [HOST_JUMP] if HOST_JUMP in post and post[0] != HOST_JUMP else []
    return RuleDiff(HOST_TABLE, missing, extra, misplaced)


# -- the probe sets ---------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class SetEntry:
    """One member of a probe set: the IP version picks the set (``istio-inpod-probes-v4``/``-v6``)."""

    version: int
    ip: str

    @property
    def family(self) -> Family:
        return Family(self.version)

    def __str__(self) -> str:
        return self.ip


def set_entry(address: str) -> SetEntry | None:
    """A pod address (``10.1.0.5``, ``10.1.0.5/24``, ``::ffff:10.1.0.5``) -> its set entry; None if not an IP."""
    try:
        ip = ipaddress.ip_interface(address.strip()).ip
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return None
    return SetEntry(ip.version, str(ip))


def entries_of(addresses: Iterable[str]) -> list[SetEntry]:
    return sorted({e for a in addresses if (e := set_entry(a)) is not None})


@dataclass
class SyncPlan:
    add: list[tuple[SetEntry, str]]  # (entry, uid): missing, or present with another uid
    delete: list[tuple[SetEntry, str]]  # (entry, comment it has now): not wanted by any enrolled pod
    prune_skipped: bool = False


def plan_sync(
    current: Mapping[SetEntry, str],
    desired: Iterable[tuple[str, Iterable[str]]],
    prune: bool,
) -> SyncPlan:
    """What to change so the sets hold exactly the enrolled pods' IPs with their UIDs.

    ``current``: entry -> comment in the sets now. ``desired``: (uid, addresses) of every enrolled pod, oldest
    first (when two pods claim one IP, the later one, a newer pod reusing the IP, wins). Stale entries are
    deleted only when ``prune`` is set and every enrolled pod has a known IP: a pod whose IP is not known
    yet may be the owner of an entry that looks stale."""
    wanted: dict[SetEntry, str] = {}
    unknown = False
    for uid, addresses in desired:
        entries = entries_of(addresses)
        if not entries:
            unknown = True
        for entry in entries:
            wanted[entry] = uid
    add = sorted((e, uid) for e, uid in wanted.items() if current.get(e) != uid)
    stale = sorted((e, comment) for e, comment in current.items() if e not in wanted)
    if not prune or unknown:
        return SyncPlan(add, [], prune_skipped=bool(stale))
    return SyncPlan(add, stale)
