"""The agent's ``kubernetes`` cluster view (official client, list+watch) against testbed/fakekube.

There is no kube-apiserver on this machine: ``testbed.fakekube.server.FakeKube`` stands in for it and speaks
list+watch as the real server does (resourceVersion, chunked watch streams, fieldSelector spec.nodeName,
410 Gone for compacted versions); see its docstring for what it does not cover. The agent is a real process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin import rundir, snapshot
from testbed.agent import AMBIENT, AgentProcess, call, request
from testbed.fakekube.server import FakeKube
from testbed.netns import Netns
from testbed.poll import wait_for


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = FakeKube().start()
    server.upsert_namespace("shop", AMBIENT)
    server.upsert_namespace("plain")
    server.upsert_pod("cart-0", "shop", "node-a", uid="uid-cart")
    server.upsert_pod("elsewhere-0", "shop", "node-b")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agent(scratch: Path, fake: FakeKube) -> Iterator[AgentProcess]:
    kubeconfig = scratch / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    proc = AgentProcess(scratch / "agent", kubeconfig=kubeconfig)
    proc.base.mkdir()
    try:
        yield proc.start()
    finally:
        proc.kill()


def _snap(agent: AgentProcess) -> snapshot.Snapshot:
    return snapshot.read(str(agent.run_dir / rundir.SNAPSHOT))


def test_list_then_watch_add_modify_delete(agent: AgentProcess, fake: FakeKube) -> None:
    snap = _snap(agent)
    assert snap.namespaces == {"plain": False, "shop": True}
    assert snap.pods == {"shop/cart-0": True}  # only this node's pods
    wait_for(lambda: fake.count("watch pods") >= 1 and fake.count("watch namespaces") >= 1, what="watches")

    fake.upsert_pod("web-0", "plain", "node-a", labels=AMBIENT)  # ADDED, pod-level opt-in
    wait_for(lambda: _snap(agent).pods.get("plain/web-0") is True, what="watch ADDED")
    fake.upsert_pod("cart-0", "shop", "node-a", labels={"istio.io/dataplane-mode": "none"})  # MODIFIED
    wait_for(lambda: _snap(agent).pods.get("shop/cart-0") is False, what="watch MODIFIED")
    fake.delete("pods", "web-0", "plain")  # DELETED
    wait_for(lambda: "plain/web-0" not in _snap(agent).pods, what="watch DELETED")
    fake.upsert_namespace("plain", AMBIENT)
    wait_for(lambda: _snap(agent).namespaces.get("plain") is True, what="namespace MODIFIED")
    fake.upsert_pod("other-0", "plain", "node-b")
    fake.upsert_namespace("shop")  # a later event proves other-0 was filtered, not merely slow
    wait_for(lambda: _snap(agent).namespaces.get("shop") is False, what="namespace label removed")
    assert "plain/other-0" not in _snap(agent).pods
    assert fake.count("list pods") == 1 and fake.count("list namespaces") == 1


def test_410_gone_relists(agent: AgentProcess, fake: FakeKube) -> None:
    wait_for(lambda: fake.count("watch pods") >= 1, what="pod watch")
    fake.hold_watches(True)
    fake.drop_watches()  # connection lost (API server restart)
    fake.upsert_pod("missed-0", "shop", "node-a")  # happens while the agent is not watching
    fake.compact()  # ... and its history is compacted away
    fake.hold_watches(False)
    wait_for(lambda: _snap(agent).pods.get("shop/missed-0") is True, timeout=20, what="re-list after 410")
    assert fake.count("list pods") >= 2
    assert any("410 Gone" in line.get("msg", "") for line in agent.log_lines())
    # the watch resumes from the re-list's version: later events still arrive
    fake.upsert_pod("after-0", "shop", "node-a")
    wait_for(lambda: "shop/after-0" in _snap(agent).pods, what="watch after re-list")


def test_add_waits_briefly_for_the_view_and_uses_it(agent: AgentProcess, fake: FakeKube, pod_netns: Netns) -> None:
    path = pod_netns.path
    reply = call(agent.sock, request("add", "cart-0", "shop", uid="uid-cart", netns=path))
    assert reply["enrolled"] is True
    fake.upsert_pod("optout-0", "shop", "node-a", labels={"istio.io/dataplane-mode": "none"})
    wait_for(lambda: "shop/optout-0" in _snap(agent).pods, what="optout in view")
    assert call(agent.sock, request("add", "optout-0", "shop", netns=path))["enrolled"] is False


def test_unreachable_api_server_is_not_ready(scratch: Path) -> None:
    kubeconfig = scratch / "kubeconfig"
    fake = FakeKube()  # never started; its port is closed at once: connections are refused
    port = fake.httpd.server_address[1]
    fake.httpd.server_close()
    kubeconfig.write_text(fake.kubeconfig().replace(fake.url, f"http://127.0.0.1:{port}"))
    agent = AgentProcess(scratch / "agent", kubeconfig=kubeconfig)
    agent.base.mkdir()
    try:
        agent.start(wait_ready=False)
        agent.wait_health_addr()
        wait_for(lambda: "cannot list" in agent.http("/readyz")[1], what="readyz reason")
        assert agent.http("/readyz")[0] == 503
        reply = call(agent.sock, request("status"))
        assert (reply["ok"], reply["code"]) == (False, 50)
        assert not (agent.run_dir / rundir.SNAPSHOT).exists()
    finally:
        agent.kill()
