"""The policy routing TPROXY needs, through netlink (pyroute2), in the calling thread's netns.

``ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`` and ``ip route add local 0.0.0.0/0 dev lo table 100``
(``::/0`` for IPv6). Idempotent: an existing rule is refused by the kernel (EEXIST, taken as done), the route is
replaced; removal finds the existing entries and removes them once.

``install`` is on every enrolled ADD: pyroute2's ``IPRoute`` spends ~1.5 ms of CPU there (an event loop per
instance, request filters, one round trip per call). So ``install`` encodes its messages with pyroute2's message
classes once per (families, parameters), the same bytes ``IPRoute`` sends, and sends them in one datagram on a
plain netlink socket: one round trip, ~0.1 ms. ``remove`` sends the same rule and route messages as deletions
(the copies to delete found with ``IPRoute``, as ``present`` does).
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_DELRULE, RTM_NEWLINK, RTM_NEWROUTE, RTM_NEWRULE
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_TO_TBL, fibmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nodeagent.dataplane.rules import DEFAULT_PARAMS, Family, RuleParams

RT_SCOPE_HOST = 254
RTN_LOCAL = 2
RTPROT_STATIC = 4  # what IPRoute.route() sets by default
LO_INDEX = 1
NETLINK_TIMEOUT_S = 5.0
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLMSGERR = struct.Struct("=i")


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


def _rule(family: Family, p: RuleParams) -> fibmsg:
    """Our fwmark rule (``ip rule ... fwmark <connmark>/<mask> pref <priority> lookup <table>``): added by
    ``install``, deleted by ``remove``."""
    msg = fibmsg()
    for key, value in (("family", _af(family)), ("table", p.route_table if p.route_table < 256 else 0),
                       ("action", FR_ACT_TO_TBL)):
        msg[key] = value
    msg["attrs"] = [("FRA_FWMARK", p.connmark), ("FRA_FWMASK", p.mask), ("FRA_TABLE", p.route_table),
                    ("FRA_PRIORITY", p.rule_priority)]
    return msg


def _route(family: Family, p: RuleParams) -> rtmsg:
    """Our local default route (``ip route ... local <any>/0 dev lo table <table>``): added by ``install``, deleted
    by ``remove``."""
    msg = rtmsg()
    for key, value in (("family", _af(family)), ("table", p.route_table if p.route_table < 256 else 0),
                       ("proto", RTPROT_STATIC), ("scope", RT_SCOPE_HOST), ("type", RTN_LOCAL)):
        msg[key] = value
    msg["attrs"] = [("RTA_OIF", LO_INDEX), ("RTA_TABLE", p.route_table)]
    return msg


def _lo_up() -> ifinfmsg:
    msg = ifinfmsg()
    for key, value in (("index", LO_INDEX), ("flags", IFF_UP), ("change", IFF_UP)):
        msg[key] = value
    return msg


def _encode(msg: Any, msg_type: int, flags: int, seq: int) -> bytes:
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


@functools.lru_cache(maxsize=16)
def install_batch(families: tuple[Family, ...], p: RuleParams = DEFAULT_PARAMS) -> tuple[bytes, frozenset[int]]:
    """The netlink requests of ``install``, in order: lo up; per family the rule (NLM_F_EXCL: the kernel refuses a
    duplicate with EEXIST) and the route (NLM_F_REPLACE). Returns (the concatenated requests, the sequence
    numbers whose EEXIST means "already there")."""
    parts = [_encode(_lo_up(), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1)]
    exists_ok = set()
    for fam in families:
        seq = len(parts) + 1
        parts.append(_encode(_rule(fam, p), RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq))
        exists_ok.add(seq)
        parts.append(_encode(_route(fam, p), RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
                             len(parts) + 1))
    return b"".join(parts), frozenset(exists_ok)


def install(families: list[Family], p: RuleParams = DEFAULT_PARAMS) -> None:
    """lo up, the fwmark rule and the local route per family: one datagram, one ack per request (the kernel
    handles the requests in order and acks each). Raises NetlinkError for the first request that failed."""
    batch, exists_ok = install_batch(tuple(families), p)
    failed = _exchange(batch, 1 + 2 * len(families))
    errors = {seq: code for seq, code in failed.items() if not (code == errno.EEXIST and seq in exists_ok)}
    if errors:
        first = min(errors)
        what = "lo up" if first == 1 else ("rule add" if first in exists_ok else "route replace")
        raise NetlinkError(errors[first], f"{what}: {errno.errorcode.get(errors[first], errors[first])}")


def remove(families: list[Family], p: RuleParams = DEFAULT_PARAMS) -> None:
    """Delete our rule and route per family, once for every copy found (the same messages ``install`` adds);
    best effort: a copy already gone is no error."""
    parts: list[bytes] = []
    with IPRoute() as ipr:
        for fam in families:
            for _ in _our_rules(ipr, fam, p):
                parts.append(_encode(_rule(fam, p), RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, len(parts) + 1))
            for _ in _our_routes(ipr, fam, p):
                parts.append(_encode(_route(fam, p), RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, len(parts) + 1))
    if parts:
        _exchange(b"".join(parts), len(parts))


def _exchange(batch: bytes, count: int) -> dict[int, int]:
    """Send ``batch`` (``count`` requests numbered 1..count) in one datagram on a plain netlink socket and wait
    for every ack; returns the errno of each request that failed, by sequence number."""
    errors: dict[int, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(NETLINK_TIMEOUT_S)
        sock.bind((0, 0))
        sock.send(batch)
        acked: set[int] = set()
        while len(acked) < count:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, msg_type, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if msg_type == NLMSG_ERROR and 0 < seq <= count:
                    (code,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                    acked.add(seq)
                    if code:
                        errors[seq] = -code
                offset += max((length + 3) & ~3, _NLMSGHDR.size)
    return errors


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
