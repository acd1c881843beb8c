"""Exec cost of the frozen plugin against an empty PyInstaller onedir executable built with the same spec.

    .venv/bin/python -m bench.plugin_exec [--runs N] [--concurrent-rounds N]

Measured in one run, round-robin (so load from other processes hits every case alike): the Go reference
plugin (``/usr/lib/cni/tuning`` VERSION), the empty frozen executable (baseline, built into a temp dir from
build/pyinstaller.spec with AMBIENT_CNI_SPEC_EMPTY=1), the same empty script ending in ``os._exit(0)`` (the
floor of a frozen exec that skips interpreter finalization, as the plugin does), and ``dist/ambient-cni`` for
VERSION, ADD (excluded namespace, ~2 KB config with a dual-stack prevResult), ADD of a pod the agent's snapshot
says is not enrolled, and DEL; then 50 concurrent ADDs (wall time) for ours and 50 concurrent execs of the
empty one. Each exec is timed from fork to exit by this process, stdin from a file (hyperfine 1.15 cannot feed
stdin without a shell); the same overhead is in every case.
Targets: unenrolled ADD (both kinds) median <= 1.25x empty; 50-concurrent wall <= 1.5x empty's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from cni_plugin import rundir

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "dist" / "ambient-cni"
SPEC = ROOT / "build" / "pyinstaller.spec"
PYINSTALLER = ROOT / ".venv" / "bin" / "pyinstaller"
GO_PLUGIN = Path("/usr/lib/cni/tuning")
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
TARGET_UNENROLLED = 1.25
TARGET_CONCURRENT = 1.5
CONCURRENCY = 50


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    env: dict[str, str]
    stdin: bytes = b""


def build_empty(workdir: Path, name: str = "empty", source: str = "") -> Path:
    """An empty script (or ``source``) frozen with the project's spec options (onedir, strip, no UPX, lazy
    run-time hooks)."""
    entry = workdir / f"{name}.py"
    entry.write_text(source)
    env = {**os.environ, "AMBIENT_CNI_SPEC_ENTRY": str(entry), "AMBIENT_CNI_SPEC_NAME": name,
           "AMBIENT_CNI_SPEC_EMPTY": "1"}
    subprocess.run(
        [str(PYINSTALLER), "--noconfirm", "--log-level", "ERROR", "--workpath", str(workdir / f"work-{name}"),
         "--distpath", str(workdir / "dist"), str(SPEC)],
        env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    return workdir / "dist" / f"{name}.bundle" / name


def build_empty_exit(workdir: Path) -> Path:
    """The empty script ending in ``os._exit(0)``: the floor of a frozen exec that skips finalization."""
    return build_empty(workdir, "empty_exit", "import os\nos._exit(0)\n")


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


def cni_env(command: str, namespace: str = "kube-system", name: str = "coredns-0") -> dict[str, str]:
    return {**BASE_ENV, "CNI_COMMAND": command, "CNI_CONTAINERID": "bench0123456789", "CNI_NETNS":
            "/var/run/netns/acbench", "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=u1"}


def write_snapshot(run_dir: Path) -> None:
    """The agent's enrollment snapshot: namespace ``plain`` not enrolled, its pod ``web-0`` known."""
    from cni_plugin import snapshot

    snap = snapshot.Snapshot(node="bench", generation=1, namespaces={"plain": False, "shop": True},
                             pods={"plain/web-0": False})
    (run_dir / rundir.SNAPSHOT).write_bytes(snapshot.encode(snap, time.time()))


def _stdin_file(case: Case, workdir: Path) -> Path:
    path = workdir / f"stdin-{abs(hash(case.name))}.json"
    if not path.exists():
        path.write_bytes(case.stdin)
    return path


CPU_MS: dict[str, list[float]] = {}  # case name -> CPU time (user + sys) of each exec_once of it


def _children_cpu_ms() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1000


def exec_once(case: Case, stdin: Path | None = None) -> float:
    """fork/exec/wait of one exec, output discarded; returns its wall time and records its CPU time in CPU_MS
    (call from one thread at a time). ``stdin``: a file holding ``case.stdin`` (no pipe, no extra thread);
    without it ``case.stdin`` is written through a pipe (kept for other bench modules)."""
    cpu_before = _children_cpu_ms()
    try:
        return _exec_once(case, stdin)
    finally:
        CPU_MS.setdefault(case.name, []).append(_children_cpu_ms() - cpu_before)


def cpu_median(case: Case) -> float:
    return statistics.median(CPU_MS[case.name])


def _exec_once(case: Case, stdin: Path | None) -> float:
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
    print("building the empty baselines with build/pyinstaller.spec ...", file=sys.stderr, flush=True)
    empty, empty_exit = build_empty(workdir), build_empty_exit(workdir)
    run_dir = workdir / "run"
    run_dir.mkdir(mode=0o700)
    write_snapshot(run_dir)
    config = add_config(run_dir)
    del_config = json.dumps({**json.loads(config)}).encode()
    go, base, floor, version, excluded, unenrolled, delete = cases = [
        Case("Go reference plugin (tuning VERSION)", [str(GO_PLUGIN)], {**BASE_ENV, "CNI_COMMAND": "VERSION"}),
        Case("empty PyInstaller onedir (baseline)", [str(empty)], dict(BASE_ENV)),
        Case("empty PyInstaller onedir ending in os._exit (floor)", [str(empty_exit)], dict(BASE_ENV)),
        Case("ambient-cni VERSION", [str(PLUGIN)], {**BASE_ENV, "CNI_COMMAND": "VERSION"}),
        Case(f"ambient-cni ADD, excluded namespace ({len(config)} B config)", [str(PLUGIN)], cni_env("ADD"),
             config),
        Case("ambient-cni ADD, pod not enrolled (agent snapshot read)", [str(PLUGIN)],
             cni_env("ADD", "plain", "web-0"), config),
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
    conc_base, conc_ours = conc_cases = [
        Case(f"{CONCURRENCY} concurrent: empty (baseline)", [str(empty)], dict(BASE_ENV)),
        Case(f"{CONCURRENCY} concurrent: ambient-cni ADD, excluded namespace", [str(PLUGIN)], cni_env("ADD"),
             config),
    ]
    concurrent: dict[str, list[float]] = {case.name: [] for case in conc_cases}
    conc_files = {case.name: _stdin_file(case, workdir) for case in conc_cases}
    for case in conc_cases:
        concurrent_once(case, conc_files[case.name], CONCURRENCY)
    for _ in range(rounds):
        for case in conc_cases:
            concurrent[case.name].append(concurrent_once(case, conc_files[case.name], CONCURRENCY))

    base_med = statistics.median(samples[base.name])

    def value(case: Case) -> tuple[str, float]:
        data = samples[case.name]
        med = statistics.median(data)
        return f"{med:.1f} ms (p99 {percentile(data, 99):.1f}) = {med / base_med:.2f}x empty", med / base_med

    report.header(f"Frozen plugin exec vs an empty frozen executable: {runs} runs per case (round-robin), "
                  f"{rounds} rounds of {CONCURRENCY} concurrent execs")
    report.row(base.name, f"{base_med:.1f} ms (p99 {percentile(samples[base.name], 99):.1f})")
    for case in (floor, go, version, delete):
        report.row(case.name, value(case)[0])
    for case in (excluded, unenrolled):
        text, ratio = value(case)
        report.row(case.name, text, f"<= {TARGET_UNENROLLED}x empty", ratio <= TARGET_UNENROLLED)
    cpu_base = cpu_median(base)
    report.row("CPU time per exec (user + sys, median): empty / excluded ADD / snapshot-decided ADD",
               f"{cpu_base:.1f} / {cpu_median(excluded):.1f} / {cpu_median(unenrolled):.1f} ms = 1.00 / "
               f"{cpu_median(excluded) / cpu_base:.2f} / {cpu_median(unenrolled) / cpu_base:.2f}x "
               "(what the wall ratios tend to when the machine is saturated)")
    wall_base, wall_ours = (statistics.median(concurrent[c.name]) for c in conc_cases)
    report.row(f"{conc_base.name}, wall", f"{wall_base:.0f} ms")
    report.row(f"{conc_ours.name}, wall", f"{wall_ours:.0f} ms = {wall_ours / wall_base:.2f}x empty",
               f"<= {TARGET_CONCURRENT}x empty", wall_ours / wall_base <= TARGET_CONCURRENT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
