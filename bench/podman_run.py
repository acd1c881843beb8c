"""``podman run --rm`` with vs without ambient-cni in the chain (podman 4.3, CNI backend).

One podman environment (testbed/podman/env.py): a network made by ``podman network create``, chained by our
installer (inplace); the agent (``--dataplane inpod``) and the ZDS peer run. The baseline is the identical
conflist without ambient-cni, chosen per command with ``--network-config-dir`` (podman validates every
network in the conf dir, so the baseline dir holds that one network too). Series are interleaved (the order
rotates every round) so all see the same machine load; each ``podman run --rm ... true`` is timed end to end
(process start to exit: image, netns, CNI ADD, container, CNI DEL from the cleanup process). Each run of the
plugin's series costs it four execs: VERSION + ADD from ``podman run``, VERSION + DEL from the cleanup.

    .venv/bin/python -m bench.podman_run [--runs 15] [--warmup 2]

Rows go through ``bench.report``: context rows (ratios against the chain without ambient-cni), no target.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report
from testbed.cri.product import require_product
from testbed.podman import env as env_mod
from testbed.podman.config import TOOL_IMAGE
from testbed.podman.env import PodmanEnv
from testbed.podman.product import ENROLLED_NS_LABELS, Identity, Network, Node

ENROLLED = Identity("shop", "bench-0", "6f1c0000-0000-4000-8000-00000000be01")
NOT_ENROLLED = Identity("web", "bench-1", "6f1c0000-0000-4000-8000-00000000be02")


@dataclass
class Series:
    label: str
    cni_args: str | None
    baseline: bool
    samples_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def pct(self, q: float) -> float:
        data = sorted(self.samples_ms)
        return data[min(len(data) - 1, round(q * (len(data) - 1)))]


def _one(env: PodmanEnv, net: Network, series: Series) -> float:
    argv = env.argv(*env.run_args("--rm", "--network", net.name, TOOL_IMAGE, "true"),
                    conf_dir=env.layout.baseline_conf_dir if series.baseline else None)
    start = time.perf_counter()
    res = subprocess.run(argv, env=env.process_env(series.cni_args), capture_output=True, text=True, check=False,
                         timeout=120)
    elapsed = (time.perf_counter() - start) * 1000.0
    if res.returncode != 0:
        raise RuntimeError(f"{series.label}: podman run exited {res.returncode}: {res.stderr.strip()}")
    return elapsed


def plugin_exec_ms(bin_dir: Path, runs: int = 20) -> float:
    """Median time of one exec of the installed plugin (CNI VERSION), for attribution."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(bin_dir / "ambient-cni")], env={"CNI_COMMAND": "VERSION"}, input=b"{}",
                       capture_output=True, check=False)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def run(runs: int, warmup: int) -> tuple[list[Series], float]:
    require_product()
    env = env_mod.up()
    node: Node | None = None
    try:
        net = Network.create(env)
        node = Node(env, dataplane="inpod", namespaces={"shop": dict(ENROLLED_NS_LABELS), "web": {}},
                    pods=[ENROLLED.state_entry(), NOT_ENROLLED.state_entry()])
        node.write_cluster_state()
        node.start_agent(wait_ready=False)
        node.start_peer()
        net.install(node, "inplace")
        series = [
            Series("bridge chain (podman's), no ambient-cni", None, True, []),
            Series("+ ambient-cni, not a Kubernetes pod (podman's own CNI_ARGS)", None, False, []),
            Series("+ ambient-cni, namespaced pod not enrolled (snapshot)", NOT_ENROLLED.cni_args, False, []),
            Series("+ ambient-cni, enrolled pod (inpod + ZDS ack)", ENROLLED.cni_args, False, []),
        ]
        for _ in range(warmup):
            for s in series:
                _one(env, net, s)
        for i in range(runs):
            shift = i % len(series)
            for s in series[shift:] + series[:shift]:
                s.samples_ms.append(_one(env, net, s))
        return series, plugin_exec_ms(env.bin_dir)
    finally:
        if node is not None:
            node.close()
        env_mod.down(env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="timed runs per series")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per series first")
    args = parser.parse_args(argv)
    series, exec_ms = run(args.runs, args.warmup)
    base = series[0]
    report.header("`podman run --rm ... true` (podman 4.3, CNI backend), end to end, with vs without ambient-cni "
                  "in the chain; series interleaved")
    for s in series:
        ratio = "" if s is base else f" = {s.median / base.median:.2f}x (+{s.median - base.median:.0f} ms)"
        report.row(f"podman run --rm, {s.label}", f"median {s.median:.1f} ms (p90 {s.pct(0.9):.1f}, "
                   f"n {len(s.samples_ms)}){ratio}", summary=s is not base)  # the ratios: no target, headline
    report.row("one exec of the plugin installed for podman (CNI VERSION; 4 execs per run)",
               f"median {exec_ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
