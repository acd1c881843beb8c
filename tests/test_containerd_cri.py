"""The product under a real container runtime: containerd 1.6 CRI creates pod sandboxes (runc, a static pause
image), runs our chain (bridge + host-local + portmap + ambient-cni, installed by our installer), and our agent
(a host process with a file cluster view, in-pod dataplane) enrolls the pods with a ztunnel-compatible ZDS peer.

Real parts: containerd, runc, the reference CNI plugins, the frozen ``dist/ambient-cni``, iptables in the pods'
netns. Stand-ins (docs/testing.md): the cluster view, as there is no kube-apiserver here, so the agent reads the
``--cluster-state`` file (the same namespace/pod objects an informer would deliver); the ZDS peer as ztunnel.
containerd lives in its own netns (testbed.cri.env); pods get 10.x addresses on a bridge inside it; nothing
touches the host network.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir
from cni_plugin import snapshot as snapshot_mod
from testbed.cri import env as env_mod
from testbed.cri.client import CriClient, CriError, PodSpec
from testbed.cri.env import CriEnv
from testbed.cri.product import ENROLLED_NS_LABELS, PRODUCT, Node
from testbed.poll import wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.timeout(240)]

ENROLLED_NS = "shop"
PLAIN_NS = "plain"
CNI_LOAD_ERRORS = re.compile(r"level=error.*(cni|CNI)|failed to (re)?load cni|cni config load failed", re.IGNORECASE)


def _require_product() -> None:
    if not PRODUCT.exists():
        pytest.fail(f"{PRODUCT} is missing: build it with `make build`", pytrace=False)


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    _require_product()
    env = env_mod.up()
    try:
        env.write_primary_conflist()
        yield env
    finally:
        problems = env_mod.down(env)
        assert not problems, f"teardown left things behind: {problems}"


@pytest.fixture(scope="module")
def node(cri_env: CriEnv) -> Iterator[Node]:
    """The installer has chained ambient-cni behind the bridge primary; agent (inpod) + ZDS peer running."""
    n = Node(cri_env, dataplane="inpod", namespaces={ENROLLED_NS: dict(ENROLLED_NS_LABELS), PLAIN_NS: {}})
    try:
        n.write_cluster_state()
        n.start_agent(wait_ready=False)
        n.start_peer()
        n.install("--deadline-ms", "5000")
        cri_env.wait_network_ready()
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def cri(cri_env: CriEnv) -> Iterator[CriClient]:
    with cri_env.client() as client:
        yield client


def _remove(cri: CriClient, sandbox_id: str) -> None:
    cri.stop_pod_sandbox(sandbox_id)
    cri.remove_pod_sandbox(sandbox_id)


def _records(node: Node, namespace: str, name: str) -> list[dict[str, Any]]:
    return [r for r in node.debug_pods() if r.get("namespace") == namespace and r.get("name") == name]


def _plugin_log(node: Node) -> list[dict[str, Any]]:
    path = node.run_dir / rundir.PLUGIN_LOG
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _del_count(node: Node) -> float:
    return sum(v for (op, _), v in node.request_counts().items() if op == "del")


def _wait_snapshot_has(node: Node, key: str, timeout: float = 10.0) -> None:
    path = str(node.run_dir / rundir.SNAPSHOT)
    wait_for(lambda: key in snapshot_mod.read(path).pods, timeout, tolerate=(snapshot_mod.SnapshotError,),
             what=lambda: f"the agent's snapshot to list {key}:\n{node.agent_log_tail()}")


# ------------------------------------------------------------------------------------------------ tests


def test_plain_bridge_chain_runs_a_pod_sandbox() -> None:
    """Baseline without our product: containerd + runc + the pause image + bridge/host-local/portmap."""
    with env_mod.running() as env:
        env.write_primary_conflist()
        env.wait_network_ready()
        images = env.ctr("images", "ls", "-q")
        assert images.returncode == 0, images.stderr
        assert "registry.local/ambient-cni/pause:3.9" in images.stdout.split()
        with env.client() as cri:
            version = cri.version()
            assert version.runtime_name == "containerd"
            assert version.runtime_api_version == "v1"
            sid = cri.run_pod_sandbox(env.pod("baseline", "default", port_mappings=((80, 18080),)))
            info = cri.status(sid)
            assert info.ready, info
            prefix = env.subnet.rsplit(".", 1)[0] + "."
            assert info.ip.startswith(prefix), (info.ip, env.subnet)
            assert info.netns.startswith("/var/run/netns/cni-") and Path(info.netns).exists()
            _remove(cri, sid)
            assert not Path(info.netns).exists()
            assert cri.list_sandboxes() == []


def test_enrolled_pod_is_recorded_redirected_and_released(node: Node, cri: CriClient, cri_env: CriEnv) -> None:
    pod = cri_env.pod("cart-0", ENROLLED_NS)
    sid = cri.run_pod_sandbox(pod)
    removed = False
    try:
        info = cri.status(sid)
        assert info.ready
        (record,) = _records(node, ENROLLED_NS, "cart-0")
        # the pod is not in the cluster-state file: name, namespace and uid can only come from CNI_ARGS
        assert record["uid"] == pod.uid
        assert record["container_id"] == sid
        assert Path(record["netns_path"]).resolve() == Path(info.netns).resolve() or record["netns_path"] == info.netns
        assert f"{info.ip}/24" in record["ips"] or any(ip.startswith(info.ip + "/") for ip in record["ips"])

        doctor = node.doctor("--pod", f"{ENROLLED_NS}/cart-0")
        assert doctor.returncode == 0, f"doctor failed:\n{doctor.stdout}\n{doctor.stderr}"
        doctor_ns = node.doctor("--netns", info.netns)
        assert doctor_ns.returncode == 0, f"doctor --netns failed:\n{doctor_ns.stdout}\n{doctor_ns.stderr}"

        dels = _del_count(node)
        cri.stop_pod_sandbox(sid)  # DEL with the cached prevResult -> the agent forgets the pod
        assert _del_count(node) == dels + 1
        assert _records(node, ENROLLED_NS, "cart-0") == []
        assert not (node.run_dir / rundir.HINTS / f"{ENROLLED_NS}_cart-0").exists()
        cri.remove_pod_sandbox(sid)  # the second DEL, CNI_NETNS="" and no prevResult, must succeed
        removed = True
        assert _del_count(node) == dels + 2
        assert [s for s in cri.list_sandboxes() if s.id == sid] == []
        errors = [e for e in _plugin_log(node) if e.get("level") == "error" and sid.startswith(str(e.get("container")))]
        assert not errors, errors
    finally:
        if not removed:
            _remove(cri, sid)


def test_unenrolled_pods_start_without_the_agent(node: Node, cri: CriClient, cri_env: CriEnv) -> None:
    node.pods = [
        {"name": "web-0", "namespace": PLAIN_NS, "uid": "u-web-0", "labels": {}, "annotations": {}},
    ]
    node.write_cluster_state()
    _wait_snapshot_has(node, f"{PLAIN_NS}/web-0")
    before = node.request_counts()
    sids = [
        cri.run_pod_sandbox(cri_env.pod("web-0", PLAIN_NS, uid="u-web-0")),
        cri.run_pod_sandbox(cri_env.pod("coredns-0", "kube-system")),  # excluded namespace
    ]
    try:
        for sid in sids:
            assert cri.status(sid).ready
        assert node.request_counts() == before, "the plugin contacted the agent for a pod that is not enrolled"
        assert _records(node, PLAIN_NS, "web-0") == []
        # the netns hint is left for the agent anyway (the namespace may be enrolled later)
        hint = json.loads((node.run_dir / rundir.HINTS / f"{PLAIN_NS}_web-0").read_text())
        assert hint["uid"] == "u-web-0" and hint["container_id"] == sids[0]
    finally:
        for sid in sids:
            _remove(cri, sid)


def test_agent_down_fails_closed_then_recovers(node: Node, cri: CriClient, cri_env: CriEnv) -> None:
    pod = cri_env.pod("cart-1", ENROLLED_NS)
    node.stop_agent()
    try:
        with pytest.raises(CriError) as failure:
            cri.run_pod_sandbox(pod)
        assert "ambient-cni" in failure.value.details
        assert "agent" in failure.value.details and "unreachable" in failure.value.details, failure.value.details
        assert [s for s in cri.list_sandboxes() if s.metadata.name == "cart-1" and s.state == 0] == []
    finally:
        node.start_agent(wait_ready=False)
        node.wait_ready()
    sid = cri.run_pod_sandbox(pod)  # what the kubelet does next: retry the same pod
    try:
        assert cri.status(sid).ready
        (record,) = _records(node, ENROLLED_NS, "cart-1")
        assert record["uid"] == pod.uid
    finally:
        _remove(cri, sid)
    assert _records(node, ENROLLED_NS, "cart-1") == []


def test_containerd_reloads_the_conflist_the_installer_rewrites(node: Node, cri: CriClient, cri_env: CriEnv) -> None:
    ours = node.our_conflist()
    assert ours is not None, sorted(p.name for p in cri_env.conf_dir.iterdir())
    log_offset = len(cri_env.log_text())
    # the node's primary network changes (a new key); the installer regenerates our conflist from it
    primary = cri_env.conf_dir / "10-bridge.conflist"
    doc = json.loads(primary.read_text())
    doc["plugins"][0]["mtu"] = 1400
    tmp = primary.with_name(".10-bridge.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.rename(primary)
    node.install("--deadline-ms", "5000")
    regenerated = json.loads(ours.read_text())
    assert regenerated["plugins"][0].get("mtu") == 1400
    assert regenerated["plugins"][-1]["type"] == "ambient-cni"
    assert regenerated["cniVersion"] == doc["cniVersion"]

    # containerd reloads on fsnotify, asynchronously: the new pod's MTU shows the rewritten file is in use
    def new_pod_has_the_new_mtu() -> bool:
        sid = cri.run_pod_sandbox(cri_env.pod(f"web-{time.monotonic_ns()}", ENROLLED_NS))
        info = cri.status(sid)
        assert info.ready
        mtu = _pod_mtu(info.netns)
        enrolled = len(_records(node, ENROLLED_NS, info.name)) == 1  # the reloaded chain still ends with our plugin
        _remove(cri, sid)
        if mtu == 1400:
            assert enrolled
        return mtu == 1400

    wait_for(new_pod_has_the_new_mtu, 10, interval=0.2, what="containerd to use the conflist the installer rewrote")
    new_log = cri_env.log_text()[log_offset:]
    errors = [line for line in new_log.splitlines() if CNI_LOAD_ERRORS.search(line)]
    assert not errors, "containerd logged CNI config errors after the rewrite:\n" + "\n".join(errors)

    # negative control: the same log check does see a conflist containerd cannot parse
    broken = cri_env.conf_dir / "00-0broken.conflist"
    broken.write_text('{"cniVersion": "1.0.0", "name": "broken", "plugins": [')
    try:
        wait_for(lambda: CNI_LOAD_ERRORS.search(cri_env.log_text()[log_offset:]), 10, interval=0.1,
                 what="the log check to see a parse error")
    finally:
        broken.unlink()
    cri_env.wait_network_ready()


def _pod_mtu(netns: str) -> int:
    out = subprocess.run(
        ["nsenter", f"--net={netns}", "ip", "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)[0]["mtu"])


def test_twenty_concurrent_pods_enroll_and_leave_nothing_behind(node: Node, cri: CriClient, cri_env: CriEnv) -> None:
    pods: list[PodSpec] = [cri_env.pod(f"burst-{i:02d}", ENROLLED_NS) for i in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda p: _try_run(cri, p), pods))
    sids = [sid for sid in results if isinstance(sid, str)]
    try:
        errors = [r for r in results if isinstance(r, Exception)]
        assert not errors, f"{len(errors)} of 20 RunPodSandbox failed: {errors[:3]}"
        assert all(cri.status(sid).ready for sid in sids)
        records = {r["uid"]: r for r in node.debug_pods() if r.get("namespace") == ENROLLED_NS}
        assert {p.uid for p in pods} <= set(records), "not every concurrent pod was enrolled"
    finally:
        with ThreadPoolExecutor(max_workers=20) as pool:
            list(pool.map(lambda sid: _remove(cri, sid), sids))
    left = [r for r in node.debug_pods() if str(r.get("name", "")).startswith("burst-")]
    assert left == [], f"the agent still has records: {left}"
    hints = sorted(p.name for p in (node.run_dir / rundir.HINTS).glob(f"{ENROLLED_NS}_burst-*"))
    assert hints == []
    assert [s for s in cri.list_sandboxes() if s.metadata.name.startswith("burst-")] == []


def _try_run(cri: CriClient, pod: PodSpec) -> str | Exception:
    try:
        return cri.run_pod_sandbox(pod)
    except CriError as err:
        return err
