"""The Kubernetes view with the inpod dataplane: per-pod annotations pick the pod's rule variant, and the agent
marks the pod ``ambient.istio.io/redirection: enabled`` once redirection is in place (removed on un-enroll).

There is no kube-apiserver here: ``testbed.fakekube.server.FakeKube`` stands in for it (list+watch, and PATCH
with the API server's merge-patch semantics and errors; see its docstring). The agent, the ZDS peer, the pod
and node netns and iptables are real; the node-side state goes to the test's node netns.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.agent import AMBIENT, AgentProcess, call, request
from testbed.fakekube.server import FakeKube
from testbed.netns import Netns
from testbed.peer import PeerProcess
from testbed.poll import wait_for

REDIRECTION = "ambient.istio.io/redirection"


def annotation(fake: FakeKube, name: str) -> str | None:
    pod = fake.pod("shop", name)
    return None if pod is None else (pod["metadata"].get("annotations") or {}).get(REDIRECTION)


def save(ns: Netns) -> str:
    return subprocess.run(["nsenter", f"--net={ns.path}", "iptables-save"], capture_output=True, text=True,
                          check=True).stdout


def metric(agent: AgentProcess, result: str) -> float:
    return agent.metric("ambient_cni_agent_annotation_patches_total", result=result)


@pytest.fixture
def env(netns_factory: Callable[..., Netns], scratch: Path) -> Iterator[dict[str, Any]]:
    fake = FakeKube().start()
    fake.upsert_namespace("shop", AMBIENT)
    fake.upsert_pod("plain-0", "shop", "node-a", uid="uid-plain")
    fake.upsert_pod("dns-0", "shop", "node-a", uid="uid-dns", annotations={"ambient.istio.io/dns-capture": "true"})
    fake.upsert_pod("ingress-0", "shop", "node-a", uid="uid-ingress",
                    annotations={"ambient.istio.io/bypass-inbound-capture": "true",
                                 "istio.io/reroute-virtual-interfaces": "vnet0, vnet1"})
    fake.upsert_pod("bad-0", "shop", "node-a", uid="uid-bad",
                    annotations={"istio.io/reroute-virtual-interfaces": "eth0 -j ACCEPT"})
    kubeconfig = scratch / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    node = netns_factory("acnode")
    base = Path(tempfile.mkdtemp(prefix="acdk"))
    zds = str(base / "zds.sock")
    agent = AgentProcess(base, kubeconfig=kubeconfig, extra_args=[
        "--dataplane", "inpod", "--zds-socket", zds, "--host-netns", node.path, "--dns-capture"])
    peer = None
    try:
        agent.start(wait_ready=False)
        peer = PeerProcess(zds, str(base))
        agent.wait_ready(30)
        yield {"fake": fake, "agent": agent, "node": node, "netns": netns_factory}
    finally:
        if peer is not None:
            peer.stop()
        agent.kill()
        fake.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def add(env: dict[str, Any], name: str, uid: str) -> tuple[dict[str, Any], Netns]:
    ns = env["netns"]("acpod")
    started = time.monotonic()
    reply = call(env["agent"].sock, request("add", name, "shop", uid=uid, netns=ns.path, container_id=f"c-{name}",
                                            ips=["10.60.0.9/24"]))
    assert time.monotonic() - started < 3.0
    return reply, ns


def test_annotations_pick_the_variant_and_the_pod_is_marked(env: dict[str, Any]) -> None:
    fake, agent = env["fake"], env["agent"]
    reply, plain = add(env, "plain-0", "uid-plain")
    assert reply["ok"] is True, reply
    assert "--to-ports 15053" in save(plain)  # the agent's --dns-capture default
    wait_for(lambda: annotation(fake, "plain-0") == "enabled", what="plain-0 marked enabled")
    assert fake.patches[-1] == ("shop", "plain-0", {"metadata": {"annotations": {REDIRECTION: "enabled"},
                                                                 "uid": "uid-plain"}})

    _, dns = add(env, "dns-0", "uid-dns")
    assert "--to-ports 15053" in save(dns) and "-j CT --zone 1" in save(dns)

    _, ingress = add(env, "ingress-0", "uid-ingress")
    rules = save(ingress)
    assert "-j TPROXY" not in rules and "-A ISTIO_PRERT -i vnet0 -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIO_PRERT -i vnet1 -p tcp -j RETURN" in rules

    # an annotation that is not an interface name never reaches iptables: the ADD is refused, clearly
    reply, bad = add(env, "bad-0", "uid-bad")
    assert reply["ok"] is False and reply["code"] == 101 and "invalid interface name" in reply["msg"]
    assert "ISTIO" not in save(bad)
    assert annotation(fake, "bad-0") is None

    # un-enroll: the annotation goes (DEL)
    call(agent.sock, request("del", "plain-0", "shop", uid="uid-plain", netns=plain.path, container_id="c-plain-0"))
    wait_for(lambda: annotation(fake, "plain-0") is None, what="annotation removed")
    assert fake.patches[-1] == ("shop", "plain-0", {"metadata": {"annotations": {REDIRECTION: None},
                                                                 "uid": "uid-plain"}})
    # the agent counts a patch once the API server's answer is back, just after the fake applied it
    wait_for(lambda: metric(agent, "ok") >= 4, what="four patches counted ok")


def test_failed_patches_never_fail_the_add_and_are_retried(env: dict[str, Any]) -> None:
    fake, agent = env["fake"], env["agent"]
    fake.fail_patches(3)
    reply, _ = add(env, "plain-0", "uid-plain")
    assert reply["ok"] is True and reply["enrolled"] is True
    wait_for(lambda: annotation(fake, "plain-0") == "enabled", timeout=15, what="patched after retries")
    wait_for(lambda: metric(agent, "ok") >= 1, what="the patch counted ok")
    assert metric(agent, "failed") == 3

    # the pod was deleted and re-created under the same name: the old instance's patch is refused by the
    # API server (the UID does not match) and dropped, the new pod is not marked
    fake.delete("pods", "dns-0", "shop")
    fake.upsert_pod("dns-0", "shop", "node-a", uid="uid-dns-new")
    reply, _ = add(env, "dns-0", "uid-dns")
    assert reply["ok"] is True
    wait_for(lambda: metric(agent, "gone") >= 1, what="stale patch dropped")
    assert annotation(fake, "dns-0") is None
