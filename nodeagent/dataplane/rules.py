"""The in-pod redirection rules, generated (pure: no effects here).

The contract is the ``iptables-save`` output printed by the seed ("Comprobar la configuración de las reglas de
iptables"): mangle ``ISTIO_PRERT``/``ISTIO_OUTPUT`` (TPROXY to 15008/15006) and nat ``ISTIO_OUTPUT`` (REDIRECT to
15001), with the jumps from PREROUTING/OUTPUT. This module turns parameters into ``iptables-restore --noflush``
input that is atomic per table and idempotent, into the removal input, and into the expected ``iptables-save``
lines that ``doctor`` compares with what a netns really holds.

Idempotency: declaring ``:ISTIO_PRERT - [0:0]`` under ``--noflush`` flushes (or creates) our chain, so the chain
bodies are always re-added exactly once. Jumps from built-in chains cannot be handled that way without flushing
foreign rules, so the generator takes the netns's current ``iptables-save`` text and adds only missing jumps
(and deletes duplicated ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

CHAINS = ("ISTIO_PRERT", "ISTIO_OUTPUT")
TABLES = ("mangle", "nat")
BUILTIN_CHAINS = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}


class Family(Enum):
    V4 = 4
    V6 = 6

    @property
    def save_cmd(self) -> str:
        return "iptables-save" if self is Family.V4 else "ip6tables-save"

    @property
    def restore_cmd(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"


@dataclass(frozen=True)
class RuleParams:
    """Every number the rules use; the defaults are the seed's (and ztunnel's) values."""

    ztunnel_mark: int = 0x539  # ztunnel's SO_MARK 1337
    connmark: int = 0x111
    mask: int = 0xFFF
    inbound_tunnel_port: int = 15008  # HBONE
    inbound_plain_port: int = 15006
    outbound_port: int = 15001
    probe_v4: str = "169.254.7.127"
    probe_v6: str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    route_table: int = 100
    rule_priority: int = 32764

    def localhost(self, family: Family) -> str:
        return "127.0.0.1/32" if family is Family.V4 else "::1/128"

    def probe(self, family: Family) -> str:
        return f"{self.probe_v4}/32" if family is Family.V4 else f"{self.probe_v6}/128"

    def any_ip(self, family: Family) -> str:
        return "0.0.0.0" if family is Family.V4 else "::"


DEFAULT_PARAMS = RuleParams()


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


def jump_rules(table: str) -> list[str]:
    """The jumps from built-in chains into ours, as ``iptables-save`` prints them."""
    if table == "mangle":
        return ["-A PREROUTING -j ISTIO_PRERT", "-A OUTPUT -j ISTIO_OUTPUT"]
    return ["-A OUTPUT -j ISTIO_OUTPUT"]


def chains_of(table: str) -> tuple[str, ...]:
    """Our chains in ``table``, in the order ``iptables-save`` lists them."""
    return ("ISTIO_OUTPUT", "ISTIO_PRERT") if table == "mangle" else ("ISTIO_OUTPUT",)


def chain_rules(table: str, family: Family, p: RuleParams = DEFAULT_PARAMS) -> list[str]:
    """The bodies of our chains, exactly as ``iptables-save`` prints them (the seed's lines)."""
    zt = _mark(p.ztunnel_mark, p.mask)
    cm = _mark(p.connmark, p.mask)
    lo = p.localhost(family)
    probe = p.probe(family)
    any_ip = p.any_ip(family)
    if table == "mangle":
        return [
            f"-A ISTIO_OUTPUT -m connmark --mark {cm} -j CONNMARK --restore-mark "
            "--nfmask 0xffffffff --ctmask 0xffffffff",
            f"-A ISTIO_PRERT -m mark --mark {zt} -j CONNMARK --set-xmark {cm}",
            f"-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT",
            f"-A ISTIO_PRERT ! -d {lo} -i lo -p tcp -j ACCEPT",
            f"-A ISTIO_PRERT -p tcp -m tcp --dport {p.inbound_tunnel_port} -m mark ! --mark {zt} "
            f"-j TPROXY --on-port {p.inbound_tunnel_port} --on-ip {any_ip} --tproxy-mark {cm}",
            "-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A ISTIO_PRERT ! -d {lo} -p tcp -m mark ! --mark {zt} "
            f"-j TPROXY --on-port {p.inbound_plain_port} --on-ip {any_ip} --tproxy-mark {cm}",
        ]
    if table == "nat":
        return [
            f"-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT",
            f"-A ISTIO_OUTPUT -p tcp -m mark --mark {cm} -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {zt} -j REDIRECT --to-ports {p.outbound_port}",
        ]
    raise ValueError(f"no rules for table {table!r}")


def expected_rules(family: Family, p: RuleParams = DEFAULT_PARAMS) -> dict[str, list[str]]:
    """Per table: every ``-A`` line (jumps first, then our chains) a redirected netns must hold."""
    return {t: [*jump_rules(t), *chain_rules(t, family, p)] for t in TABLES}


def parse_save(text: str) -> dict[str, list[str]]:
    """``iptables-save`` text -> {table: [lines]} (chain headers ``:X`` and ``-A`` rules; comments dropped)."""
    tables: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
        elif line == "COMMIT":
            current = None
        elif current is not None:
            current.append(line)
    return tables


def _rules(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("-A ")]


def _declared(lines: list[str]) -> set[str]:
    return {ln[1:].split()[0] for ln in lines if ln.startswith(":")}


def install_input(family: Family, existing_save: str = "", p: RuleParams = DEFAULT_PARAMS) -> str:
    """``iptables-restore --noflush`` input installing our rules, one COMMIT (one transaction) per table.

    ``existing_save`` is the netns's current ``iptables-save`` output; jumps already present once are kept,
    missing ones added, duplicated ones reduced to one. Applying the result twice leaves one copy.
    """
    current = parse_save(existing_save)
    out: list[str] = []
    for table in TABLES:
        have = _rules(current.get(table, []))
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in chains_of(table))
        for jump in jump_rules(table):
            count = have.count(jump)
            delete = "-D" + jump[2:]
            out.extend([delete] * max(0, count - 1))
            if count == 0:
                out.append(jump)
        out.extend(chain_rules(table, family, p))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def first_install_input(family: Family, p: RuleParams = DEFAULT_PARAMS) -> str:
    """``iptables-restore --noflush`` input for a netns that holds none of our chains yet; needs no
    ``iptables-save`` first, so a fresh pod costs one exec per family instead of two.

    ``-N`` creates each chain and fails its table's transaction when the chain exists already (nothing of that
    table is applied then). A jump can only point at an existing chain, so while the chain is new no jump to it
    exists and adding the jumps cannot duplicate them. On failure the caller falls back to ``install_input``
    with the netns's current ``iptables-save`` (tables committed before the failing one are taken as found).
    """
    out: list[str] = []
    for table in TABLES:
        out.append(f"*{table}")
        out.extend(f"-N {c}" for c in chains_of(table))
        out.extend(jump_rules(table))
        out.extend(chain_rules(table, family, p))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def removal_input(existing_save: str) -> str:
    """``iptables-restore --noflush`` input removing our jumps and chains (only what exists), or "" if none."""
    current = parse_save(existing_save)
    out: list[str] = []
    for table in TABLES:
        lines = current.get(table, [])
        have = _rules(lines)
        declared = _declared(lines)
        body: list[str] = []
        for rule in have:
            parts = rule.split()
            chain = parts[1]
            if chain not in CHAINS and "-j" in parts and parts[parts.index("-j") + 1] in CHAINS:
                body.append("-D" + rule[2:])
        ours = [c for c in chains_of(table) if c in declared]
        body.extend(f"-F {c}" for c in ours)
        body.extend(f"-X {c}" for c in ours)
        if body:
            out.extend([f"*{table}", *body, "COMMIT"])
    return "\n".join(out) + "\n" if out else ""


def has_our_chains(existing_save: str) -> bool:
    current = parse_save(existing_save)
    return any(c in _declared(lines) for lines in current.values() for c in CHAINS)


@dataclass(frozen=True)
class RuleDiff:
    table: str
    missing: list[str]
    extra: list[str]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra


def diff_rules(existing_save: str, family: Family, p: RuleParams = DEFAULT_PARAMS) -> list[RuleDiff]:
    """Compare a netns's ``iptables-save`` with the expected set. Extra = lines in or jumping to our chains
    that should not be there (including duplicates); foreign rules elsewhere are not our business."""
    current = parse_save(existing_save)
    result = []
    for table, expected in expected_rules(family, p).items():
        have = [
            r
            for r in _rules(current.get(table, []))
            if r.split()[1] in CHAINS or any(f"-j {c}" == r.split(" ", 2)[-1] for c in CHAINS)
        ]
        missing = [r for r in expected if r not in have]
        extra = list(have)
        for r in expected:
            if r in extra:
                extra.remove(r)
        result.append(RuleDiff(table, missing, extra))
    return result


def normalise_save(text: str) -> str:
    """``iptables-save`` text with comments dropped and counters zeroed (for golden comparisons)."""
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
    return "\n".join(out) + "\n"
