"""``ambient-cni doctor``: the seed's three debugging checks for one pod, plus the probe path, with the evidence.

Resolves ``--pod NAMESPACE/NAME`` (checked as Kubernetes checks names) to its netns through the agent's
``/debug/pods`` (falling back to the plugin's netns hint ``<run_dir>/pods/<namespace>_<name>``, read through
``cni_plugin.hints``), or takes ``--netns PATH``; then reads the logs, the listening sockets and the iptables
rules inside the netns (``nsenter --net``: read-only commands). The fourth check reads the node netns (the
agent's ``--host-netns``, as ``/debug/dataplane`` reports it, or ``--host-netns``): its nat table and the probe
sets (a netlink dump). The pod's variant (mode, DNS capture, annotations) comes from the agent, else from the
pod's own rules. Exit 1 when a check fails, 2 when the pod cannot be found.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import click

from cli_options import option
from cni_plugin import defaults, hints, k8snames, rundir
from nodeagent.dataplane import diagnose, rules
from nodeagent.dataplane.netns import NetnsError, open_netns
from nodeagent.dataplane.rules import DEFAULT_VARIANT, Family, RuleParams, Variant


@dataclass
class Target:
    namespace: str = ""
    name: str = ""
    uid: str = ""
    netns_path: str = ""
    ips: tuple[str, ...] = ()
    source: str = ""
    verified_at: float | None = None  # from the agent's record: when it last found the redirection as expected


def fetch_records(health_addr: str, timeout: float = 3.0) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://{health_addr}/debug/pods", timeout=timeout) as resp:
        data = json.loads(resp.read())
    return [r for r in data if isinstance(r, dict)] if isinstance(data, list) else []


def fetch_dataplane(health_addr: str, timeout: float = 3.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{health_addr}/debug/dataplane", timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_record(rec: dict[str, Any], source: str) -> Target:
    ips = rec.get("ips") or ()
    return Target(
        namespace=str(rec.get("namespace", "")),
        name=str(rec.get("name", "")),
        uid=str(rec.get("uid", "")),
        netns_path=str(rec.get("netns_path", "") or rec.get("netns", "")),
        ips=tuple(str(i) for i in ips),
        source=source,
        verified_at=float(rec["verified_at"]) if isinstance(rec.get("verified_at"), int | float) else None,
    )


def verified_line(target: Target, now: float) -> str:
    """When the agent last verified the pod (its reconcile pass compares rules, ip rule and route)."""
    if not target.source.startswith("agent"):
        return "agent's last verification: unknown (no agent record of this pod)"
    if not target.verified_at:
        return "agent's last verification: not yet (it verifies every --reconcile-interval)"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(target.verified_at))
    return f"agent's last verification: {stamp} ({max(0.0, now - target.verified_at):.0f} s ago): rules as expected"


def resolve(pod: str | None, netns: str | None, run_dir: str, health_addr: str) -> tuple[Target, list[str]]:
    notes: list[str] = []
    records: list[dict[str, Any]] = []
    try:
        records = fetch_records(health_addr)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        notes.append(f"agent at {health_addr} not reachable ({getattr(exc, 'reason', exc)})")
    if netns:
        match = [r for r in records if r.get("netns_path") == netns]
        t = _from_record(match[-1], "agent") if match else Target(netns_path=netns, source="--netns")
        t.netns_path = netns
        return t, notes
    assert pod is not None
    namespace, _, name = pod.partition("/")
    if not namespace or not name:
        raise click.UsageError("--pod must be NAMESPACE/NAME")
    if not k8snames.is_pod_name_pair(namespace, name):
        raise click.UsageError(
            f"--pod {k8snames.shown(pod)}: NAMESPACE must be a DNS-1123 label and NAME a DNS-1123 subdomain "
            "(lower-case letters, digits, '-', and '.' in NAME)"
        )
    match = [r for r in records if r.get("namespace") == namespace and r.get("name") == name]
    if match:
        return _from_record(match[-1], "agent /debug/pods"), notes
    hint_path = rundir.hint_path(run_dir, namespace, name)
    hint = hints.read(run_dir, namespace, name)
    if hint is not None:
        notes.append("the agent has no record of this pod (not enrolled?)")
        return Target(namespace=namespace, name=name, uid=hint.uid, netns_path=hint.netns, ips=hint.ips,
                      source=f"netns hint {hint_path}"), notes
    raise click.ClickException(
        f"pod {pod} not found: the agent ({health_addr}) has no record of it and there is no usable netns hint "
        f"{hint_path}" + (f"; {notes[0]}" if notes else "")
    )


def _in_netns(path: str, *argv: str) -> str:
    proc = subprocess.run(["nsenter", f"--net={path}", *argv], capture_output=True, text=True, timeout=15)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(argv)} in {path} failed: {proc.stderr.strip()}")
    return proc.stdout


def _read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


@click.command("doctor")
@option("--pod", default=None, help="NAMESPACE/NAME of the pod to check.")
@option("--netns", default=None, help="Check this network namespace path instead of resolving a pod.")
@option("--run-dir", default=defaults.RUN_DIR, show_default=True, help="The agent's run dir (agent.log, hints).")
@option("--health-addr", default=defaults.HEALTH_ADDR, show_default=True,
        help="The agent's HOST:PORT (/debug/pods).")
@option("--peer-log", default=None, help="ztunnel's (or the zds_peer's) log file, to show its lines for the pod.")
@option("--host-netns", default=None,
        help="The node's network namespace to check the probe path in. [default: the one the agent reports]")
@option("--bin-dir", default=None, help="Also check that <bin-dir>/ambient-cni answers VERSION (alone, without "
        "--pod/--netns: only this check, in the runtime's CNI bin dir [containerd/CRI-O config, else /opt/cni/bin]).")
def doctor_cmd(
    pod: str | None, netns: str | None, run_dir: str, health_addr: str, peer_log: str | None, host_netns: str | None,
    bin_dir: str | None,
) -> None:
    """Check one pod's redirection the way the seed's guide does (logs, sockets, iptables rules), and the
    node-side probe path with the pod's redirection variant. Without --pod/--netns: the plugin in the CNI bin dir."""
    if not pod and not netns:
        _plugin_only(bin_dir)
        return
    if bool(pod) == bool(netns):
        raise click.UsageError("give exactly one of --pod NAMESPACE/NAME or --netns PATH")
    try:
        _doctor(pod, netns, run_dir, health_addr, peer_log, host_netns, bin_dir)
    except (click.ClickException, SystemExit):
        raise
    except Exception as exc:  # never a traceback: one line that says what failed
        raise click.ClickException(f"doctor failed: {type(exc).__name__}: {exc}") from None


def _doctor(
    pod: str | None, netns: str | None, run_dir: str, health_addr: str, peer_log: str | None, host_netns: str | None,
    bin_dir: str | None,
) -> None:
    target, notes = resolve(pod, netns, run_dir, health_addr)
    if not target.netns_path:
        raise click.ClickException(f"no network namespace known for pod {pod}")
    try:
        with open_netns(target.netns_path) as handle:
            inode = handle.inode
    except NetnsError as exc:
        raise click.ClickException(str(exc)) from None

    who = f"pod {target.namespace}/{target.name}" if target.name else "netns"
    header = [
        f"ambient-cni doctor: {who}" + (f" (uid {target.uid})" if target.uid else ""),
        f"  netns {target.netns_path} (inode {inode}), found via {target.source}",
        f"  {verified_line(target, time.time())}",
        *[f"  note: {n}" for n in notes],
    ]
    agent_text = _read(rundir.agent_log_path(run_dir))
    agent_lines = (
        None if agent_text is None
        else diagnose.agent_log_lines(agent_text, target.uid, target.namespace, target.name)
    )
    peer_lines = None
    if peer_log:
        peer_text = _read(peer_log)
        peer_lines = diagnose.peer_log_lines(peer_text or "", target.uid)
    results = [diagnose.check_logs(agent_lines, peer_lines, target.uid)]

    results.append(diagnose.check_sockets(_in_netns(target.netns_path, "ss", "-ntlp")))

    families = [Family.V4]
    v6_save = _in_netns(target.netns_path, "ip6tables-save")
    if any(":" in ip for ip in target.ips) or "ISTIO" in v6_save:
        families.append(Family.V6)
    saves = {Family.V4: _in_netns(target.netns_path, "iptables-save")}
    info = fetch_dataplane(health_addr)
    variant, variant_source = _variant(info, target, saves[Family.V4])
    params = _params(info)
    routes = {Family.V4: _in_netns(target.netns_path, "ip", "rule")
              + _in_netns(target.netns_path, "ip", "route", "show", "table", "100")}
    if Family.V6 in families:
        saves[Family.V6] = v6_save
        routes[Family.V6] = _in_netns(target.netns_path, "ip", "-6", "rule") + _in_netns(
            target.netns_path, "ip", "-6", "route", "show", "table", "100"
        )
    rules_result = diagnose.check_rules(saves, routes, variant, params)
    if rules_result.status == diagnose.FAIL and target.source.startswith("agent"):
        rules_result.problems.append("drift: the agent repairs it under DROP guardrails at its next reconcile pass "
                                     "(see ambient_cni_agent_drift_repairs_total and its log)")
    results.append(rules_result)
    results.append(_check_probe_path(info, target, host_netns, variant, variant_source, saves, params))
    if bin_dir:
        results.append(check_plugin(bin_dir))

    click.echo(diagnose.render(header, results))
    if any(r.status == diagnose.FAIL for r in results):
        raise SystemExit(1)


def _variant(info: dict[str, Any], target: Target, v4_save: str) -> tuple[Variant, str]:
    raw = (info.get("pods") or {}).get(target.uid, {}).get("variant") if target.uid else None
    if isinstance(raw, dict):
        try:
            return Variant.from_json(raw), "the agent"
        except ValueError:
            pass
    found = rules.detect_variant(v4_save)
    if found is not None:
        return found, "the pod's rules (agent has no variant for it)"
    return DEFAULT_VARIANT, "the default (no rules in the pod)"


def _params(info: dict[str, Any]) -> RuleParams:
    snat = (info.get("host") or {}).get("snat") or {}
    base = RuleParams()
    return RuleParams(probe_v4=str(snat.get("v4", base.probe_v4)), probe_v6=str(snat.get("v6", base.probe_v6)))


def _check_probe_path(
    info: dict[str, Any], target: Target, host_netns: str | None, variant: Variant, variant_source: str,
    pod_saves: dict[Family, str], params: RuleParams,
) -> diagnose.CheckResult:
    host = info.get("host") or {}
    path = host_netns or str(host.get("netns_for_others") or "")
    addresses = list(target.ips)
    pod_info = (info.get("pods") or {}).get(target.uid, {}) if target.uid else {}
    if not addresses and isinstance(pod_info, dict):
        addresses = [str(a) for a in pod_info.get("addresses") or []]
    if not addresses:
        out = _in_netns(target.netns_path, "ip", "-o", "addr", "show", "scope", "global")
        addresses = [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]
    host_saves: dict[Family, str] | None = None
    entries = None
    reason = path
    if path:
        try:
            from nodeagent.dataplane.hostprobe import HostProbe

            probe = HostProbe(path, params)
            try:
                entries = probe.entries()
                host_saves = probe.saves()
            finally:
                probe.close()
        except Exception as exc:  # HostProbeError, a netlink or iptables failure: reported, never a traceback
            host_saves, entries, reason = None, None, f"{path}: {exc}"
    return diagnose.check_probe_path(host_saves, entries, addresses, target.uid, variant, variant_source,
                                     pod_saves, reason, params)


def check_plugin(bin_dir: str) -> diagnose.CheckResult:
    """The plugin in the CNI bin dir answers VERSION (a copied-alone onedir executable does not)."""
    from cni_plugin import probe

    res = diagnose.CheckResult(f"plugin: {bin_dir}/ambient-cni answers VERSION", diagnose.PASS)
    problem = probe.problem(bin_dir)
    if problem:
        res.status = diagnose.FAIL
        res.problems.append(problem)
    else:
        path = os.path.join(bin_dir, defaults.PLUGIN_NAME)
        res.evidence.append(f"{path} -> {os.path.realpath(path)}")
    return res


def _plugin_only(bin_dir: str | None) -> None:
    if bin_dir is None:
        from conflist.discover import resolve_dirs  # where the runtime looks (containerd/CRI-O config)

        bin_dir = resolve_dirs(None, None).bin_dir
    result = check_plugin(bin_dir)
    click.echo(diagnose.render(["ambient-cni doctor: the plugin in the CNI bin dir"], [result]))
    if result.status == diagnose.FAIL:
        raise SystemExit(1)
