"""Exec cost of the frozen plugin against an empty PyInstaller onedir executable built with the same spec.

    .venv/bin/python -m bench.plugin_exec [--runs N] [--concurrent-rounds N]

Measured in one run, round-robin (so load from other processes hits every case alike): the Go reference
plugin (``/usr/lib/cni/tuning`` VERSION), the empty frozen executable (baseline, built into a temp dir from
build/pyinstaller.spec with AMBIENT_CNI_SPEC_EMPTY=1), and ``dist/ambient-cni`` for VERSION, ADD (excluded
namespace, ~2 KB config with a dual-stack prevResult) and DEL; then 50 concurrent ADDs (wall time) for ours
and 50 concurrent execs of the empty one. Each exec is timed from fork to exit by this process, stdin from a
file (hyperfine 1.15 cannot feed stdin without a shell); the same overhead is in every case.
Targets: ADD median <= 1.5x empty; 50-concurrent wall <= 1.5x empty's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "dist" / "ambient-cni"
SPEC = ROOT / "build" / "pyinstaller.spec"
PYINSTALLER = ROOT / ".venv" / "bin" / "pyinstaller"
GO_PLUGIN = Path("/usr/lib/cni/tuning")
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
TARGET = 1.5
CONCURRENCY = 50


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    env: dict[str, str]
    stdin: bytes = b""


def build_empty(workdir: Path) -> Path:
    """An empty script frozen with the project's spec options (onedir, strip, no UPX, lazy run-time hooks)."""
    entry = workdir / "empty.py"
    entry.write_text("")
    env = {**os.environ, "AMBIENT_CNI_SPEC_ENTRY": str(entry), "AMBIENT_CNI_SPEC_NAME": "empty",
           "AMBIENT_CNI_SPEC_EMPTY": "1"}
    subprocess.run(
        [str(PYINSTALLER), "--noconfirm", "--log-level", "ERROR", "--workpath", str(workdir / "work"),
         "--distpath", str(workdir / "dist"), str(SPEC)],
        env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    return workdir / "dist" / "empty.bundle" / "empty"


def add_config(run_dir: Path) -> bytes:
    prev = json.loads((ROOT / "tests" / "fixtures" / "prevresults" / "1.0.0-rich.json").read_text())
    conf = {
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambient-cni", "run_dir": str(run_dir),
        "exclude_namespaces": ["kube-system", "istio-system", "monitoring", "logging", "cert-manager"],
        "log_level": "info", "prevResult": prev,
    }
    data = json.dumps(conf, indent=2).encode()
    # pad to ~2 KB with an unknown key, as real conflists carry extra plugin keys
    conf["x-padding"] = "p" * max(0, 2048 - len(data) - 20)
    return json.dumps(conf, indent=2).encode()


def cni_env(command: str) -> dict[str, str]:
    return {**BASE_ENV, "CNI_COMMAND": command, "CNI_CONTAINERID": "bench0123456789", "CNI_NETNS":
            "/var/run/netns/acbench", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0;K8S_POD_UID=u1"}


def _stdin_file(case: Case, workdir: Path) -> Path:
    path = workdir / f"stdin-{abs(hash(case.name))}.json"
    if not path.exists():
        path.write_bytes(case.stdin)
    return path


def exec_once(case: Case, stdin: Path | None = None) -> float:
    """fork/exec/wait of one exec, output discarded. ``stdin``: a file holding ``case.stdin`` (no pipe, no
    extra thread); without it ``case.stdin`` is written through a pipe (kept for other bench modules)."""
    if stdin is None:
        started = time.perf_counter()
        proc = subprocess.run(case.argv, env=case.env, input=case.stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{case.name} failed with exit {proc.returncode}: {proc.stdout[:300]!r}")
        return elapsed * 1000
    with stdin.open("rb") as handle:
        started = time.perf_counter()
        code = subprocess.call(case.argv, env=case.env, stdin=handle, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{case.name} failed with exit {code}")
    return elapsed * 1000


def check_output(case: Case) -> None:
    proc = subprocess.run(case.argv, env=case.env, input=case.stdin, capture_output=True, check=False)
    if proc.returncode != 0 or (proc.stdout and not proc.stdout.startswith(b"{")):
        raise RuntimeError(f"{case.name} failed with exit {proc.returncode}: {proc.stdout[:300]!r}")


def concurrent_once(case: Case, stdin: Path, count: int) -> float:
    handles = [stdin.open("rb") for _ in range(count)]
    try:
        started = time.perf_counter()
        procs = [subprocess.Popen(case.argv, env=case.env, stdin=handle, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for handle in handles]
        codes = [proc.wait() for proc in procs]
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        for handle in handles:
            handle.close()
    if any(codes):
        raise RuntimeError(f"{case.name}: {sum(1 for c in codes if c)} of {count} concurrent execs failed")
    return elapsed


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "150")))
    parser.add_argument("--concurrent-rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "7")))
    args = parser.parse_args(argv)
    if not PLUGIN.exists():
        print(f"{PLUGIN} is missing: run `make build` first", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="acbench-"))
    try:
        return _run(workdir, args.runs, args.concurrent_rounds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, runs: int, rounds: int) -> int:
    print("building the empty baseline with build/pyinstaller.spec ...", file=sys.stderr, flush=True)
    empty = build_empty(workdir)
    run_dir = workdir / "run"
    run_dir.mkdir(mode=0o700)
    config = add_config(run_dir)
    del_config = json.dumps({**json.loads(config)}).encode()
    cases = [
        Case("Go reference plugin (tuning VERSION)", [str(GO_PLUGIN)], {**BASE_ENV, "CNI_COMMAND": "VERSION"}),
        Case("empty PyInstaller onedir (baseline)", [str(empty)], dict(BASE_ENV)),
        Case("ambient-cni VERSION", [str(PLUGIN)], {**BASE_ENV, "CNI_COMMAND": "VERSION"}),
        Case(f"ambient-cni ADD (excluded ns, {len(config)} B config)", [str(PLUGIN)], cni_env("ADD"), config),
        Case("ambient-cni DEL", [str(PLUGIN)], cni_env("DEL"), del_config),
    ]
    files = {case.name: _stdin_file(case, workdir) for case in cases}
    for case in cases:  # correctness once, then warm-up (page cache, first-run effects)
        check_output(case)
        for _ in range(5):
            exec_once(case, files[case.name])
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(runs):
        for case in cases:
            samples[case.name].append(exec_once(case, files[case.name]))
    conc_cases = [
        Case(f"{CONCURRENCY} concurrent: empty (baseline)", [str(empty)], dict(BASE_ENV)),
        Case(f"{CONCURRENCY} concurrent: ambient-cni ADD", [str(PLUGIN)], cni_env("ADD"), config),
    ]
    concurrent: dict[str, list[float]] = {case.name: [] for case in conc_cases}
    conc_files = {case.name: _stdin_file(case, workdir) for case in conc_cases}
    for case in conc_cases:
        concurrent_once(case, conc_files[case.name], CONCURRENCY)
    for _ in range(rounds):
        for case in conc_cases:
            concurrent[case.name].append(concurrent_once(case, conc_files[case.name], CONCURRENCY))

    base = statistics.median(samples[cases[1].name])
    base_p99 = percentile(samples[cases[1].name], 99)
    conc_base = statistics.median(concurrent[conc_cases[0].name])
    rows = []
    for case in cases:
        data = samples[case.name]
        med, p99 = statistics.median(data), percentile(data, 99)
        rows.append((case.name, med, p99, med / base, p99 / base_p99))
    for case in conc_cases:
        data = concurrent[case.name]
        med, p99 = statistics.median(data), max(data)
        rows.append((f"{case.name} (wall)", med, p99, med / conc_base, p99 / max(concurrent[conc_cases[0].name])))

    cpus = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"plugin_exec: {runs} runs per case (round-robin), {rounds} rounds of {CONCURRENCY} concurrent execs; "
          f"{cpus} CPUs, load average {load:.2f}\n")
    print("| what | median ms | p99 ms | median / empty | p99 / empty p99 |")
    print("|---|---:|---:|---:|---:|")
    for name, med, p99, ratio, ratio99 in rows:
        print(f"| {name} | {med:.1f} | {p99:.1f} | {ratio:.2f}x | {ratio99:.2f}x |")
    add_ratio = rows[3][3]
    conc_ratio = rows[-1][3]
    print()
    print(f"target ADD median <= {TARGET}x empty: {add_ratio:.2f}x -> {'MET' if add_ratio <= TARGET else 'MISSED'}")
    print(f"target {CONCURRENCY}-concurrent wall <= {TARGET}x empty: {conc_ratio:.2f}x -> "
          f"{'MET' if conc_ratio <= TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
