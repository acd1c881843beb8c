"""Benchmark: enrolled ADD with the full in-pod dataplane (rules + routes + ZDS add + ack from zds_peer).

    .venv/bin/python -m bench.dataplane_add [--pods 110]

Creates N throwaway network namespaces (acdb + hex), an InPodDataplane on a temp ZDS socket and a
``python -m zds_peer`` process; times N sequential and N concurrent adds, reports median/p99, the share spent
installing rules, failures, and ratios against baselines measured in the same run (a bare
``nsenter --net=<ns> true`` and a no-op ``iptables-restore`` inside the netns). Cleans up everything.
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

from nodeagent.dataplane import inpod, netns
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
    peer: subprocess.Popen[bytes] | None = None
    dp: inpod.InPodDataplane | None = None
    rule_ms: list[float] = []
    lock = threading.Lock()
    original = inpod.install_redirection

    def install_timed(*a: Any, **kw: Any) -> None:
        t = time.perf_counter()
        try:
            original(*a, **kw)
        finally:
            with lock:
                rule_ms.append((time.perf_counter() - t) * 1e3)

    inpod.install_redirection = install_timed
    try:
        names = make_ns(2 * n + 1)
        base_ns = f"/run/netns/{names[-1]}"
        nsenter = [timed(lambda: subprocess.run(["nsenter", f"--net={base_ns}", "true"], check=True))
                   for _ in range(30)]
        fd = os.open(base_ns, os.O_RDONLY)
        noop = [timed(lambda: netns.run_in_netns(fd, lambda: subprocess.run(
            ["iptables-restore", "--noflush"], input=b"*nat\nCOMMIT\n", check=True))) for _ in range(30)]
        os.close(fd)

        sock = os.path.join(tmp, "zds.sock")
        dp = inpod.InPodDataplane(sock)
        peer = subprocess.Popen([sys.executable, "-m", "zds_peer", "--zds-socket", sock,
                                 "--log-file", os.path.join(tmp, "peer.log")], cwd=ROOT)
        end = time.monotonic() + 30
        while not dp.ready()[0]:
            if time.monotonic() > end:
                raise SystemExit("zds_peer did not connect")
            time.sleep(0.05)

        def work(name: str) -> PodWork:
            return PodWork(uid=f"uid-{name}", name=name, namespace="bench", netns_path=f"/run/netns/{name}",
                           ips=("10.1.0.2/24",))

        failures = {"sequential": 0, "concurrent": 0}

        def add(name: str, kind: str) -> float:
            t = time.perf_counter()
            try:
                dp.add(work(name), time.monotonic() + 30)
            except Exception as exc:
                failures[kind] += 1
                print(f"{kind} add failed: {exc}", file=sys.stderr)
            return (time.perf_counter() - t) * 1e3

        seq = [add(name, "sequential") for name in names[:n]]
        seq_rules = list(rule_ms)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            conc = list(pool.map(lambda nm: add(nm, "concurrent"), names[n:2 * n]))
        wall = time.perf_counter() - t0
        enrolled = len(dp.enrolled())

        base_nsenter = statistics.median(nsenter)
        base_noop = statistics.median(noop)
        med = statistics.median(seq)
        share = statistics.median(seq_rules) / med if med else 0.0
        rows = [
            ("baseline: nsenter --net=<ns> true", statistics.median(nsenter), pct(nsenter, 0.99), "", "", ""),
            ("baseline: no-op iptables-restore in netns thread", base_noop, pct(noop, 0.99), "", "", ""),
            ("rule install (iptables-save+restore v4, routes)", statistics.median(seq_rules),
             pct(seq_rules, 0.99), f"{statistics.median(seq_rules) / base_noop:.1f}x", "", ""),
            (f"enrolled ADD, sequential ({n})", med, pct(seq, 0.99), f"{med / base_nsenter:.1f}x",
             f"{share:.0%}", str(failures["sequential"])),
            (f"enrolled ADD, concurrent ({n}, {args.concurrency} threads)", statistics.median(conc),
             pct(conc, 0.99), f"{statistics.median(conc) / base_nsenter:.1f}x", "",
             str(failures["concurrent"])),
        ]
        print(f"\nIn-pod dataplane ADD ({os.cpu_count()} CPUs; concurrent wall {wall:.2f} s = "
              f"{n / wall:.0f} pods/s; enrolled at end: {enrolled}/{2 * n})\n")
        print("| what | median ms | p99 ms | ratio vs baseline | rule share | failures |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]:.1f} | {r[2]:.1f} | {r[3]} | {r[4]} | {r[5]} |")
        print(f"\ntarget median <= 50 ms: {'met' if med <= 50 else 'NOT met'}; "
              f"failures: {failures['sequential'] + failures['concurrent']}")
        return 0 if failures["sequential"] + failures["concurrent"] == 0 else 1
    finally:
        inpod.install_redirection = original
        if peer is not None:
            peer.terminate()
            try:
                peer.wait(10)
            except subprocess.TimeoutExpired:
                peer.kill()
        if dp is not None:
            dp.close()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["rm", "-rf", tmp], check=False)


if __name__ == "__main__":
    raise SystemExit(main())
