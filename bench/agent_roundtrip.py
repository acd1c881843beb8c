"""Enrolled ADD through the agent, with the frozen plugin, against the empty frozen executable.

    .venv/bin/python -m bench.agent_roundtrip [--runs N]

One run measures, round-robin: the empty PyInstaller onedir executable built with the project's spec
(baseline, ``bench.plugin_exec.build_empty``) and ``dist/ambient-cni`` ADD for an enrolled pod (snapshot read,
socket round trip, agent decision, recording dataplane, SQLite record; a DEL between runs so every ADD
enrolls for real). Then 110 concurrent ADDs of distinct enrolled pods (each its own real netns): wall time,
p50/p99 per exec, failures; and the agent's RSS with those 110 pods enrolled.
Targets: ADD median <= 1.35x empty; failures = 0; RSS <= 60 MB.
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
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from bench import report
from bench.plugin_exec import PLUGIN, ROOT, Case, build_empty, cpu_median, exec_once, percentile
from cni_plugin import rundir
from testbed import netns
from testbed.poll import wait_for
from testbed.procs import stop_process

PODS = 110
TARGET_RATIO = 1.35
TARGET_RSS_MB = 60.0
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def state_yaml() -> str:
    lines = ["namespaces:", "  - {name: shop, labels: {istio.io/dataplane-mode: ambient}}", "pods:"]
    lines += [f"  - {{name: p{i}, namespace: shop, uid: uid-{i}}}" for i in range(PODS)]
    lines.append("  - {name: rt, namespace: shop, uid: uid-rt}")
    return "\n".join(lines) + "\n"


def conf(run_dir: Path) -> bytes:
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": "10.77.0.5/24", "interface": 0}, {"address": "fd00:77::5/64", "interface": 0}]}
    return json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "ambient-cni", "run_dir": str(run_dir),
                       "prevResult": prev}).encode()


def env_for(command: str, name: str, netns: str, cid: str, uid: str) -> dict[str, str]:
    return {**BASE_ENV, "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
            "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_UID={uid}"}


def start_agent(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    state = workdir / "state.yaml"
    state.write_text(state_yaml())
    run_dir = workdir / "run"
    argv = [str(ROOT / ".venv" / "bin" / "python"), "-m", "ambient_cni", "agent", "--run-dir", str(run_dir),
            "--state-dir", str(workdir / "state"), "--cluster-state", str(state), "--dataplane", "noop",
            "--health-addr", "127.0.0.1:0", "--node-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def serving() -> int | None:  # --log-level warning hides the health line; find the port through /proc instead
        port = _listening_port(proc.pid)
        return port if port and (run_dir / rundir.SNAPSHOT).exists() and (run_dir / rundir.SOCKET).exists() else None

    try:
        port = wait_for(serving, 30, "the agent to come up", interval=0.05)
    except BaseException:
        proc.kill()
        raise
    return proc, f"127.0.0.1:{port}"


def _listening_port(pid: int) -> int | None:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            return int(fields[1].split(":")[1], 16)
    return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_RUNS", "60")))
    args = parser.parse_args(argv)
    if not PLUGIN.exists():
        print(f"{PLUGIN} is missing: run `make build` first", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="acbench-agent-"))
    names = [f"acbn{uuid.uuid4().hex[:6]}" for _ in range(PODS + 1)]
    agent: subprocess.Popen[bytes] | None = None
    try:
        with netns.many(names):
            try:
                print("building the empty baseline with build/pyinstaller.spec ...", file=sys.stderr, flush=True)
                empty = build_empty(workdir)
                agent, health = start_agent(workdir)
                return _run(workdir, empty, names, agent, health, args.runs)
            finally:
                if agent is not None:
                    stop_process(agent, 15)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: Path, empty: Path, names: list[str], agent: subprocess.Popen[bytes], health: str,
         runs: int) -> int:
    run_dir = workdir / "run"
    stdin = conf(run_dir)
    rt_netns = f"/var/run/netns/{names[-1]}"
    empty_case = Case("empty", [str(empty)], dict(BASE_ENV))
    add_case = Case("add", [str(PLUGIN)], env_for("ADD", "rt", rt_netns, "rt-cid", "uid-rt"), stdin)
    del_case = Case("del", [str(PLUGIN)], env_for("DEL", "rt", rt_netns, "rt-cid", "uid-rt"), stdin)
    for case in (empty_case, add_case, del_case):  # warm the page cache
        exec_once(case)
    empty_ms, add_ms = [], []
    for _ in range(runs):
        empty_ms.append(exec_once(empty_case))
        add_ms.append(exec_once(add_case))
        exec_once(del_case)
    # the agent's share alone: the same ADD over the socket from this process (no plugin exec)
    from testbed.agent import call, request

    wire_ms = []
    for _ in range(runs):
        message = request("add", "rt", "shop", uid="uid-rt", netns=rt_netns, container_id="rt-wire")
        started = time.perf_counter()
        reply = call(str(run_dir / rundir.SOCKET), message)
        wire_ms.append((time.perf_counter() - started) * 1000)
        assert reply["ok"] and reply["enrolled"], reply
        call(str(run_dir / rundir.SOCKET), dict(message, op="del"))
    # 110 concurrent enrolled ADDs of distinct pods
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        env = env_for("ADD", f"p{i}", f"/var/run/netns/{names[i]}", f"cid-{i}", f"uid-{i}")
        started = time.perf_counter()
        proc = subprocess.run([str(PLUGIN)], env=env, input=stdin, capture_output=True, check=False)
        elapsed = (time.perf_counter() - started) * 1000
        with lock:
            latencies.append(elapsed)
            if proc.returncode != 0:
                failures.append(proc.stdout.decode()[:200])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(PODS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_ms = (time.perf_counter() - started) * 1000
    with urllib.request.urlopen(f"http://{health}/debug/pods", timeout=10) as resp:
        records = len(json.loads(resp.read()))
    rss = rss_mb(agent.pid)

    empty_med, add_med = statistics.median(empty_ms), statistics.median(add_ms)
    ratio = add_med / empty_med
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    report.header(f"Enrolled ADD exec through a real agent (noop dataplane) vs the empty frozen executable: "
                  f"{runs} runs each, round-robin; then {PODS} concurrent ADDs of distinct pods")
    report.row(f"empty frozen executable (baseline), median of {runs}", f"{empty_med:.1f} ms")
    report.row("agent share: the same ADD over the socket from the benchmark (no exec), median",
               f"{statistics.median(wire_ms):.2f} ms")
    report.row("enrolled ADD exec via the agent (noop dataplane), median",
               f"{add_med:.1f} ms (p90 {percentile(add_ms, 90):.1f}) = {ratio:.2f}x empty",
               f"<= {TARGET_RATIO:g}x empty", ratio <= TARGET_RATIO)
    report.row("CPU time per exec (user + sys, median): empty / enrolled ADD",
               f"{cpu_median(empty_case):.1f} / {cpu_median(add_case):.1f} ms = "
               f"{cpu_median(add_case) / cpu_median(empty_case):.2f}x (the agent's CPU not included)")
    report.row(f"{PODS} concurrent enrolled ADD execs: wall; p50 / p99 per exec",
               f"{wall_ms:.0f} ms; {p50:.0f} / {p99:.0f} ms")
    report.row(f"{PODS} concurrent enrolled ADD execs: failures / agent records", f"{len(failures)} / {records}",
               f"0 / {PODS}", not failures and records == PODS)
    report.row(f"agent RSS with {records} pods enrolled", f"{rss:.1f} MB", f"<= {TARGET_RSS_MB:g} MB",
               rss <= TARGET_RSS_MB)
    if failures:
        print(f"first failure: {failures[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
