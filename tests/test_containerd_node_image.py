"""The node image under real containerd, run through the CRI API as the ``ambient-cni-node`` DaemonSet's pod
(testbed/cri/nodepod.py: command, env, mounts and security context read from deploy/): it installs the chain into
the test node's CNI dirs, its agent redirects an enrolled pod that containerd creates next (the seed's rules in
the pod's netns, the netns handed to the test's ZDS peer), and its SIGTERM does what the Kubernetes API says:
"DaemonSet deleted" puts the CNI dirs back to their original bytes; "upgrade" keeps the chain and binary, and
a new enrolled pod fails closed until the next container is up.

Real parts: containerd 1.6 + runc, the image from ``make image`` (imported with ``ctr -n k8s.io images
import``), the reference CNI plugins, iptables. Stand-ins (docs/testing.md): the Kubernetes API server
(testbed/fakekube: none can run here), listening inside the test node's netns, and the ZDS peer as ztunnel.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin import rundir
from nodeagent.dataplane import rules
from nodeimage.build import IMAGE_NAME
from testbed.cri import env as env_mod
from testbed.cri.client import CriError
from testbed.cri.env import CriEnv
from testbed.cri.nodepod import IMAGE_TAR, NodeCri, NodePod, NodePodDirs, fake_kube_in_netns, import_image
from testbed.fakekube.server import FakeKube
from testbed.node_proc import tree_bytes
from testbed.peer import PeerProcess
from testbed.poll import wait_for
from tests import goldens

pytestmark = [pytest.mark.containerd, pytest.mark.timeout(400)]

ENROLLED_NS = "shop"
DS, DS_NS = "ambient-cni-node", "istio-system"
NOT_READY = {"key": "cni.istio.io/not-ready", "value": "true", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def cri_env() -> Iterator[CriEnv]:
    if not IMAGE_TAR.exists():
        pytest.fail(f"{IMAGE_TAR} is missing: build it with `make image`", pytrace=False)
    env = env_mod.up()
    try:
        env.write_primary_conflist()
        name = import_image(env)
        assert name == IMAGE_NAME, f"ctr named the image {name!r}; deploy/ uses {IMAGE_NAME!r}"
        yield env
    finally:
        problems = env_mod.down(env)
        assert not problems, f"teardown left things behind: {problems}"


@pytest.fixture
def fake(cri_env: CriEnv) -> Iterator[FakeKube]:
    server = fake_kube_in_netns(cri_env.netns_path)
    server.upsert_namespace(ENROLLED_NS, {"istio.io/dataplane-mode": "ambient"})
    server.lifecycle.upsert_daemonset(DS, DS_NS)
    server.lifecycle.upsert_node(cri_env.name, taints=[NOT_READY])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cri(cri_env: CriEnv) -> Iterator[NodeCri]:
    client = NodeCri(cri_env.socket, timeout=120)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def peer(cri_env: CriEnv) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    dirs = NodePodDirs(Path(cri_env.root) / "nodepod")
    dirs.make()
    peer = PeerProcess(str(dirs.zds_socket), cri_env.root)
    try:
        yield peer.proc, Path(peer.log_file)
    finally:
        peer.stop()


def _node_pod(env: CriEnv, fake: FakeKube) -> NodePod:
    return NodePod(env, NodePodDirs(Path(env.root) / "nodepod"), fake)


def _iptables_save(netns: str) -> str:
    res = subprocess.run(["nsenter", f"--net={netns}", "iptables-save"], capture_output=True, text=True, timeout=30,
                         check=True)
    return res.stdout


def _enrolled_pod(env: CriEnv, cri: NodeCri, fake: FakeKube, name: str) -> str:
    spec = env.pod(name, ENROLLED_NS)
    fake.upsert_pod(name, ENROLLED_NS, env.name, uid=spec.uid)  # the API has the pod before the kubelet runs it
    return cri.run_pod_sandbox(spec)


def _remove_sandbox(cri: NodeCri, sandbox_id: str) -> None:
    try:
        cri.stop_pod_sandbox(sandbox_id)
        cri.remove_pod_sandbox(sandbox_id)
    except CriError:
        pass


def test_daemonset_pod_installs_redirects_and_uninstalls_when_deleted(
    cri_env: CriEnv, cri: NodeCri, fake: FakeKube, peer: tuple[subprocess.Popen[bytes], Path]
) -> None:
    conf_before, bin_before = tree_bytes(cri_env.conf_dir), tree_bytes(cri_env.bin_dir)
    node = _node_pod(cri_env, fake)
    sandboxes: list[str] = []
    try:
        node.start(cri)
        seconds = node.wait_ready(cri)
        print(f"container start -> /readyz: {seconds:.2f} s")
        wait_for(lambda: fake.lifecycle.node(cri_env.name)["spec"].get("taints") == [], 20, "the taint removal")  # type: ignore[index]
        # the chain now includes ambient-cni, and its binary resolves on the host (a relative symlink)
        conf = tree_bytes(cri_env.conf_dir)
        assert b'"type": "ambient-cni"' in conf["00-ambient-cni.conflist"]
        plugin = cri_env.bin_dir / "ambient-cni"
        assert plugin.is_symlink() and plugin.resolve().parent.parent == cri_env.bin_dir.resolve()
        version = subprocess.run([str(plugin)], env={"CNI_COMMAND": "VERSION"}, input="{}", capture_output=True,
                                 text=True, timeout=30)  # the host's own glibc runs the installed bundle
        assert version.returncode == 0 and "supportedVersions" in version.stdout, version.stderr

        sid = _enrolled_pod(cri_env, cri, fake, "cart-0")
        sandboxes.append(sid)
        info = cri.status(sid)
        assert info.ready
        # the agent inside the container installed the seed's rules in the new pod's netns
        got = rules.normalise_save(_iptables_save(info.netns))
        assert got == goldens.read(goldens.SEED_SAVE, rules.normalise_save)
        # ... and handed the netns to the test's ZDS peer
        _, peer_log = peer
        wait_for(lambda: f'WorkloadUid("{cri.status(sid).uid}") received netns' in peer_log.read_text(), 20,
                 "the peer to receive the netns")

        # "DaemonSet deleted": the API says so, the container's SIGTERM uninstalls
        fake.lifecycle.delete_daemonset(DS, DS_NS)
        assert node.stop(cri) == 0
        messages = [e.get("msg") for e in node.log_lines()]
        assert "stop: uninstall" in messages, node.log_tail()
        assert tree_bytes(cri_env.conf_dir) == conf_before
        assert tree_bytes(cri_env.bin_dir) == bin_before
        assert not (node.dirs.run_dir / rundir.SNAPSHOT).exists()
    finally:
        for sid in sandboxes:
            _remove_sandbox(cri, sid)
        node.remove(cri)


def test_upgrade_keeps_the_chain_and_new_pods_fail_closed_until_the_next_container(
    cri_env: CriEnv, cri: NodeCri, fake: FakeKube, peer: tuple[subprocess.Popen[bytes], Path]
) -> None:
    old = _node_pod(cri_env, fake)
    new = _node_pod(cri_env, fake)
    sandboxes: list[str] = []
    try:
        old.start(cri)
        old.wait_ready(cri)
        conf, bins = tree_bytes(cri_env.conf_dir), tree_bytes(cri_env.bin_dir)
        assert old.stop(cri) == 0  # the DaemonSet still exists and targets the node: an upgrade
        assert "stop: keep" in [e.get("msg") for e in old.log_lines()], old.log_tail()
        assert tree_bytes(cri_env.conf_dir) == conf and tree_bytes(cri_env.bin_dir) == bins
        assert (old.dirs.run_dir / rundir.SNAPSHOT).exists()

        with pytest.raises(CriError) as refused:  # no agent: the enrolled pod must not start unredirected
            sandboxes.append(_enrolled_pod(cri_env, cri, fake, "cart-1"))
        assert "ambient-cni" in refused.value.details or "agent" in refused.value.details, refused.value.details

        new.start(cri)
        new.wait_ready(cri)
        sid = _enrolled_pod(cri_env, cri, fake, "cart-2")
        sandboxes.append(sid)
        assert rules.normalise_save(_iptables_save(cri.status(sid).netns)) == goldens.read(goldens.SEED_SAVE,
                                                                                           rules.normalise_save)
    finally:
        for sid in sandboxes:
            _remove_sandbox(cri, sid)
        fake.lifecycle.delete_daemonset(DS, DS_NS)  # leave the node clean
        new.remove(cri)
        old.remove(cri)
