"""The seed's three debugging checks, and a fourth, as pure functions over collected evidence (``doctor``).

1. logs: the agent's log (JSON lines) and the ztunnel/peer log mention the pod, and the peer's last word on it
   is "received netns, starting proxy" (not a delete);
2. sockets: 15001, 15006 and 15008 are listening inside the pod netns (``ss -ntlp`` output);
3. rules: the netns's ``iptables-save`` holds exactly the expected ISTIO lines of the pod's variant
   (missing/extra shown), and the policy routing is in place;
4. probe path and variant: the node netns's SNAT rule is the first POSTROUTING rule, the pod's IPs are in the
   probe sets with its UID, DNS capture's rules match the pod's setting, and the redirection mode in use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from nodeagent.dataplane import guardrails, hostrules, rules
from nodeagent.dataplane.hostrules import SetEntry
from nodeagent.dataplane.rules import DEFAULT_PARAMS, DEFAULT_VARIANT, Family, RuleParams, Variant

PROXY_PORTS = (15001, 15006, 15008)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class CheckResult:
    title: str
    status: str
    evidence: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def agent_log_lines(text: str, uid: str, namespace: str, name: str, limit: int = 8) -> list[str]:
    """Agent JSON-log lines about the pod, rendered ``time level msg`` (last ``limit``)."""
    out = []
    for raw in text.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        by_uid = uid and rec.get("pod_uid") == uid
        by_name = rec.get("pod_namespace") == namespace and rec.get("pod_name") == name and namespace
        if by_uid or by_name:
            extra = {k: v for k, v in rec.items() if k not in {"time", "level", "msg", "scope"}}
            detail = " ".join(f"{k}={v}" for k, v in extra.items() if k.startswith(("state", "netns", "error")))
            out.append(f"{rec.get('time', '?')} {rec.get('level', '?')} {rec.get('msg', '')} {detail}".rstrip())
    return out[-limit:]


def peer_log_lines(text: str, uid: str, limit: int = 8) -> list[str]:
    return [ln for ln in text.splitlines() if uid and uid in ln][-limit:]


def check_logs(agent_lines: list[str] | None, peer_lines: list[str] | None, uid: str) -> CheckResult:
    res = CheckResult("logs: the agent and ztunnel know the pod", PASS)
    if not uid:
        res.status = SKIP
        res.problems.append("pod uid unknown (agent not reachable and no netns hint): logs not checked")
        return res
    if agent_lines is None:
        res.problems.append("agent log not readable")
    elif not agent_lines:
        res.problems.append(f"no agent log line for uid {uid}")
    else:
        res.evidence += [f"agent: {ln}" for ln in agent_lines]
    if peer_lines is not None:
        if not peer_lines:
            res.problems.append(f"no ztunnel/peer log line for uid {uid}")
        else:
            res.evidence += [f"ztunnel: {ln}" for ln in peer_lines]
            if "received netns, starting proxy" not in peer_lines[-1]:
                res.problems.append("ztunnel's last event for the pod is not 'received netns, starting proxy'")
    if res.problems:
        res.status = FAIL
    return res


def listening_ports(ss_output: str) -> dict[int, list[str]]:
    """Parse ``ss -ntlp`` output -> {port: [lines]} for listening TCP sockets."""
    found: dict[int, list[str]] = {}
    for line in ss_output.splitlines():
        cols = line.split()
        if len(cols) < 4 or cols[0] not in ("LISTEN",):
            continue
        local = cols[3]
        try:
            port = int(local.rsplit(":", 1)[1])
        except (IndexError, ValueError):
            continue
        found.setdefault(port, []).append(" ".join(cols))
    return found


def check_sockets(ss_output: str) -> CheckResult:
    res = CheckResult("sockets: 15001/15006/15008 listening inside the pod netns", PASS)
    ports = listening_ports(ss_output)
    for port in PROXY_PORTS:
        if port in ports:
            res.evidence += ports[port]
        else:
            res.problems.append(f"nothing listens on {port}")
    if res.problems:
        res.status = FAIL
    return res


def check_rules(
    saves: dict[Family, str],
    route_lines: dict[Family, str],
    variant: Variant = DEFAULT_VARIANT,
    params: RuleParams = DEFAULT_PARAMS,
) -> CheckResult:
    """``saves``: family -> iptables-save text; ``route_lines``: family -> ``ip rule`` + table 100 routes."""
    res = CheckResult(f"iptables: the redirection rules match the expected set ({variant.name})", PASS)
    for fam, text in saves.items():
        tag = "iptables" if fam is Family.V4 else "ip6tables"
        expected = rules.expected_rules(fam, params, variant)
        for d in rules.diff_rules(text, fam, params, variant):
            res.problems += [f"{tag} -t {d.table}: missing  {ln}" for ln in d.missing]
            res.problems += [f"{tag} -t {d.table}: extra    {ln}" for ln in d.extra]
            if d.ok:
                res.evidence.append(f"{tag} -t {d.table}: {len(expected.get(d.table, []))} rules as expected")
        if guardrails.present(text):
            res.problems.append(f"{tag} -t filter: DROP guardrails ({guardrails.GUARD_CHAIN}) in place: a repair "
                                "has not finished; the pod's TCP/UDP traffic is stopped")
    p = params
    for fam, text in route_lines.items():
        ip = "ip" if fam is Family.V4 else "ip -6"
        want_rule = f"fwmark {p.connmark:#x}/{p.mask:#x} lookup {p.route_table}"
        if want_rule in text:
            res.evidence.append(f"{ip} rule: {want_rule}")
        else:
            res.problems.append(f"{ip} rule: missing  {want_rule}")
        if "local default dev lo" in text:
            res.evidence.append(f"{ip} route table {p.route_table}: local default dev lo")
        else:
            res.problems.append(f"{ip} route table {p.route_table}: missing  local default dev lo")
    if res.problems:
        res.status = FAIL
    return res


def check_probe_path(
    host_saves: Mapping[Family, str] | None,
    set_entries: Mapping[SetEntry, str] | None,
    addresses: list[str],
    uid: str,
    variant: Variant,
    variant_source: str,
    pod_saves: Mapping[Family, str],
    host_netns: str = "",
    params: RuleParams = DEFAULT_PARAMS,
) -> CheckResult:
    """Check 4. ``host_saves``/``set_entries`` None: the node netns could not be read (the check is skipped
    for those parts, with the reason in ``host_netns``)."""
    res = CheckResult("probe path and variant: node SNAT rule first, pod IPs in the probe set, DNS, mode", PASS)
    res.evidence.append(f"redirection mode: {variant.mode.value} (from {variant_source}); inbound capture: "
                        f"{'on' if variant.inbound_capture else 'off (bypass-inbound-capture)'}"
                        + (f"; rerouted interfaces: {', '.join(variant.reroute_interfaces)}"
                           if variant.reroute_interfaces else ""))
    # DNS capture: the pod's nat and raw rules say what its setting is
    v4 = pod_saves.get(Family.V4, "")
    has_dns = f"--to-ports {params.dns_port}" in v4 and f"-j CT --zone {params.dns_ct_zone}" in v4
    if variant.dns_capture:
        if has_dns:
            res.evidence.append(f"DNS capture: on (nat UDP/TCP 53 -> {params.dns_port}, raw CT zone "
                                f"{params.dns_ct_zone} present)")
        else:
            res.problems.append(f"DNS capture is on for the pod but its rules to {params.dns_port} / CT zone "
                                f"{params.dns_ct_zone} are missing")
    elif has_dns:
        res.problems.append("DNS capture is off for the pod but its netns has DNS capture rules")
    else:
        res.evidence.append("DNS capture: off")
    if host_saves is None or set_entries is None:
        res.status = SKIP if not res.problems else FAIL
        res.problems.append(f"node netns not checked: {host_netns or 'unknown (agent unreachable; use --host-netns)'}")
        return res
    entries = hostrules.entries_of(addresses)
    families = sorted({e.family for e in entries} | {Family.V4}, key=lambda f: f.value)
    for fam in families:
        tag = "iptables" if fam is Family.V4 else "ip6tables"
        save = host_saves.get(fam)
        if save is None:
            res.problems.append(f"{tag} -t nat of the node netns not readable")
            continue
        d = hostrules.host_diff(save, fam, params)
        res.problems += [f"node {tag} -t nat: missing  {ln}" for ln in d.missing]
        res.problems += [f"node {tag} -t nat: extra    {ln}" for ln in d.extra]
        res.problems += [f"node {tag} -t nat: {ln} is not the first POSTROUTING rule" for ln in d.misplaced]
        if d.ok:
            res.evidence.append(f"node {host_netns} {tag} -t nat: POSTROUTING rule 1 -j {hostrules.HOST_CHAIN}")
            res.evidence.append(f"  {hostrules.host_chain_rule(fam, params)}")
    if not entries:
        res.problems.append("the pod's IPs are not known: probe-set membership not checked")
    for entry in entries:
        name = params.probe_set(entry.family)
        comment = set_entries.get(entry)
        if comment is None:
            res.problems.append(f"{name}: {entry.ip} missing (kubelet probes would go through the proxy)")
        elif uid and comment != uid:
            res.problems.append(f"{name}: {entry.ip} belongs to pod uid {comment}, not {uid}")
        else:
            res.evidence.append(f"{name}: {entry.ip} comment {comment}")
    if res.problems:
        res.status = FAIL
    return res


def render(header: list[str], results: list[CheckResult]) -> str:
    lines = [*header, ""]
    for i, r in enumerate(results, 1):
        lines.append(f"[{r.status}] {i}. {r.title}")
        lines += [f"       {ln}" for ln in r.evidence]
        lines += [f"     ! {ln}" for ln in r.problems]
        lines.append("")
    failed = sum(1 for r in results if r.status == FAIL)
    lines.append(
        f"Result: {'all checks passed' if not failed else f'{failed} of {len(results)} checks failed'}"
    )
    return "\n".join(lines)
