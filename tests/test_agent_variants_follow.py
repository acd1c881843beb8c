"""A pod's redirection variant follows the pod, not only the moment it was enrolled.

The per-pod annotations (``ambient.istio.io/dns-capture``, ``ambient.istio.io/bypass-inbound-capture``,
``istio.io/reroute-virtual-interfaces``) are read again by every reconcile pass (50 ms after a view change, and
every ``--reconcile-interval``): when the variant they ask for differs from the installed one, the pod's rules are
rewritten under the DROP guardrails, the record is updated, the change is logged with the pod and counted.

Full chain (libcni driver -> frozen plugin -> agent ``--dataplane inpod --reconcile-interval 1`` with a file
cluster view -> the real ``zds_peer``), real netns, iptables and TCP. Each variant is compared with its golden
``iptables-save`` (tests/golden/dataplane/).
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent.dataplane import guardrails, rules
from nodeagent.dataplane.rules import Family
from testbed.agent import AgentProcess, write_state
from testbed.cluster import AMBIENT_NS, NAMESPACES, Cluster
from testbed.netns import Netns
from testbed.pods import TcpServer, as_pod, tcp_exchange
from testbed.poll import wait_for
from testbed.runners import run_driver

PORT = 8080
INTERVAL_S = 1.0  # AgentProcess runs the agent with --reconcile-interval 1
GOLDEN = Path(__file__).parent / "golden" / "dataplane"
DNS = {"ambient.istio.io/dns-capture": "true"}
NO_INBOUND = {"ambient.istio.io/bypass-inbound-capture": "true"}


def golden_ours(variant: str) -> list[str]:
    path = GOLDEN / "seed_iptables_save.txt" if variant == "tproxy" else GOLDEN / "variants" / f"{variant}_v4.save"
    return [line for line in rules.normalise_save(path.read_text()).splitlines() if "ISTIO" in line]


def is_variant(ns: Netns, variant: str) -> bool:
    """The pod's chains and jumps are exactly ``variant``'s golden ones, and no guardrails are left."""
    save = ns.iptables_save()
    ours = [line for line in rules.normalise_save(save).splitlines() if "ISTIO" in line]
    return ours == golden_ours(variant) and not guardrails.present(save)


def changes(agent: AgentProcess, phase: str = "periodic") -> float:
    return agent.metric("ambient_cni_agent_variant_changes_total", phase=phase)


def counted(agent: AgentProcess, count: int) -> bool:
    return changes(agent) == count


def set_annotations(chain: Cluster, name: str, annotations: dict[str, str]) -> None:
    for entry in chain.pods:
        if entry["name"] == name:
            entry["annotations"] = dict(annotations)
    write_state(chain.state_file, NAMESPACES, chain.pods)


def recorded_variant(agent: AgentProcess, name: str) -> dict[str, Any] | None:
    (record,) = [r for r in agent.records() if r["name"] == name]
    variant: dict[str, Any] | None = record["variant"]
    return variant


def test_annotations_changed_on_a_running_pod_change_its_rules(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    a_ns, a_uid = cluster.add_pod(netns_factory, "client")
    b_ns, b_uid = cluster.add_pod(netns_factory, "server")
    a, b = as_pod(a_ns, a_uid, "client"), as_pod(b_ns, b_uid, "server")
    agent, peer = cluster.agent, cluster.peer
    server = TcpServer(b, PORT)
    try:
        assert is_variant(b.ns, "tproxy")
        assert recorded_variant(agent, "server") == rules.DEFAULT_VARIANT.to_json()
        steps = [(DNS, "tproxy_dns", True), (NO_INBOUND, "tproxy_ingress", False), ({}, "tproxy", True)]
        for count, (annotations, variant, inbound_captured) in enumerate(steps, start=1):
            started = time.monotonic()
            set_annotations(cluster, "server", annotations)
            wait_for(functools.partial(is_variant, b.ns, variant), timeout=INTERVAL_S + 3, what=f"{variant} in place")
            took = time.monotonic() - started
            assert took <= INTERVAL_S + 1, f"{variant} after {took:.2f} s"
            wait_for(functools.partial(counted, agent, count), what="the change counted (right after the rewrite)")
            assert rules.Variant.from_json(recorded_variant(agent, "server") or {}).name == variant
            # real traffic: A leaves through its 15001; B's inbound capture is on or off as the variant says
            out_before, in_before = peer.port_count(a.uid, 15001), peer.port_count(b.uid, 15006)
            assert tcp_exchange(a, (b.ip, PORT), variant.encode()) == b"echo:" + variant.encode()
            wait_for(functools.partial(peer.port_count_is, a.uid, 15001, out_before + 1), what="through A's 15001")
            if inbound_captured:
                wait_for(functools.partial(peer.port_count_is, b.uid, 15006, in_before + 1), what="through B's 15006")
                assert server.seen[-1][0] == b.ip  # delivered by B's proxy from inside B
            else:
                assert server.seen[-1][0] == a.ip and peer.port_count(b.uid, 15006) == in_before
        lines = [ln for ln in agent.log_lines() if ln["msg"] == "redirection variant changed"]
        assert [(ln["pod_name"], ln["pod_uid"], ln["from"], ln["to"]) for ln in lines] == [
            ("server", b.uid, "tproxy", "tproxy_dns"), ("server", b.uid, "tproxy_dns", "tproxy_ingress"),
            ("server", b.uid, "tproxy_ingress", "tproxy")]
        assert is_variant(a.ns, "tproxy")  # the other pod is untouched

        # an annotation that cannot be honoured: the installed rules stay, one warning
        set_annotations(cluster, "server", {"istio.io/reroute-virtual-interfaces": "eth0 -j ACCEPT"})
        wait_for(lambda: any(ln["msg"].startswith("pod annotations cannot be honoured") for ln in agent.log_lines()),
                 timeout=INTERVAL_S + 3, what="the warning about the annotation")
        agent.wait_reconcile_passes(2)  # and more passes: still nothing changes, no second warning
        assert is_variant(b.ns, "tproxy") and changes(agent) == 3
        warned = [ln for ln in agent.log_lines() if ln["msg"].startswith("pod annotations cannot be honoured")]
        assert len(warned) == 1 and warned[0]["pod_name"] == "server"
    finally:
        server.close()


def test_an_add_that_raced_the_view_is_corrected(cluster: Cluster, netns_factory: Callable[..., Netns]) -> None:
    """The ADD arrives before the view has the pod: the namespace alone enrolls it, with the default rules. When the
    pod (with its annotation) reaches the view, its rules become the annotated variant."""
    ns = netns_factory("acdp")
    uid = str(uuid.uuid4())
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={AMBIENT_NS};K8S_POD_NAME=early;K8S_POD_UID={uid}"
    res = run_driver("add", cluster.conf_name, ns.path, container_id="c-early", cni_args=args, **cluster.common)
    assert res.code == 0, res.describe()
    pod_ns = ns
    assert is_variant(pod_ns, "tproxy")
    cluster.agent.wait_reconcile_passes(2)  # passes without the pod in the view keep its recorded variant
    assert is_variant(pod_ns, "tproxy") and [r["name"] for r in cluster.agent.records()] == ["early"]
    started = time.monotonic()
    cluster.pods.append({"name": "early", "namespace": AMBIENT_NS, "uid": uid, "nodeName": "node-a",
                         "annotations": dict(DNS)})
    write_state(cluster.state_file, NAMESPACES, cluster.pods)
    wait_for(lambda: is_variant(pod_ns, "tproxy_dns"), timeout=INTERVAL_S + 3, what="the annotated variant")
    assert time.monotonic() - started <= INTERVAL_S + 1
    wait_for(lambda: changes(cluster.agent) == 1, what="the change counted")
    assert rules.Variant.from_json(recorded_variant(cluster.agent, "early") or {}).name == "tproxy_dns"
    assert all(d.ok for d in rules.diff_rules(pod_ns.iptables_save(), Family.V4,
                                               variant=rules.Variant(dns_capture=True)))


def test_an_annotation_changed_while_the_agent_was_down_is_applied_at_start(
    cluster: Cluster, netns_factory: Callable[..., Netns]
) -> None:
    pod_ns, uid = cluster.add_pod(netns_factory, "web")
    agent = cluster.agent
    assert agent.stop() == 0
    set_annotations(cluster, "web", DNS)
    agent.start(wait_ready=False)
    agent.wait_ready(30)
    wait_for(lambda: is_variant(pod_ns, "tproxy_dns"), timeout=10, what="the annotated variant after the restart")
    wait_for(lambda: changes(agent, "restore") == 1, what="counted as a change at the take-over")
    assert rules.Variant.from_json(recorded_variant(agent, "web") or {}).name == "tproxy_dns"
    line = next(ln for ln in agent.log_lines() if ln["msg"] == "redirection variant changed")
    assert (line["pod_uid"], line["phase"], line["from"], line["to"]) == (uid, "restore", "tproxy", "tproxy_dns")
