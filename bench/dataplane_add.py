"""Benchmark: the agent side of an enrolled ADD with the full in-pod dataplane (rules + routes + ZDS add + ack +
the node's probe-set update), and what the probe path adds to it.

    .venv/bin/python -m bench.dataplane_add [--pods 110] [--concurrency 16] [--dual-stack 30]

Creates throwaway network namespaces (acdb + hex), among them one playing the node (``--host-netns``: the probe
rule and sets go there, never into this machine's netns), two InPodDataplanes on temp ZDS sockets, one with the
probe path and one without, and a ``python -m zds_peer`` process for each (the stand-in for ztunnel). Times N
sequential adds of IPv4 pods alternating between the two (so load hits both alike), M sequential adds of
dual-stack pods (with the probe path), then N adds of distinct pods with ``--concurrency`` in flight on each
(latency per add, from its start). Phases are timed inside the adds (rules + routes; ZDS add until the ack; the
probe-set upsert), and the agent's, the iptables children's and the peers' CPU per add are read from the kernel.
Floors measured in the same run: a thread joining a netns, a no-op ``iptables-restore`` in a netns (the same
spawn path as the rules), ``/bin/true``, a bare ZDS round trip (DelWorkload of an unknown pod: socket, protobuf,
the peer's loop, the ack). Cleans up everything.
Targets (with the probe path): sequential median <= 5 ms and p99 <= 15 ms; the probe path adds <= 1 ms to the
sequential median; concurrent: 0 failures, p99 <= 150 ms, and every pod's IP in the probe set at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import report
from netns_threads import run_in_netns
from nodeagent.dataplane import hostprobe, inpod, iptables, zds_server
from nodeagent.dataplane.api import PodWork
from nodeagent.dataplane.rules import Family
from testbed import netns as netns_mod
from testbed.poll import WaitTimeout, wait_for
from testbed.procs import stop_process
from zds import protocol

ROOT = Path(__file__).resolve().parent.parent
TARGET_MEDIAN_MS, TARGET_P99_MS, TARGET_CONCURRENT_P99_MS = 5.0, 15.0, 150.0
TARGET_PROBE_PATH_DELTA_MS = 1.0  # what the node's probe-set update may add to the sequential median


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def cpu_ms(who: int) -> float:
    usage = resource.getrusage(who)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def proc_cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


class Phases:
    """Wall time of named phases inside the adds (thread-safe), by wrapping the dataplane's functions."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def wrapped(self, owner: Any, attr: str, label: str) -> Iterator[None]:
        original = getattr(owner, attr)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.samples.setdefault(label, []).append((time.perf_counter() - started) * 1e3)

        setattr(owner, attr, timed_call)
        try:
            yield
        finally:
            setattr(owner, attr, original)

    def take(self) -> dict[str, list[float]]:
        with self._lock:
            out, self.samples = self.samples, {}
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dual-stack", type=int, default=30)
    args = ap.parse_args(argv)
    n, dual = args.pods, args.dual_stack
    tmp = tempfile.mkdtemp(prefix="acdb")
    namespaces = contextlib.ExitStack()
    peers: list[subprocess.Popen[bytes]] = []
    dps: list[inpod.InPodDataplane] = []
    phases = Phases()
    try:
        names = [made.name for made in namespaces.enter_context(
            netns_mod.many(f"acdb{secrets.token_hex(3)}" for _ in range(4 * n + dual + 2)))]
        floor_ns, node_ns = f"/run/netns/{names[-1]}", f"/run/netns/{names[-2]}"
        subprocess.run(["ip", "-n", names[-2], "link", "set", "lo", "up"], check=True)
        for i, host in enumerate((None, node_ns)):
            sock = os.path.join(tmp, f"zds{i}.sock")
            dps.append(inpod.InPodDataplane(sock, host_netns=host))
            peers.append(subprocess.Popen([sys.executable, "-m", "zds_peer", "--zds-socket", sock,
                                           "--log-file", os.path.join(tmp, f"peer{i}.log")], cwd=ROOT))
        try:
            wait_for(lambda: all(dp.ready()[0] for dp in dps), 30, "zds_peer to connect", interval=0.05)
            wait_for(lambda: all("pod received snapshot sent" in _text(os.path.join(tmp, f"peer{i}.log"))
                                 for i in range(len(peers))), 30, "the peers' snapshot handling", interval=0.05)
        except WaitTimeout as exc:
            print(exc, file=sys.stderr)
            return 2
        plain, probed = dps

        floors = _floors(probed, floor_ns, 30)
        failures = {"sequential": 0, "concurrent": 0}

        def add(dp: inpod.InPodDataplane, i: int, kind: str, dual_stack: bool = False) -> float:
            ips: tuple[str, ...] = (f"10.1.{i // 250}.{i % 250 + 2}/16",)
            if dual_stack:
                ips += (f"fd00:1::{i:x}/64",)
            name = names[i]
            work = PodWork(uid=f"uid-{name}", name=name, namespace="bench", netns_path=f"/run/netns/{name}",
                           ips=ips)
            started = time.perf_counter()
            try:
                dp.add(work, time.monotonic() + 30)
            except Exception as exc:
                failures[kind] += 1
                print(f"{kind} add failed: {exc}", file=sys.stderr)
            return (time.perf_counter() - started) * 1e3

        with phases.wrapped(inpod, "install_redirection", "rules + routes (in the pod netns thread)"), \
                phases.wrapped(zds_server.ZdsServer, "add", "ZDS AddWorkload until ztunnel's ack"), \
                phases.wrapped(hostprobe.HostProbe, "add", "probe-set upsert in the node netns (after the ack)"):
            before = (cpu_ms(resource.RUSAGE_SELF), cpu_ms(resource.RUSAGE_CHILDREN),
                      sum(proc_cpu_ms(p.pid) for p in peers))
            seq: dict[str, list[float]] = {"without": [], "with": []}
            for i in range(n):  # alternate, so both see the same load
                seq["without"].append(add(plain, i, "sequential"))
                seq["with"].append(add(probed, n + i, "sequential"))
            after = (cpu_ms(resource.RUSAGE_SELF), cpu_ms(resource.RUSAGE_CHILDREN),
                     sum(proc_cpu_ms(p.pid) for p in peers))
            seq_phases = phases.take()
            dual_ms = [add(probed, i, "sequential", dual_stack=True) for i in range(4 * n, 4 * n + dual)]
            phases.take()
            conc: dict[str, list[float]] = {}
            walls: dict[str, float] = {}
            for label, dp, first in (("without", plain, 2 * n), ("with", probed, 3 * n)):
                started = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    conc[label] = list(pool.map(lambda i, dp=dp: add(dp, i, "concurrent"), range(first, first + n)))
                walls[label] = (time.perf_counter() - started) * 1e3
        enrolled = len(plain.enrolled()) + len(probed.enrolled())
        assert probed.host is not None
        entries = len(probed.host.entries())
        per_dual_pod = 2 if Family.V6 in probed.host.families else 1  # the node netns may have no IPv6
        per_add = 2 * n
        agent_cpu, kids_cpu, peer_cpu = ((b - a) / per_add for a, b in zip(before, after, strict=True))
        _report(args, seq, dual_ms, conc, walls, seq_phases, floors, failures, (enrolled, 4 * n + len(dual_ms)),
                (entries, 2 * n + per_dual_pod * len(dual_ms)), (agent_cpu, kids_cpu, peer_cpu))
        return 0
    finally:
        for peer in peers:
            stop_process(peer)
        for dp in dps:
            dp.close()
        namespaces.close()
        subprocess.run(["rm", "-rf", tmp], check=False)


def _text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _floors(dp: inpod.InPodDataplane, ns_path: str, runs: int) -> dict[str, list[float]]:
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        noop = b"*nat\nCOMMIT\n"
        conn = dp.zds._conns[-1]  # the peer's connection
        cases: dict[str, Callable[[], Any]] = {
            "a thread joining the pod netns (setns) and exiting": lambda: run_in_netns(fd, lambda: None),
            "no-op iptables-restore in the pod netns (same spawn path as the rules)": lambda: run_in_netns(
                fd, lambda: iptables._Child([Family.V4.restore_cmd, "--noflush"], noop).finish()),
            "fork/exec /bin/true": lambda: subprocess.run(["/bin/true"], check=True),
            "bare ZDS round trip (DelWorkload of an unknown pod, to the ack)": lambda: conn.request(
                protocol.del_workload("bench-unknown"), None, 5.0),
            "nsenter --net=<pod netns> true (an exec per netns, which the agent avoids)": lambda: subprocess.run(
                ["nsenter", f"--net={ns_path}", "true"], check=True),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(runs):  # round-robin
            for name, fn in cases.items():
                samples[name].append(timed(fn))
        return samples
    finally:
        os.close(fd)


def _report(args: argparse.Namespace, seq: dict[str, list[float]], dual: list[float], conc: dict[str, list[float]],
            walls: dict[str, float], phases: dict[str, list[float]], floors: dict[str, list[float]],
            failures: dict[str, int], enrolled: tuple[int, int], entries: tuple[int, int],
            cpu: tuple[float, float, float]) -> None:
    n = args.pods
    report.header(f"Agent side of an enrolled ADD, in-pod dataplane with zds_peer as ztunnel, with and without the "
                  f"node's probe path ({os.cpu_count()} CPUs); enrolled at the end: {enrolled[0]}/{enrolled[1]}")
    for name, data in floors.items():
        report.row(f"floor: {name}", f"median {statistics.median(data):.2f} ms (p99 {pct(data, 0.99):.2f})")
    for name, data in phases.items():
        report.row(f"phase of a sequential add: {name}", f"median {statistics.median(data):.2f} ms "
                   f"(p99 {pct(data, 0.99):.2f})")
    agent, kids, peer = cpu
    report.row("CPU per sequential add: agent / iptables children / zds_peer",
               f"{agent:.2f} / {kids:.2f} / {peer:.2f} ms")
    plain = seq["without"]
    report.row(f"enrolled ADD, sequential ({n} IPv4 pods), no probe path",
               f"median {statistics.median(plain):.2f} ms (p99 {pct(plain, 0.99):.2f})")
    probed = seq["with"]
    med, p99 = statistics.median(probed), pct(probed, 0.99)
    report.row(f"enrolled ADD with probe-set update, sequential ({n} IPv4 pods), median", f"{med:.2f} ms",
               f"<= {TARGET_MEDIAN_MS:g} ms", med <= TARGET_MEDIAN_MS)
    report.row(f"enrolled ADD with probe-set update, sequential ({n} IPv4 pods), p99", f"{p99:.2f} ms",
               f"<= {TARGET_P99_MS:g} ms", p99 <= TARGET_P99_MS)
    delta = med - statistics.median(plain)
    report.row("probe path's share of the sequential median (with minus without, interleaved)",
               f"{delta:+.2f} ms", f"<= +{TARGET_PROBE_PATH_DELTA_MS:g} ms", delta <= TARGET_PROBE_PATH_DELTA_MS)
    report.row("enrolled ADD, sequential, failures", str(failures["sequential"]), "0",
               failures["sequential"] == 0)
    if dual:
        report.row(f"enrolled ADD with probe-set update, sequential ({len(dual)} dual-stack pods: both families' "
                   "rules, two set entries)", f"median {statistics.median(dual):.2f} ms (p99 {pct(dual, 0.99):.2f})")
    for label in ("without", "with"):
        data = conc[label]
        what = "no probe path" if label == "without" else "with probe-set update"
        report.row(f"enrolled ADD, {n} pods with {args.concurrency} in flight, {what}: wall; median per add",
                   f"{walls[label]:.0f} ms ({n / walls[label] * 1e3:.0f} pods/s); {statistics.median(data):.1f} ms")
    cp99 = pct(conc["with"], 0.99)
    report.row(f"enrolled ADD with probe-set update, {n} pods with {args.concurrency} in flight, p99 per add",
               f"{cp99:.1f} ms (without the probe path: {pct(conc['without'], 0.99):.1f} ms)",
               f"<= {TARGET_CONCURRENT_P99_MS:g} ms", cp99 <= TARGET_CONCURRENT_P99_MS)
    report.row(f"enrolled ADD, {n} pods with {args.concurrency} in flight (each case), failures",
               str(failures["concurrent"]), "0", failures["concurrent"] == 0)
    report.row("probe-set entries at the end (one per enrolled pod IP, with its UID)",
               f"{entries[0]}/{entries[1]}", "all", entries[0] == entries[1])


if __name__ == "__main__":
    raise SystemExit(main())
