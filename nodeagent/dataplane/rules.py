"""The in-pod redirection rules, generated (pure: no effects here).

The contract is the ``iptables-save`` output printed by the seed ("Comprobar la configuración de las reglas de
iptables"): mangle ``ISTIO_PRERT``/``ISTIO_OUTPUT`` (TPROXY to 15008/15006) and nat ``ISTIO_OUTPUT`` (REDIRECT to
15001), with the jumps from PREROUTING/OUTPUT. That is the default ``Variant``. The other variants (each with
golden files) are:

- ``mode=REDIRECT``: Istio's current rule set. nat ``ISTIO_PRERT`` REDIRECTs inbound TCP to 15006 except
  ``--dport 15008`` (ztunnel listens on 15008 itself); mangle keeps only the connmark pair.
- ``dns_capture``: nat ``ISTIO_OUTPUT`` sends UDP and TCP port 53 to 15053 (the proxy's DNS port), and the raw
  table puts the proxy's upstream DNS traffic and its answers in conntrack zone 1.
- ``inbound_capture=False`` (pod annotation ``ambient.istio.io/bypass-inbound-capture: "true"``): no inbound
  capture and no probe ACCEPT; the connmark rules stay (inbound HBONE replies need them).
- ``reroute_interfaces`` (pod annotation ``istio.io/reroute-virtual-interfaces: "a,b"``): inbound TCP on those
  interfaces goes to the outbound port 15001, first in nat ``ISTIO_PRERT``; in TPROXY mode the same interfaces
  first RETURN from mangle ``ISTIO_PRERT`` so that TPROXY does not take them.

This module turns parameters into ``iptables-restore --noflush`` input that is atomic per table and
idempotent, into the removal input, and into the expected ``iptables-save`` lines that ``doctor`` and the
reconcile compare with what a netns really holds. Every rule is written the way ``iptables-save`` prints it
(``-m tcp`` spelled out, addresses with their prefix length), so generated text and expected text are one.

Idempotency: declaring ``:ISTIO_PRERT - [0:0]`` under ``--noflush`` flushes (or creates) our chain, so the chain
bodies are always re-added exactly once. Jumps from built-in chains cannot be handled that way without flushing
foreign rules, so the generator takes the netns's current ``iptables-save`` text and adds only missing jumps
(and deletes duplicated or unexpected ones). Chains of ours that the variant does not use (a variant change)
are emptied and deleted in the same transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

CHAINS = ("ISTIO_OUTPUT", "ISTIO_PRERT")  # our in-pod chains, in the order iptables-save lists them
TABLES = ("mangle", "nat")  # the tables of the default (seed) variant
POD_TABLES = ("mangle", "nat", "raw")  # every table a variant may use
BUILTIN_CHAINS = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
HOOK_OF = {"ISTIO_PRERT": "PREROUTING", "ISTIO_OUTPUT": "OUTPUT"}
# Linux interface names as Istio validates them (``pkg/util/net``): a letter, then letters, digits, ``_.-``.
INTERFACE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,14}$")


class Family(Enum):
    V4 = 4
    V6 = 6

    @property
    def save_cmd(self) -> str:
        return "iptables-save" if self is Family.V4 else "ip6tables-save"

    @property
    def restore_cmd(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"


class RedirectMode(Enum):
    TPROXY = "tproxy"  # the seed's rules (default)
    REDIRECT = "redirect"  # Istio's rules since 1.23 (the only mode since 1.25)


@dataclass(frozen=True)
class RuleParams:
    """Every number the rules use; the defaults are the seed's (and ztunnel's) values."""

    ztunnel_mark: int = 0x539  # ztunnel's SO_MARK 1337
    connmark: int = 0x111
    mask: int = 0xFFF
    inbound_tunnel_port: int = 15008  # HBONE
    inbound_plain_port: int = 15006
    outbound_port: int = 15001
    dns_port: int = 15053
    dns_ct_zone: int = 1
    probe_v4: str = "169.254.7.127"
    probe_v6: str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    probe_set_prefix: str = "istio-inpod-probes"
    route_table: int = 100
    rule_priority: int = 32764

    def localhost(self, family: Family) -> str:
        return "127.0.0.1/32" if family is Family.V4 else "::1/128"

    def probe(self, family: Family) -> str:
        return f"{self.probe_v4}/32" if family is Family.V4 else f"{self.probe_v6}/128"

    def probe_address(self, family: Family) -> str:
        return self.probe_v4 if family is Family.V4 else self.probe_v6

    def probe_set(self, family: Family) -> str:
        return f"{self.probe_set_prefix}-v{family.value}"

    def any_ip(self, family: Family) -> str:
        return "0.0.0.0" if family is Family.V4 else "::"


DEFAULT_PARAMS = RuleParams()


@dataclass(frozen=True)
class Variant:
    """Which rule set a pod gets: the agent's mode and DNS default combined with the pod's annotations."""

    mode: RedirectMode = RedirectMode.TPROXY
    dns_capture: bool = False
    inbound_capture: bool = True
    reroute_interfaces: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in self.reroute_interfaces:
            if not INTERFACE_NAME.match(name):
                raise ValueError(f"invalid interface name {name!r} (a letter, then up to 14 of A-Z a-z 0-9 _ . -)")

    @property
    def name(self) -> str:
        """``tproxy``, ``redirect_dns``, ``tproxy_ingress_vif``, ... (golden file stems, logs)."""
        parts = [self.mode.value]
        if self.dns_capture:
            parts.append("dns")
        if not self.inbound_capture:
            parts.append("ingress")
        if self.reroute_interfaces:
            parts.append("vif")
        return "_".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "mode": self.mode.value,
            "dns_capture": self.dns_capture,
            "inbound_capture": self.inbound_capture,
            "reroute_interfaces": list(self.reroute_interfaces),
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Variant:
        interfaces = raw.get("reroute_interfaces") or []
        return cls(
            mode=RedirectMode(str(raw.get("mode", RedirectMode.TPROXY.value))),
            dns_capture=bool(raw.get("dns_capture", False)),
            inbound_capture=bool(raw.get("inbound_capture", True)),
            reroute_interfaces=tuple(str(i) for i in interfaces) if isinstance(interfaces, list) else (),
        )


DEFAULT_VARIANT = Variant()


def _mark(value: int, mask: int) -> str:
    return f"{value:#x}/{mask:#x}"


def _bodies(table: str, family: Family, p: RuleParams, v: Variant) -> dict[str, list[str]]:
    """{chain: rules} for every chain of ours the variant uses in ``table`` (a body may be empty), in the
    order ``iptables-save`` lists them. An empty dict: the variant does not use the table."""
    zt = _mark(p.ztunnel_mark, p.mask)
    cm = _mark(p.connmark, p.mask)
    lo = p.localhost(family)
    probe = p.probe(family)
    any_ip = p.any_ip(family)
    tproxy = v.mode is RedirectMode.TPROXY
    if table == "mangle":
        prert: list[str] = []
        if tproxy and v.inbound_capture:
            prert += [f"-A ISTIO_PRERT -i {i} -p tcp -j RETURN" for i in v.reroute_interfaces]
        prert.append(f"-A ISTIO_PRERT -m mark --mark {zt} -j CONNMARK --set-xmark {cm}")
        if tproxy and v.inbound_capture:
            prert += [
                f"-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT",
                f"-A ISTIO_PRERT ! -d {lo} -i lo -p tcp -j ACCEPT",
                f"-A ISTIO_PRERT -p tcp -m tcp --dport {p.inbound_tunnel_port} -m mark ! --mark {zt} "
                f"-j TPROXY --on-port {p.inbound_tunnel_port} --on-ip {any_ip} --tproxy-mark {cm}",
                "-A ISTIO_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                f"-A ISTIO_PRERT ! -d {lo} -p tcp -m mark ! --mark {zt} "
                f"-j TPROXY --on-port {p.inbound_plain_port} --on-ip {any_ip} --tproxy-mark {cm}",
            ]
        output = [
            f"-A ISTIO_OUTPUT -m connmark --mark {cm} -j CONNMARK --restore-mark "
            "--nfmask 0xffffffff --ctmask 0xffffffff",
        ]
        return {"ISTIO_OUTPUT": output, "ISTIO_PRERT": prert}
    if table == "nat":
        output = [f"-A ISTIO_OUTPUT -d {probe} -p tcp -m tcp -j ACCEPT"]
        if v.dns_capture:
            output += [
                f"-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark {zt} -m udp --dport 53 "
                f"-j REDIRECT --to-ports {p.dns_port}",
                f"-A ISTIO_OUTPUT ! -d {lo} -p tcp -m tcp --dport 53 -m mark ! --mark {zt} "
                f"-j REDIRECT --to-ports {p.dns_port}",
            ]
        output += [
            f"-A ISTIO_OUTPUT -p tcp -m mark --mark {cm} -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -d {lo} -o lo -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -d {lo} -p tcp -m mark ! --mark {zt} -j REDIRECT --to-ports {p.outbound_port}",
        ]
        bodies = {"ISTIO_OUTPUT": output}
        if not tproxy or v.reroute_interfaces:
            nat_prert: list[str] = []
            for i in v.reroute_interfaces:
                nat_prert += [
                    f"-A ISTIO_PRERT -i {i} -p tcp -j REDIRECT --to-ports {p.outbound_port}",
                    f"-A ISTIO_PRERT -i {i} -p tcp -j RETURN",
                ]
            if not tproxy and v.inbound_capture:
                nat_prert += [
                    f"-A ISTIO_PRERT -s {probe} -p tcp -m tcp -j ACCEPT",
                    f"-A ISTIO_PRERT ! -d {lo} -p tcp -m tcp ! --dport {p.inbound_tunnel_port} -m mark ! --mark {zt} "
                    f"-j REDIRECT --to-ports {p.inbound_plain_port}",
                ]
            bodies["ISTIO_PRERT"] = nat_prert
        return bodies
    if table == "raw":
        if not v.dns_capture:
            return {}
        return {
            "ISTIO_OUTPUT": [
                f"-A ISTIO_OUTPUT -p udp -m mark --mark {zt} -m udp --dport 53 -j CT --zone {p.dns_ct_zone}"
            ],
            "ISTIO_PRERT": [
                f"-A ISTIO_PRERT -p udp -m mark ! --mark {zt} -m udp --sport 53 -j CT --zone {p.dns_ct_zone}"
            ],
        }
    raise ValueError(f"no rules for table {table!r}")


def chains_of(table: str, variant: Variant = DEFAULT_VARIANT) -> tuple[str, ...]:
    """Our chains in ``table`` for ``variant``, in the order ``iptables-save`` lists them."""
    return tuple(_bodies(table, Family.V4, DEFAULT_PARAMS, variant))


def jump_rules(table: str, variant: Variant = DEFAULT_VARIANT) -> list[str]:
    """The jumps from built-in chains into ours, as ``iptables-save`` prints them (built-in chain order)."""
    chains = chains_of(table, variant)
    order = BUILTIN_CHAINS[table]
    return [f"-A {HOOK_OF[c]} -j {c}" for c in sorted(chains, key=lambda c: order.index(HOOK_OF[c]))]


def chain_rules(
    table: str, family: Family, p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> list[str]:
    """The bodies of our chains in ``table``, exactly as ``iptables-save`` prints them."""
    return [rule for body in _bodies(table, family, p, variant).values() for rule in body]


def expected_rules(
    family: Family, p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> dict[str, list[str]]:
    """Per table the variant uses: every ``-A`` line (jumps first, then our chains) a redirected netns holds."""
    return {
        t: [*jump_rules(t, variant), *chain_rules(t, family, p, variant)]
        for t in POD_TABLES
        if chains_of(t, variant)
    }


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


def _chain(rule: str) -> str:
    return rule.split()[1]


def _target(rule: str) -> str:
    parts = rule.split()
    return parts[parts.index("-j") + 1] if "-j" in parts[:-1] else ""


def _is_jump_into(rule: str, chains: tuple[str, ...]) -> bool:
    return _chain(rule) not in chains and _target(rule) in chains


def _reconcile_jumps(have: list[str], wanted: list[str], chains: tuple[str, ...]) -> list[str]:
    """Restore lines that leave exactly one copy of each wanted jump and no other jump into ``chains``."""
    out: list[str] = []
    kept: set[str] = set()
    for rule in have:
        if not _is_jump_into(rule, chains):
            continue
        if rule in wanted and rule not in kept:
            kept.add(rule)
        else:
            out.append("-D" + rule[2:])
    out.extend(j for j in wanted if j not in kept)
    return out


def install_input(
    family: Family, existing_save: str = "", p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> str:
    """``iptables-restore --noflush`` input installing ``variant``, one COMMIT (one transaction) per table.

    ``existing_save`` is the netns's current ``iptables-save`` output; jumps already present once are kept,
    missing ones added, duplicated or unexpected ones deleted; chains of ours the variant does not use are
    removed. A table the variant does not use and that holds none of our chains is not mentioned (so no
    empty table appears). Applying the result twice leaves one copy.
    """
    current = parse_save(existing_save)
    out: list[str] = []
    for table in POD_TABLES:
        lines = current.get(table, [])
        wanted = chains_of(table, variant)
        stale = [c for c in CHAINS if c in _declared(lines) and c not in wanted]
        if not wanted and not stale:
            continue
        out.append(f"*{table}")
        out.extend(f":{c} - [0:0]" for c in wanted)
        out.extend(_reconcile_jumps(_rules(lines), jump_rules(table, variant), CHAINS))
        out.extend(f"-F {c}" for c in stale)
        out.extend(f"-X {c}" for c in stale)
        out.extend(chain_rules(table, family, p, variant))
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def first_install_input(family: Family, p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT) -> str:
    """``iptables-restore --noflush`` input installing ``variant`` in a netns that holds none of our chains yet;
    needs no ``iptables-save`` first, so a fresh pod costs one exec per family instead of two.

    ``-N`` creates each chain and fails its table's transaction when the chain exists already (nothing of that
    table is applied then). A jump can only point at an existing chain, so while the chain is new no jump to it
    exists and adding the jumps cannot duplicate them. On failure the caller falls back to ``install_input``
    with the netns's current ``iptables-save`` (tables committed before the failing one are taken as found), which
    also removes another variant's chains. Every variant has both chains in mangle, the first table, so a netns
    holding any complete install refuses at once. Tables the variant does not use are not mentioned (naming one
    would create it); a chain of ours left only there (a removal cut short between tables, a hand edit) is not
    seen here but is drift, which the reconcile's repair removes. Applied to a fresh netns, the result equals
    ``install_input(family, "", p, variant)``'s.
    """
    out: list[str] = []
    for table in POD_TABLES:
        chains = chains_of(table, variant)
        if not chains:
            continue
        out.append(f"*{table}")
        out.extend(f"-N {c}" for c in chains)
        out.extend(jump_rules(table, variant))
        out.extend(chain_rules(table, family, p, variant))
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def _removal(existing_save: str, chains: tuple[str, ...]) -> str:
    current = parse_save(existing_save)
    out: list[str] = []
    for table, lines in current.items():
        body = ["-D" + rule[2:] for rule in _rules(lines) if _is_jump_into(rule, chains)]
        ours = [c for c in chains if c in _declared(lines)]
        body.extend(f"-F {c}" for c in ours)
        body.extend(f"-X {c}" for c in ours)
        if body:
            out.extend([f"*{table}", *body, "COMMIT"])
    return "\n".join(out) + "\n" if out else ""


def removal_input(existing_save: str) -> str:
    """``iptables-restore --noflush`` input removing our jumps and chains (only what exists), or "" if none."""
    return _removal(existing_save, CHAINS)


@dataclass(frozen=True)
class RuleDiff:
    table: str
    missing: list[str]
    extra: list[str]
    misplaced: list[str] = field(default_factory=list)  # present but not where it must be (host jump)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra and not self.misplaced


def _diff(have: list[str], expected: list[str]) -> tuple[list[str], list[str]]:
    missing = [r for r in expected if r not in have]
    extra = list(have)
    for r in expected:
        if r in extra:
            extra.remove(r)
    return missing, extra


def diff_rules(
    existing_save: str, family: Family, p: RuleParams = DEFAULT_PARAMS, variant: Variant = DEFAULT_VARIANT
) -> list[RuleDiff]:
    """Compare a netns's ``iptables-save`` with the variant's expected set. Extra = lines in or jumping to our
    chains that should not be there (duplicates, another variant's rules); foreign rules elsewhere are not our
    business. One entry per table the variant uses, plus any other table holding lines of ours."""
    current = parse_save(existing_save)
    expected_by_table = expected_rules(family, p, variant)
    result = []
    for table in POD_TABLES:
        have = [r for r in _rules(current.get(table, [])) if _chain(r) in CHAINS or _is_jump_into(r, CHAINS)]
        expected = expected_by_table.get(table, [])
        if not have and not expected:
            continue
        missing, extra = _diff(have, expected)
        result.append(RuleDiff(table, missing, extra))
    return result


def detect_variant(existing_save: str) -> Variant | None:
    """The variant a netns's rules look like (for ``doctor`` when the agent cannot say), or None if no rules.

    With inbound capture off and virtual interfaces set, both modes install the same rules; TPROXY is named."""
    current = parse_save(existing_save)
    if not any(c in _declared(lines) for lines in current.values() for c in CHAINS):
        return None
    mangle = _rules(current.get("mangle", []))
    nat = _rules(current.get("nat", []))
    tproxy_inbound = any("-j TPROXY" in r for r in mangle)
    redirect_inbound = any(r.startswith("-A ISTIO_PRERT") and "--to-ports 15006" in r for r in nat)
    interfaces = tuple(
        dict.fromkeys(r.split()[3] for r in nat if r.startswith("-A ISTIO_PRERT -i ") and "-j REDIRECT" in r)
    )
    nat_prerouting = "-A PREROUTING -j ISTIO_PRERT" in nat
    if tproxy_inbound:
        mode = RedirectMode.TPROXY
    elif redirect_inbound or (nat_prerouting and not interfaces):
        mode = RedirectMode.REDIRECT
    else:
        mode = RedirectMode.TPROXY
    dns = any("--dport 53" in r for r in nat)
    try:
        return Variant(mode, dns, tproxy_inbound or redirect_inbound, interfaces)
    except ValueError:
        return None


def normalise_save(text: str) -> str:
    """``iptables-save`` text with comments dropped and counters zeroed (for golden comparisons)."""
    out = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        out.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
    return "\n".join(out) + "\n"
