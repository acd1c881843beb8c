"""Enrolled containers under podman 4.3 (CNI backend): the Kubernetes identity comes from the caller's CNI_ARGS
(podman appends them to its own), the node agent (file cluster view, in-pod dataplane) and a ztunnel-compatible
ZDS peer are up, and our installer chained ambient-cni into a network made by ``podman network create``.

Real parts: podman, conmon, runc, the reference plugins, the frozen plugin, the agent process, iptables in
the containers' netns, the peer's listeners inside them, TCP between two containers' own processes (the static
tool image's ``serve``/``connect``). podman and its bridge live in the test's own netns; traffic only flows
between the containers' addresses. Stand-ins (docs/testing.md): the cluster view (no kube-apiserver here): the
agent reads a cluster-state file holding the same namespaces and pods an informer would deliver; the ZDS peer as
ztunnel.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cni_plugin import rundir
from nodeagent.dataplane.rules import normalise_save
from testbed.podman import env as env_mod
from testbed.podman.config import TOOL_IMAGE
from testbed.podman.env import PodmanEnv
from testbed.podman.product import ENROLLED_NS_LABELS, PRODUCT, Identity, Network, Node
from testbed.poll import wait_for
from tests import goldens

pytestmark = [pytest.mark.podman, pytest.mark.timeout(300)]

PORT = "8080"
DEADLINE_MS = "1500"  # the plugin's bound on an agent round trip: keeps the agent-down cases short
CLIENT = Identity("shop", "cart-0", "6f1c0000-0000-4000-8000-000000000001")
SERVER = Identity("shop", "cart-1", "6f1c0000-0000-4000-8000-000000000002")
LATE = Identity("shop", "cart-2", "6f1c0000-0000-4000-8000-000000000003")
FRONT = Identity("web", "front-0", "6f1c0000-0000-4000-8000-000000000004")
POD = Identity("shop", "cart-3", "6f1c0000-0000-4000-8000-000000000005")


@dataclass
class Mesh:
    env: PodmanEnv
    net: Network
    node: Node

    def ip(self, name: str) -> str:
        return self.env.container_ip(name, self.net.name)

    def assert_redirected(self, name: str, identity: Identity) -> dict[str, Any]:
        """The seed's rules in the container's netns and the agent's record of this container there."""
        assert normalise_save(self.env.iptables_save(name)) == goldens.read(goldens.SEED_SAVE, normalise_save)
        info = self.env.inspect(name)
        records = [r for r in self.node.debug_pods() if r["container_id"] == info["Id"]]
        assert len(records) == 1, self.node.debug_pods()
        record = records[0]
        assert (record["namespace"], record["name"], record["uid"]) == (identity.namespace, identity.name,
                                                                       identity.uid)
        assert record["netns_path"] == info["NetworkSettings"]["SandboxKey"]
        return record

    def peer_stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.node.peer_stats.read_text()))
        except (OSError, ValueError):
            return {}

    def peer_pod(self, identity: Identity) -> dict[str, Any]:
        """What the ZDS peer knows of the pod (listening, per-port connection counts)."""
        return dict(self.peer_stats().get("pods", {}).get(identity.uid, {}))

    def port_count(self, identity: Identity, port: int) -> int:
        return int(self.peer_pod(identity).get("ports", {}).get(str(port), 0))

    def exchange(self, payload: str) -> str:
        """``client`` connects to ``server``'s address from its own process; returns what came back."""
        res = self.env.podman("exec", "client", "/t", "connect", self.ip("server"), PORT, payload)
        assert res.returncode == 0, f"exit {res.returncode}: {res.stdout} {res.stderr}"
        return res.stdout.strip()

    def assert_through_the_proxy(self, payload: str) -> None:
        """One exchange client -> server that leaves through the client's 15001 and enters the server's 15006."""
        out_before, in_before = self.port_count(CLIENT, 15001), self.port_count(SERVER, 15006)
        assert self.exchange(payload) == f"echo:{payload}"
        wait_for(lambda: self.port_count(CLIENT, 15001) == out_before + 1
                 and self.port_count(SERVER, 15006) == in_before + 1, what="the peer's counters")
        # the server saw the proxy's connection made inside its own netns, not the client's address
        assert self.server_log()[-1] == f"from {self.ip('server')}"

    def server_log(self) -> list[str]:
        out = self.env.podman("logs", "server", check=True).stdout
        return [line for line in out.splitlines() if line.startswith("from ")]

    def plugin_log(self) -> list[dict[str, Any]]:
        lines = []
        for line in (self.node.run_dir / rundir.PLUGIN_LOG).read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    if not PRODUCT.exists():
        pytest.fail(f"{PRODUCT} is missing: build it with `make build`", pytrace=False)
    with env_mod.checked() as env:
        net = Network.create(env)
        node = Node(env, dataplane="inpod", namespaces={"shop": dict(ENROLLED_NS_LABELS), "web": {}},
                    pods=[i.state_entry() for i in (CLIENT, SERVER, LATE, FRONT, POD)],
                    agent_args=["--reconcile-interval", "1"])
        try:
            node.write_cluster_state()
            node.start_agent(wait_ready=False)
            node.start_peer()
            net.install(node, "inplace", "--deadline-ms", DEADLINE_MS)
            yield Mesh(env, net, node)
        finally:
            env.podman("pod", "rm", "-af", "-t", "0")
            env.podman("rm", "-af", "-t", "0")
            node.close()
            net.uninstall(node)


@pytest.fixture(scope="module")
def pair(mesh: Mesh) -> Mesh:
    """Two enrolled containers: ``server`` (TCP echo on 8080) and ``client`` (paused; traffic from exec)."""
    env, net = mesh.env, mesh.net
    for name, identity, cmd in (("server", SERVER, ("serve", PORT)), ("client", CLIENT, ("pause",))):
        res = env.run("-d", "--name", name, "--network", net.name, TOOL_IMAGE, *cmd, cni_args=identity.cni_args)
        assert res.returncode == 0, res.stderr
    wait_for(lambda: "listening" in env.podman("logs", "server").stdout, what="the server to listen")
    return mesh


def test_enrolled_containers_talk_only_through_the_proxy(pair: Mesh) -> None:
    mesh = pair
    for name, identity in (("client", CLIENT), ("server", SERVER)):
        assert mesh.ip(name).startswith(mesh.net.prefix)
        mesh.assert_redirected(name, identity)
    # podman's own CNI_ARGS plus the caller's: the caller's K8S_POD_NAME (last) wins
    cached = mesh.env.cni_cache_entry(mesh.net.name, mesh.env.inspect("client")["Id"])
    assert ["K8S_POD_NAME", "client"] in cached["cniArgs"] and ["K8S_POD_NAMESPACE", "shop"] in cached["cniArgs"]
    mesh.assert_through_the_proxy("hello")
    doctor = mesh.node.doctor("--pod", CLIENT.ref)
    assert doctor.returncode == 0 and "all checks passed" in doctor.stdout, doctor.stdout + doctor.stderr
    doctor = mesh.node.doctor("--netns", mesh.env.sandbox("server"))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr


def test_a_container_outside_the_mesh_is_left_alone(pair: Mesh) -> None:
    """A namespace that is not enrolled: no rules, no record; its traffic into an enrolled container is still
    captured by that container's inbound rules."""
    mesh = pair
    res = mesh.env.run("--rm", "--network", mesh.net.name, TOOL_IMAGE, "connect", mesh.ip("server"), PORT, "plain",
                       cni_args=FRONT.cni_args)
    assert res.returncode == 0 and res.stdout.strip() == "echo:plain", res.stderr
    assert all(r["name"] != FRONT.name for r in mesh.node.debug_pods())
    assert [line["msg"] for line in mesh.plugin_log() if line.get("pod") == FRONT.ref][-1] == (
        "not enrolled (agent snapshot)")


def test_reload_restart_and_start_keep_the_container_redirected(pair: Mesh) -> None:
    """``network reload``, ``restart`` and ``stop``+``start`` run DEL then ADD; the new ADD carries only the
    caller's CNI_ARGS (none here). The plugin finds the identity remembered for the container id, so the agent
    puts the rules back (in the new netns after a restart) and traffic still goes through the proxy."""
    mesh, env = pair, pair.env
    cid = env.inspect("client")["Id"]
    inherited_before = _inherited(mesh, cid)
    steps: list[tuple[str, ...]] = [
        ("network", "reload", "client"),
        ("restart", "-t", "1", "client"),
        ("stop", "-t", "1", "client"),
        ("start", "client"),
        ("network", "reload", "--all"),
    ]
    for step in steps:
        res = env.podman(*step)
        assert res.returncode == 0, f"podman {' '.join(step)}: {res.stderr}"
        if step[0] == "stop":
            assert all(r["container_id"] != cid for r in mesh.node.debug_pods()), "DEL removed the record"
            continue
        mesh.assert_redirected("client", CLIENT)
        mesh.assert_through_the_proxy("-".join(step[:2]))
    assert _inherited(mesh, cid) - inherited_before == 4  # reload, restart, start, reload --all (client)
    mesh.assert_redirected("server", SERVER)  # reload --all re-added it too


def _forward_rules(env: PodmanEnv) -> set[str]:
    """The firewall plugin's per-container rules in the environment's netns."""
    save = env.netns_exec("iptables-save", "-t", "filter").stdout
    return {line for line in save.splitlines()
            if line.startswith("-A CNI-FORWARD") and (" -d " in line or " -s " in line)}


def _inherited(mesh: Mesh, container_id: str) -> int:
    return sum(1 for line in mesh.plugin_log()
               if line.get("cmd") == "ADD" and line.get("container") == container_id[:12]
               and line.get("msg", "").startswith("no Kubernetes identity in CNI_ARGS"))


def test_agent_down_refuses_enrolled_containers(pair: Mesh) -> None:
    """With the agent down an enrolled container does not start: podman reports the plugin's code-11 message.
    A reload of a running enrolled container fails and leaves it without its interface (nothing escapes).
    Containers outside the mesh still start. Once the agent is back, ``podman start`` (no CNI_ARGS) starts the
    refused container enrolled, and a reload restores the other one."""
    mesh, env, node = pair, pair.env, pair.node
    replays_before = mesh.peer_stats().get("replays", 0)
    node.stop_agent()
    forward_before = _forward_rules(env)
    try:
        res = env.run("--name", "late", "--network", mesh.net.name, TOOL_IMAGE, "pause", cni_args=LATE.cni_args)
        assert res.returncode == 127, res.stderr  # podman's exit code for a failed network setup on run
        assert (f'plugin type="ambient-cni" failed (add): cni plugin ambient-cni failed: ambient-cni: pod '
                f"{LATE.ref} is enrolled in the ambient mesh but the node agent is unreachable") in res.stderr, (
            res.stderr)
        assert env.inspect("late")["State"]["Status"] != "running"
        late_id = env.inspect("late")["Id"]
        failures = [line for line in mesh.plugin_log()
                    if line.get("container") == late_id[:12] and line.get("msg") == "command failed"]
        assert [line["code"] for line in failures] == [11]
        # what libcni leaks for a refused ADD (the firewall plugin's accept rules: the DEL that follows has no
        # prevResult) stays in the environment's netns, which down() deletes
        leaked = _forward_rules(env) - forward_before
        assert leaked and all(mesh.net.prefix in rule for rule in leaked), leaked

        front = env.run("--rm", "--network", mesh.net.name, TOOL_IMAGE, "true", cni_args=FRONT.cni_args)
        assert front.returncode == 0, front.stderr

        reload = env.podman("network", "reload", "client")
        assert reload.returncode != 0 and "node agent is unreachable" in reload.stderr, reload.stderr
        assert "eth0" not in env.podman("exec", "client", "/t", "ip", check=True).stdout
        assert env.podman("exec", "client", "/t", "connect", mesh.ip("server"), PORT, "x").returncode != 0
    finally:
        node.start_agent()
    node.wait_ready()
    # the restarted agent hands the server (recorded by its previous run) to the reconnected peer again on its
    # next reconcile pass
    wait_for(lambda: mesh.peer_stats().get("replays", 0) > replays_before
             and mesh.peer_pod(SERVER).get("listening") is True, timeout=30, what="the server restored")
    started = env.podman("start", "late")
    assert started.returncode == 0, started.stderr
    mesh.assert_redirected("late", LATE)
    assert env.podman("network", "reload", "client").returncode == 0
    mesh.assert_redirected("client", CLIENT)
    mesh.assert_through_the_proxy("back")
    assert env.podman("rm", "-f", "-t", "0", "late").returncode == 0
    wait_for(lambda: all(r["name"] != LATE.name for r in node.debug_pods()), what="late's DEL")


def test_podman_pod_is_enrolled_and_stays_so_across_restart(pair: Mesh) -> None:
    """A podman pod: its infra container carries the network (and the ADD); the pod's containers share that
    netns, rules included. ``pod restart`` without CNI_ARGS re-adds the infra container with its identity."""
    mesh, env = pair, pair.env
    created = env.podman("pod", "create", "--name", "shop-pod", f"--cgroup-parent={env.cgroup_parent}",
                         "--network", mesh.net.name)
    assert created.returncode == 0, created.stderr
    infra = env.podman("pod", "inspect", "shop-pod", "--format", "{{.InfraContainerID}}", check=True).stdout.strip()
    for step in (("pod", "start", "shop-pod"), ("pod", "restart", "shop-pod")):
        res = env.podman(*step, cni_args=POD.cni_args if step[1] == "start" else None)
        assert res.returncode == 0, res.stderr
        mesh.assert_redirected(infra, POD)
    app = env.podman("run", "-d", "--pod", "shop-pod", "--name", "pod-app", TOOL_IMAGE, "pause")
    assert app.returncode == 0, app.stderr
    app_pid = env.inspect("pod-app")["State"]["Pid"]
    assert os.stat(f"/proc/{app_pid}/ns/net").st_ino == os.stat(env.sandbox(infra)).st_ino  # the pod's netns
    inside = env.podman("exec", "pod-app", "/t", "connect", mesh.ip("server"), PORT, "from-pod")
    assert inside.returncode == 0 and inside.stdout.strip() == "echo:from-pod", inside.stderr
    assert mesh.port_count(POD, 15001) >= 1, "the pod's container left through the pod's 15001"
    assert env.podman("pod", "rm", "-f", "-t", "0", "shop-pod").returncode == 0
