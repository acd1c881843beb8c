"""RunPodSandbox latency under containerd CRI: an enrolled pod through our chain vs the same chain without us.

Two containerd environments run side by side (tests/cri/env.py): A has the primary conflist only
(bridge + host-local + portmap), B has the same primary plus ambient-cni installed by our installer, the agent
(``--dataplane inpod``) and the ZDS peer. Pods are created alternately on A and B so both see the same machine
load; each RunPodSandbox is timed end to end (CRI call to reply; the sandbox is READY then), and the sandbox is
stopped and removed outside the timed region. Prints the ratio of medians (target <= 1.25x) and a markdown table.

    .venv/bin/python -m bench.cri_sandbox [--pods 30] [--warmup 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cni_plugin import snapshot as snapshot_mod
from tests.cri import env as env_mod
from tests.cri.client import CriClient
from tests.cri.env import CriEnv
from tests.cri.product import ENROLLED_NS_LABELS, Node, require_product

TARGET_RATIO = 1.25


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
    path = str(node.run_dir / snapshot_mod.SNAPSHOT_NAME)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(snapshot_mod.read(path).pods) >= count:
                return
        except snapshot_mod.SnapshotError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the agent's enrollment snapshot never listed the benchmark pods")


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


def plugin_exec_ms(bin_dir: Path, runs: int = 20) -> float:
    """Median time of one exec of the installed plugin (CNI VERSION): its start-up cost, for attribution."""
    plugin = bin_dir / "ambient-cni"
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"}, input=b"{}", capture_output=True, check=False)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def run(pods: int, warmup: int) -> tuple[Series, Series, Series, float, float]:
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
        return baseline, enrolled, unenrolled, agent_add_ms(node), plugin_exec_ms(ours_env.bin_dir)
    finally:
        if node is not None:
            node.close()
        for created in (plain_env, ours_env):
            if created is not None:
                env_mod.down(created)


def report(baseline: Series, others: list[Series]) -> str:
    lines = [
        "| chain | n | median ms | p90 ms | mean ms | ratio (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in [baseline, *others]:
        lines.append(
            f"| {s.label} | {len(s.samples_ms)} | {s.median:.1f} | {s.pct(0.9):.1f} | "
            f"{statistics.fmean(s.samples_ms):.1f} | {s.median / baseline.median:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=30, help="timed pods per series")
    parser.add_argument("--warmup", type=int, default=3, help="untimed pods per environment first")
    args = parser.parse_args(argv)
    baseline, enrolled, unenrolled, agent_ms, exec_ms = run(args.pods, args.warmup)
    ratio = enrolled.median / baseline.median
    print(f"RunPodSandbox, enrolled pod vs no plugin: {ratio:.2f}x (target <= {TARGET_RATIO:.2f}x)")
    print(f"RunPodSandbox, unenrolled pod vs no plugin: {unenrolled.median / baseline.median:.2f}x")
    print()
    print(report(baseline, [enrolled, unenrolled]))
    print()
    print(f"one exec of the installed plugin (CNI VERSION), median: {exec_ms:.1f} ms")
    print(f"agent-side mean ADD (request -> reply; iptables in the pod netns, ZDS ack): {agent_ms:.1f} ms")
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
