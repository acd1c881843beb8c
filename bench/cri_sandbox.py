"""RunPodSandbox latency under containerd CRI: an enrolled pod through our chain vs the same chain without us.

Two containerd environments run side by side (testbed/cri/env.py): A has the primary conflist only
(bridge + host-local + portmap), B has the same primary plus ambient-cni installed by our installer, the agent
(``--dataplane inpod``) and the ZDS peer. Pods are created alternately on A and B so both see the same machine
load; each RunPodSandbox is timed end to end (CRI call to reply; the sandbox is READY then), and the sandbox is
stopped and removed outside the timed region. Ratios of medians; targets: enrolled <= 1.30x, not enrolled <= 1.15x.
Floors measured in the same run: one exec of an empty frozen executable (the least any frozen plugin in the
chain adds) and the agent's own time for an enrolled ADD (rules, routes, ZDS ack), both as ratios over the
baseline chain.

    .venv/bin/python -m bench.cri_sandbox [--pods 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench import report
from bench.plugin_exec import build_empty
from cni_plugin import rundir
from cni_plugin import snapshot as snapshot_mod
from testbed.cri import env as env_mod
from testbed.cri.client import CriClient
from testbed.cri.env import CriEnv
from testbed.cri.product import ENROLLED_NS_LABELS, Node, require_product
from testbed.poll import wait_for

TARGET_ENROLLED = 1.30
TARGET_UNENROLLED = 1.15


@dataclass
class Series:
    label: str
    samples_ms: list[float]

    def pct(self, q: float) -> float:
        data = sorted(self.samples_ms)
        return data[min(len(data) - 1, round(q * (len(data) - 1)))]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)


def _one(cri: CriClient, env: CriEnv, name: str, namespace: str) -> float:
    start = time.perf_counter()
    sid = cri.run_pod_sandbox(env.pod(name, namespace, uid=_uid(namespace, name)))
    elapsed = (time.perf_counter() - start) * 1000.0
    cri.stop_pod_sandbox(sid)
    cri.remove_pod_sandbox(sid)
    return elapsed


def _uid(namespace: str, name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{namespace}/{name}"))


def _cluster_pods(pods: int, warmup: int) -> list[dict[str, object]]:
    """Like a real cluster, the API server knows every pod before the kubelet creates its sandbox."""
    names = [f"warm-{i}" for i in range(warmup)] + [f"bench-{i}" for i in range(pods)]
    return [
        {"name": name, "namespace": ns, "uid": _uid(ns, name), "labels": {}, "annotations": {}}
        for ns in ("shop", "plain")
        for name in names
    ]


def _wait_snapshot(node: Node, count: int, timeout: float = 15.0) -> None:
    path = str(node.run_dir / rundir.SNAPSHOT)
    wait_for(lambda: len(snapshot_mod.read(path).pods) >= count, timeout, "the agent's enrollment snapshot to list "
             "the benchmark pods", interval=0.05, tolerate=(snapshot_mod.SnapshotError,))


def agent_add_ms(node: Node) -> float:
    """Mean agent-side time of an ADD (request complete -> reply), from the agent's own histogram."""
    total = count = 0.0
    for family in text_string_to_metric_families(node.metrics_text()):
        for sample in family.samples:
            if sample.labels.get("op") == "add" and sample.name == "ambient_cni_agent_request_seconds_sum":
                total = sample.value
            if sample.labels.get("op") == "add" and sample.name == "ambient_cni_agent_request_seconds_count":
                count = sample.value
    return 1000.0 * total / count if count else float("nan")


def exec_ms(argv: list[str], env: dict[str, str], runs: int = 30) -> float:
    """Median time of one exec (for attribution: the plugin's start-up, the empty frozen executable's)."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, input=b"{}", capture_output=True, check=False)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def run(pods: int, warmup: int, empty: Path) -> tuple[Series, Series, Series, float, float, float]:
    require_product()
    plain_env = env_mod.up()
    ours_env: CriEnv | None = None
    node: Node | None = None
    try:
        plain_env.write_primary_conflist()
        ours_env = env_mod.up()
        ours_env.write_primary_conflist()
        node = Node(ours_env, dataplane="inpod", namespaces={"shop": dict(ENROLLED_NS_LABELS), "plain": {}})
        node.pods = _cluster_pods(pods, warmup)
        node.write_cluster_state()
        node.start_agent(wait_ready=False)
        node.start_peer()
        node.install()
        plain_env.wait_network_ready()
        ours_env.wait_network_ready()
        _wait_snapshot(node, len(node.pods))
        baseline = Series("bridge chain, no ambient-cni", [])
        enrolled = Series("bridge chain + ambient-cni, enrolled pod (inpod + ZDS ack)", [])
        unenrolled = Series("bridge chain + ambient-cni, pod not enrolled (decided from the snapshot)", [])
        with plain_env.client() as cri_a, ours_env.client() as cri_b:
            for i in range(warmup):
                _one(cri_a, plain_env, f"warm-{i}", "shop")
                _one(cri_b, ours_env, f"warm-{i}", "shop")
            for i in range(pods):
                # rotate the order so no series always runs first
                jobs = [
                    (baseline, cri_a, plain_env, "shop"),
                    (enrolled, cri_b, ours_env, "shop"),
                    (unenrolled, cri_b, ours_env, "plain"),
                ]
                shift = i % len(jobs)
                for series, cri, env, namespace in jobs[shift:] + jobs[:shift]:
                    series.samples_ms.append(_one(cri, env, f"bench-{i}", namespace))
        plugin = str(ours_env.bin_dir / "ambient-cni")
        return (baseline, enrolled, unenrolled, agent_add_ms(node), exec_ms([plugin], {"CNI_COMMAND": "VERSION"}),
                exec_ms([str(empty)], {}))
    finally:
        if node is not None:
            node.close()
        for created in (plain_env, ours_env):
            if created is not None:
                env_mod.down(created)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=30, help="timed pods per series")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pods per environment first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="acbench-cri-") as workdir:
        print("building the empty baseline with build/pyinstaller.spec ...", file=sys.stderr, flush=True)
        empty = build_empty(Path(workdir))
        baseline, enrolled, unenrolled, agent_ms, plugin_ms, empty_ms = run(args.pods, args.warmup, empty)
    base = baseline.median
    report.header(f"containerd RunPodSandbox (CRI call to READY), {args.pods} pods per series, interleaved; "
                  "the baseline is the same bridge chain without ambient-cni")
    report.row(f"{baseline.label}, median", f"{base:.1f} ms (p90 {baseline.pct(0.9):.1f})")
    for series, target in ((enrolled, TARGET_ENROLLED), (unenrolled, TARGET_UNENROLLED)):
        ratio = series.median / base
        report.row(series.label, f"{series.median:.1f} ms (p90 {series.pct(0.9):.1f}) = {ratio:.2f}x",
                   f"<= {target:.2f}x", ratio <= target)
    report.row("floor: one exec of an empty frozen executable",
               f"{empty_ms:.1f} ms: (baseline + it) = {(base + empty_ms) / base:.2f}x")
    report.row("floor, enrolled: that exec + the agent-side ADD (mean, from the agent's histogram)",
               f"{empty_ms:.1f} + {agent_ms:.1f} ms: {(base + empty_ms + agent_ms) / base:.2f}x")
    report.row("one exec of the installed plugin (CNI VERSION), median", f"{plugin_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
