"""The policy routing TPROXY needs, through netlink (pyroute2), in the calling thread's netns.

``ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`` and ``ip route add local 0.0.0.0/0 dev lo table 100``
(``::/0`` for IPv6). Idempotent: existing entries are found and left alone (or removed once).
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.dataplane.rules import DEFAULT_PARAMS, Family, RuleParams

RT_SCOPE_HOST = 254
LO_INDEX = 1


def _af(family: Family) -> int:
    return socket.AF_INET if family is Family.V4 else socket.AF_INET6


def _our_rules(ipr: IPRoute, family: Family, p: RuleParams) -> list[Any]:
    found = []
    for r in ipr.get_rules(family=_af(family)):
        if (
            r.get("table") == p.route_table or r.get_attr("FRA_TABLE") == p.route_table
        ) and r.get_attr("FRA_FWMARK") == p.connmark and r.get_attr("FRA_PRIORITY") == p.rule_priority:
            found.append(r)
    return found


def _our_routes(ipr: IPRoute, family: Family, p: RuleParams) -> list[Any]:
    try:
        routes = ipr.get_routes(family=_af(family), table=p.route_table)
    except NetlinkError:
        return []
    return [r for r in routes if r.get("dst_len") == 0 and r.get("type") == 2]  # RTN_LOCAL


def install(families: list[Family], p: RuleParams = DEFAULT_PARAMS) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=LO_INDEX, state="up")
        for fam in families:
            if not _our_rules(ipr, fam, p):
                ipr.rule(
                    "add",
                    family=_af(fam),
                    fwmark=p.connmark,
                    fwmask=p.mask,
                    table=p.route_table,
                    priority=p.rule_priority,
                )
            dst = "0.0.0.0/0" if fam is Family.V4 else "::/0"
            ipr.route(
                "replace",
                family=_af(fam),
                dst=dst,
                type="local",
                oif=LO_INDEX,
                table=p.route_table,
                scope=RT_SCOPE_HOST,
            )


def remove(families: list[Family], p: RuleParams = DEFAULT_PARAMS) -> None:
    with IPRoute() as ipr:
        for fam in families:
            for _ in _our_rules(ipr, fam, p):
                try:
                    ipr.rule(
                        "del",
                        family=_af(fam),
                        fwmark=p.connmark,
                        fwmask=p.mask,
                        table=p.route_table,
                        priority=p.rule_priority,
                    )
                except NetlinkError:
                    pass
            dst = "0.0.0.0/0" if fam is Family.V4 else "::/0"
            for _ in _our_routes(ipr, fam, p):
                try:
                    ipr.route(
                        "del", family=_af(fam), dst=dst, type="local", oif=LO_INDEX, table=p.route_table,
                        scope=RT_SCOPE_HOST,
                    )
                except NetlinkError:
                    pass


def present(families: list[Family], p: RuleParams = DEFAULT_PARAMS) -> dict[str, bool]:
    """For doctor/tests: {"v4 rule": bool, "v4 route": bool, ...}."""
    out: dict[str, bool] = {}
    with IPRoute() as ipr:
        for fam in families:
            tag = f"v{fam.value}"
            out[f"{tag} rule"] = bool(_our_rules(ipr, fam, p))
            out[f"{tag} route"] = bool(_our_routes(ipr, fam, p))
    return out


def addresses() -> tuple[str, ...]:
    """The calling thread's netns's global unicast addresses as CIDR strings (a pod's IPs when the request
    named none, e.g. a pod enrolled by the reconcile without a CNI event)."""
    out: list[str] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            if msg.get("scope") != 0:  # RT_SCOPE_UNIVERSE only: no lo, no link-local
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append(f"{addr}/{msg.get('prefixlen')}")
    return tuple(out)
