"""The node image under containerd: container start -> /readyz on a node with 110 enrolled pods running
(target <= 3 s), against the same on an empty node (the baseline, same run); the image's size; the RSS of the
node process with 110 pods (target <= 80 MB).

The node pod runs through CRI exactly as in tests/test_containerd_node_image.py (spec read from deploy/, the
fake API server inside the test node's netns, the ZDS peer as ztunnel). Every restart is an upgrade (the
DaemonSet exists): chain, binary, records and snapshot stay, so each new container starts on a warm node.
Rows go through ``bench.report`` (a missed target is marked, not an error; exit non-zero only when it could not
measure).

    .venv/bin/python -m bench.node_image [--pods 110] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench import report
from testbed.agent import RECONCILE_PASSES, metric_value
from testbed.cri import env as env_mod
from testbed.cri.nodepod import IMAGE_TAR, NodeCri, NodePod, NodePodDirs, fake_kube_in_netns, import_image
from testbed.peer import PeerProcess
from testbed.poll import wait_for

READY_TARGET_S = 3.0
RSS_TARGET_MB = 80.0
NS = "shop"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _restart(cri: NodeCri, old: NodePod | None, new: NodePod) -> float:
    if old is not None:
        code = old.stop(cri)
        if code != 0:
            raise RuntimeError(f"node container exited {code}:\n{old.log_tail()}")
        old.remove(cri)
    new.start(cri)
    return new.wait_ready(cri, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node_image")
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if not IMAGE_TAR.exists():
        print(f"{IMAGE_TAR} is missing: run `make image`", file=sys.stderr)
        return 1
    env = env_mod.up()
    fake = peer = None
    pods: list[str] = []
    current: NodePod | None = None
    try:
        env.write_primary_conflist()
        import_image(env)
        fake = fake_kube_in_netns(env.netns_path)
        fake.upsert_namespace(NS, {"istio.io/dataplane-mode": "ambient"})
        fake.lifecycle.upsert_daemonset("ambient-cni-node", "istio-system")
        fake.lifecycle.upsert_node(env.name)
        dirs = NodePodDirs(Path(env.root) / "nodepod")
        dirs.make()
        peer = PeerProcess(str(dirs.zds_socket), env.root)
        cri = NodeCri(env.socket, timeout=120)
        first = NodePod(env, dirs, fake)
        install_s = _restart(cri, None, first)  # installs the binary into the bin dir
        current = first
        empty: list[float] = []
        for _ in range(args.repeat):
            nxt = NodePod(env, dirs, fake)
            empty.append(_restart(cri, current, nxt))
            current = nxt
        started = time.monotonic()
        for i in range(args.pods):
            spec = env.pod(f"app-{i}", NS)
            fake.upsert_pod(spec.name, NS, env.name, uid=spec.uid)
            pods.append(cri.run_pod_sandbox(spec))
        create_s = time.monotonic() - started
        loaded: list[float] = []
        for _ in range(args.repeat):
            nxt = NodePod(env, dirs, fake)
            loaded.append(_restart(cri, current, nxt))
            current = nxt
        assert current is not None
        node_pod = current
        wait_for(lambda: metric_value(node_pod.http("/metrics")[1], RECONCILE_PASSES) >= 1, 60,
                 "the start-up reconcile pass", interval=0.1)
        pid = current.pid(cri)
        rss = _rss_mb(pid)
        records = current.http("/debug/pods")[1].count('"uid"')
        size_mb = IMAGE_TAR.stat().st_size / 1e6
        ready_median, empty_median = statistics.median(loaded), statistics.median(empty)
        report.header(f"The node image under containerd (CRI): container start -> /readyz, {args.pods} enrolled pods "
                      "vs an empty node; image size; node process RSS")
        report.row(f"node image size (`{IMAGE_TAR.name}`, gzip layers)", f"{size_mb:.1f} MB")
        report.row("node container, first start (installs the bundle) -> /readyz", f"{install_s:.2f} s")
        report.row("node container start -> /readyz, empty node (baseline)",
                   f"median {empty_median:.2f} s ({', '.join(f'{x:.2f}' for x in empty)})")
        report.row(f"node container start -> /readyz, {args.pods} enrolled pods running",
                   f"median {ready_median:.2f} s ({', '.join(f'{x:.2f}' for x in loaded)}) = "
                   f"{ready_median / empty_median:.2f}x the empty node", f"<= {READY_TARGET_S:g} s",
                   ready_median <= READY_TARGET_S)
        report.row(f"node process RSS with {args.pods} pods ({records} records)", f"{rss:.1f} MB",
                   f"<= {RSS_TARGET_MB:g} MB", rss <= RSS_TARGET_MB)
        report.row(f"{args.pods} enrolled RunPodSandbox calls through the node container's plugin (context)",
                   f"{create_s:.1f} s")
        return 0
    finally:
        if current is not None and fake is not None:
            fake.lifecycle.delete_daemonset("ambient-cni-node", "istio-system")
            with NodeCri(env.socket, timeout=120) as cri:
                for sid in pods:
                    try:
                        cri.stop_pod_sandbox(sid)
                        cri.remove_pod_sandbox(sid)
                    except Exception:
                        pass
                current.remove(cri)
        if peer is not None:
            peer.stop()
        if fake is not None:
            fake.stop()
        env_mod.down(env)


if __name__ == "__main__":
    raise SystemExit(main())
