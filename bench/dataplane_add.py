"""Benchmark: enrolled ADD with the full in-pod dataplane (rules + routes + ZDS add + ack from zds_peer), without
and with the node-side probe path (the pod's IPs upserted into the probe set before ADD is answered).

    .venv/bin/python -m bench.dataplane_add [--pods 110]

Creates throwaway network namespaces (acdb + hex), among them one playing the node (``--host-netns``: the probe
rule and sets go there, never into this machine's netns), two InPodDataplanes on temp ZDS sockets (one without,
one with the probe path) and a ``python -m zds_peer`` process for each; times N sequential adds alternating
between the two (so load hits both alike) and N concurrent adds on each; reports median/p99, the share spent
installing rules, the probe-set update alone, failures, and ratios against baselines measured in the same run (a
bare ``nsenter --net=<ns> true`` and a no-op ``iptables-restore`` inside the netns). Cleans up everything.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nodeagent.dataplane import hostprobe, inpod, netns
from nodeagent.dataplane.api import PodWork

ROOT = Path(__file__).resolve().parent.parent


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def make_ns(n: int) -> list[str]:
    names = [f"acdb{secrets.token_hex(3)}" for _ in range(n)]
    for name in names:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return names


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pods", type=int, default=110)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    n = args.pods
    tmp = tempfile.mkdtemp(prefix="acdb")
    names: list[str] = []
    peers: list[subprocess.Popen[bytes]] = []
    dps: list[inpod.InPodDataplane] = []
    rule_ms: list[float] = []
    host_ms: list[float] = []
    lock = threading.Lock()
    original = inpod.install_redirection
    original_host_add = hostprobe.HostProbe.add

    def install_timed(*a: Any, **kw: Any) -> None:
        t = time.perf_counter()
        try:
            original(*a, **kw)
        finally:
            with lock:
                rule_ms.append((time.perf_counter() - t) * 1e3)

    def host_add_timed(self: hostprobe.HostProbe, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_host_add(self, *a, **kw)
        finally:
            with lock:
                host_ms.append((time.perf_counter() - t) * 1e3)

    inpod.install_redirection = install_timed
    hostprobe.HostProbe.add = host_add_timed  # type: ignore[method-assign]
    try:
        names = make_ns(4 * n + 2)
        base_ns, node_ns = f"/run/netns/{names[-1]}", f"/run/netns/{names[-2]}"
        nsenter = [timed(lambda: subprocess.run(["nsenter", f"--net={base_ns}", "true"], check=True))
                   for _ in range(30)]
        fd = os.open(base_ns, os.O_RDONLY)
        noop = [timed(lambda: netns.run_in_netns(fd, lambda: subprocess.run(
            ["iptables-restore", "--noflush"], input=b"*nat\nCOMMIT\n", check=True))) for _ in range(30)]
        os.close(fd)

        for i, host in enumerate((None, node_ns)):
            sock = os.path.join(tmp, f"zds{i}.sock")
            dps.append(inpod.InPodDataplane(sock, host_netns=host))
            peers.append(subprocess.Popen([sys.executable, "-m", "zds_peer", "--zds-socket", sock,
                                           "--log-file", os.path.join(tmp, f"peer{i}.log")], cwd=ROOT))
        end = time.monotonic() + 30
        while not all(dp.ready()[0] for dp in dps):
            if time.monotonic() > end:
                raise SystemExit("zds_peer did not connect")
            time.sleep(0.05)
        plain, probed = dps

        def work(i: int, name: str) -> PodWork:
            return PodWork(uid=f"uid-{name}", name=name, namespace="bench", netns_path=f"/run/netns/{name}",
                           ips=(f"10.1.{i // 250}.{i % 250 + 2}/16",))

        failures = {"sequential": 0, "concurrent": 0}

        def add(dp: inpod.InPodDataplane, i: int, kind: str) -> float:
            t = time.perf_counter()
            try:
                dp.add(work(i, names[i]), time.monotonic() + 30)
            except Exception as exc:
                failures[kind] += 1
                print(f"{kind} add failed: {exc}", file=sys.stderr)
            return (time.perf_counter() - t) * 1e3

        seq_plain: list[float] = []
        seq_probed: list[float] = []
        for i in range(n):  # alternate, so both see the same load
            seq_plain.append(add(plain, i, "sequential"))
            seq_probed.append(add(probed, n + i, "sequential"))
        seq_rules = list(rule_ms)
        seq_host = list(host_ms)
        conc: dict[str, list[float]] = {}
        walls: dict[str, float] = {}
        for label, dp, first in (("without", plain, 2 * n), ("with", probed, 3 * n)):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                conc[label] = list(pool.map(lambda i, dp=dp: add(dp, i, "concurrent"), range(first, first + n)))
            walls[label] = time.perf_counter() - t0
        assert probed.host is not None
        entries = len(probed.host.entries())
        enrolled = len(plain.enrolled()) + len(probed.enrolled())

        base_nsenter = statistics.median(nsenter)
        base_noop = statistics.median(noop)
        med_plain, med_probed = statistics.median(seq_plain), statistics.median(seq_probed)
        share = statistics.median(seq_rules) / med_plain if med_plain else 0.0
        delta = med_probed - med_plain
        rows = [
            ("baseline: nsenter --net=<ns> true", base_nsenter, pct(nsenter, 0.99), "", "", ""),
            ("baseline: no-op iptables-restore in netns thread", base_noop, pct(noop, 0.99), "", "", ""),
            ("rule install (iptables-save+restore v4, routes)", statistics.median(seq_rules),
             pct(seq_rules, 0.99), f"{statistics.median(seq_rules) / base_noop:.1f}x", "", ""),
            (f"enrolled ADD, sequential ({n}), no probe path", med_plain, pct(seq_plain, 0.99),
             f"{med_plain / base_nsenter:.1f}x", f"{share:.0%}", str(failures["sequential"])),
            (f"enrolled ADD, sequential ({n}), with probe-set update", med_probed, pct(seq_probed, 0.99),
             f"{med_probed / base_nsenter:.1f}x", "", ""),
            ("probe-set update alone (one netlink upsert per IP on the node-netns socket)", statistics.median(seq_host),
             pct(seq_host, 0.99), "", "", ""),
            (f"enrolled ADD, concurrent ({n}, {args.concurrency} threads), no probe path",
             statistics.median(conc["without"]), pct(conc["without"], 0.99),
             f"{statistics.median(conc['without']) / base_nsenter:.1f}x", "", ""),
            (f"enrolled ADD, concurrent ({n}, {args.concurrency} threads), with probe-set update",
             statistics.median(conc["with"]), pct(conc["with"], 0.99),
             f"{statistics.median(conc['with']) / base_nsenter:.1f}x", "", str(failures["concurrent"])),
        ]
        print(f"\nIn-pod dataplane ADD ({os.cpu_count()} CPUs; concurrent wall {walls['without']:.2f} s without / "
              f"{walls['with']:.2f} s with the probe path = {n / walls['with']:.0f} pods/s; enrolled at end: "
              f"{enrolled}/{4 * n}; probe-set entries: {entries}/{2 * n})\n")
        print("| what | median ms | p99 ms | ratio vs baseline | rule share | failures |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]} | {r[4]} | {r[5]} |")
        total_failures = failures["sequential"] + failures["concurrent"]
        print(f"\ntarget median <= 50 ms: {'met' if med_probed <= 50 else 'NOT met'}; probe path adds "
              f"{delta:+.2f} ms to the median (target <= +1 ms: {'met' if delta <= 1.0 else 'NOT met'}); "
              f"failures: {total_failures}; set entries {'complete' if entries == 2 * n else 'INCOMPLETE'}")
        return 0 if total_failures == 0 and entries == 2 * n else 1
    finally:
        inpod.install_redirection = original
        hostprobe.HostProbe.add = original_host_add  # type: ignore[method-assign]
        for peer in peers:
            peer.terminate()
            try:
                peer.wait(10)
            except subprocess.TimeoutExpired:
                peer.kill()
        for dp in dps:
            dp.close()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["rm", "-rf", tmp], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
