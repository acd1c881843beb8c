"""``ambient-cni node`` (the frozen product) end to end on temp CNI dirs: readiness = chain valid AND agent
ready, the taint removed once ready, JSON-lines logs on stderr, and SIGTERM: keep everything for an upgrade,
uninstall (config first, binary last) when the DaemonSet is gone.

There is no kube-apiserver on this machine: ``testbed.fakekube`` is a fake that stands in for it (list+watch of
namespaces and pods for the agent's view; DaemonSet and Node for the lifecycle)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin import rundir
from testbed.fakekube.server import FakeKube
from testbed.node_proc import CLEAN_ENV, PRIMARY_NAME, NodeProc, tree_bytes
from testbed.paths import PLUGIN
from testbed.poll import wait_for

pytestmark = pytest.mark.timeout(180)
NOT_READY = {"key": "cni.istio.io/not-ready", "value": "true", "effect": "NoSchedule"}
DS, NS = "ambient-cni-node", "istio-system"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube().start()
    server.upsert_namespace("shop", {"istio.io/dataplane-mode": "ambient"})
    server.lifecycle.upsert_daemonset(DS, NS)
    server.lifecycle.upsert_node("node-a", taints=[NOT_READY])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def node(scratch: Path, fake: FakeKube, plugin_binary: Path) -> Iterator[NodeProc]:
    kubeconfig = scratch / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    proc = NodeProc(scratch, args=["--kubeconfig", str(kubeconfig)])
    proc.prepare()
    try:
        yield proc
    finally:
        proc.kill()


def test_ready_untaints_and_an_upgrade_stop_keeps_everything(node: NodeProc, fake: FakeKube) -> None:
    before = tree_bytes(node.conf_dir)
    node.start()
    node.wait_http("/readyz")
    assert node.http("/healthz")[0] == 200
    wait_for(lambda: fake.lifecycle.node("node-a")["spec"].get("taints") == [], 15, "the taint to go")  # type: ignore[index]
    (patch,) = fake.lifecycle.node_patches
    assert [op["op"] for op in patch] == ["test", "replace"]
    conf = tree_bytes(node.conf_dir)
    assert set(conf) == {PRIMARY_NAME, "00-ambient-cni.conflist"} and conf[PRIMARY_NAME] == before[PRIMARY_NAME]
    chain = json.loads(conf["00-ambient-cni.conflist"])
    assert chain["plugins"][-1]["type"] == "ambient-cni"
    assert chain["plugins"][-1]["run_dir"] == str(node.run_dir)
    bins = tree_bytes(node.bin_dir)
    snapshot = node.run_dir / rundir.SNAPSHOT
    assert snapshot.exists() and (node.run_dir / rundir.INSTALL_READY).exists()

    assert node.stop() == 0
    assert tree_bytes(node.conf_dir) == conf  # chain stays
    assert tree_bytes(node.bin_dir) == bins  # binary stays
    assert snapshot.exists()  # snapshot stays: enrolled pods keep failing closed until the next agent
    assert not (node.run_dir / rundir.INSTALL_READY).exists()
    messages = node.messages()  # every stderr line is JSON
    assert "stop: keep" in messages and "uninstall: CNI config removed" not in messages
    (entry,) = [e for e in node.log() if e["msg"] == "stop: keep"]
    assert "targets this node" in entry["reason"]
    scopes = {e.get("scope") for e in node.log()}
    assert {"node", "install", "agent"} <= scopes, scopes


def test_a_deleted_daemonset_uninstalls_config_first_binary_last(node: NodeProc, fake: FakeKube) -> None:
    conf_before, bin_before = tree_bytes(node.conf_dir), tree_bytes(node.bin_dir)
    node.start()
    node.wait_http("/readyz")
    assert tree_bytes(node.bin_dir) != bin_before
    fake.lifecycle.delete_daemonset(DS, NS)
    assert node.stop() == 0
    assert tree_bytes(node.conf_dir) == conf_before  # the original bytes, nothing of ours left
    assert tree_bytes(node.bin_dir) == bin_before
    assert not (node.run_dir / rundir.SNAPSHOT).exists()
    messages = node.messages()
    order = [messages.index(m) for m in ("stop: uninstall", "uninstall: CNI config removed",
                                         "uninstall: node-side probe path removed",
                                         "uninstall: enrollment snapshot removed", "uninstall: plugin binary removed")]
    assert order == sorted(order), messages


def test_unauthorized_uninstalls_and_other_errors_keep(node: NodeProc, fake: FakeKube) -> None:
    node.start()
    node.wait_http("/readyz")
    fake.lifecycle.fail(403)  # RBAC gone but the service account lives: cannot tell -> keep
    assert node.stop() == 0
    assert (node.conf_dir / "00-ambient-cni.conflist").exists() and (node.bin_dir / "ambient-cni").is_symlink()
    fake.lifecycle.fail(None)
    node.proc = None
    node.start()
    node.wait_http("/readyz")
    fake.lifecycle.fail(401)  # the service account was deleted with the rest of the deployment
    assert node.stop() == 0
    assert not (node.conf_dir / "00-ambient-cni.conflist").exists()
    assert not (node.bin_dir / "ambient-cni").exists()


def test_readyz_waits_for_a_valid_chain(scratch: Path, fake: FakeKube, plugin_binary: Path) -> None:
    kubeconfig = scratch / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    node = NodeProc(scratch, args=["--kubeconfig", str(kubeconfig), "--uninstall-on-stop", "never"])
    node.prepare(primary=False)  # no primary CNI config yet: nothing to chain
    try:
        node.start()
        # the agent gets ready (view synced, snapshot, socket) but /readyz stays 503 for the chain
        wait_for(lambda: "CNI chain not installed" in node.wait_http("/readyz", status=503), 15, "the chain's reason")
        body = node.wait_http("/readyz", status=503)
        assert "waiting for a primary" in body, body
        assert node.http("/healthz")[0] == 200
        assert fake.lifecycle.node("node-a")["spec"]["taints"] == [NOT_READY]  # type: ignore[index]
        (node.conf_dir / PRIMARY_NAME).write_bytes((Path(__file__).parent / "fixtures" / "conflists" /
                                                    "containerd__10-containerd-net.conflist").read_bytes())
        node.wait_http("/readyz")
        wait_for(lambda: fake.lifecycle.node("node-a")["spec"].get("taints") == [], 15, "the taint to go")  # type: ignore[index]
        assert node.stop() == 0
        assert (node.conf_dir / "00-ambient-cni.conflist").exists()  # never: kept
    finally:
        node.kill()


def test_no_api_at_all_with_a_file_view(scratch: Path, plugin_binary: Path) -> None:
    state = scratch / "cluster.yaml"
    state.write_text("namespaces: [{name: shop, labels: {istio.io/dataplane-mode: ambient}}]\npods: []\n")
    node = NodeProc(scratch, args=["--cluster-state", str(state), "--node-taint", "", "--uninstall-on-stop",
                                   "always"])
    node.prepare()
    conf_before = tree_bytes(node.conf_dir)
    try:
        node.start()
        node.wait_http("/readyz")
        assert node.stop() == 0
        assert tree_bytes(node.conf_dir) == conf_before and tree_bytes(node.bin_dir) == {}
    finally:
        node.kill()
    # auto needs the API: without --kubeconfig and outside a pod that is a clear usage error, not a traceback
    res = subprocess.run([str(PLUGIN), "node", "--cluster-state", str(state), "--conf-dir", str(node.conf_dir),
                          "--bin-dir", str(node.bin_dir)], capture_output=True, text=True, timeout=60, env=CLEAN_ENV)
    assert res.returncode == 2, res.stderr
    assert "need the Kubernetes API" in res.stderr and "Traceback" not in res.stderr


def test_a_refused_list_is_not_an_empty_view(node: NodeProc, fake: FakeKube) -> None:
    """401/403/5xx on the namespace/pod lists must keep the agent unready, never read as 'nothing enrolled'."""
    fake.lifecycle.fail(403)
    node.start("--uninstall-on-stop", "never")
    wait_for(lambda: "cannot list" in node.wait_http("/readyz", status=503), 15, "the view's reason")
    assert not (node.run_dir / rundir.SNAPSHOT).exists()  # no snapshot from a view that never synced
    fake.lifecycle.fail(None)
    node.wait_http("/readyz")
    assert node.stop() == 0
