"""ambient-cni under podman 4.3 with its CNI backend: a network made by ``podman network create``, chained by our
installer in both modes, containers that are not Kubernetes pods.

Real parts only: podman, conmon, runc, libcni inside podman, the reference plugins (bridge, host-local,
portmap, firewall, tuning), the frozen ``dist/ambient-cni`` installed by ``ambient-cni install``. podman runs
inside a network namespace of the test's own (``testbed/podman/env.py``): the bridge and every firewall rule land
there, never in the machine's netns. What the plugin read and printed is recorded by a wrapper in podman's CNI
plugin dir (``testbed/podman/product.py``); what podman kept is libcni's own cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import rundir
from testbed.podman import env as env_mod
from testbed.podman.config import TOOL_IMAGE
from testbed.podman.env import PodmanEnv
from testbed.podman.product import PRODUCT, Network, Node, install_recorder, recorded, remove_recorder

pytestmark = [pytest.mark.podman, pytest.mark.timeout(300)]

SAME_NAME_WARNING = "has the same network name as"
_VETH = re.compile(r"^veth[0-9a-f]{8}$")


@pytest.fixture(scope="module")
def pm_env() -> Iterator[PodmanEnv]:
    if not PRODUCT.exists():
        pytest.fail(f"{PRODUCT} is missing: build it with `make build`", pytrace=False)
    with env_mod.checked() as env:
        yield env


@pytest.fixture
def node(pm_env: PodmanEnv) -> Iterator[Node]:
    """The product's paths on the environment; containers that are not Kubernetes pods never need the agent."""
    n = Node(pm_env)
    try:
        yield n
    finally:
        n.close()


def _masked(result: dict[str, Any]) -> dict[str, Any]:
    """A chain result without what differs between any two attachments: the host veth's name and MAC."""
    out = json.loads(json.dumps(result))
    for iface in out.get("interfaces", []):
        if _VETH.match(iface.get("name", "")):
            iface["name"] = "veth*"
            iface.pop("mac", None)
        if "sandbox" in iface:
            iface["sandbox"] = "<netns>"
    return out


def _addresses(env: PodmanEnv, name: str) -> str:
    return env.podman("exec", name, "/t", "ip", check=True).stdout


@pytest.mark.parametrize("mode", ["inplace", "owned"])
def test_container_through_the_chained_network(pm_env: PodmanEnv, node: Node, mode: str, tmp_path: Path) -> None:
    """The container gets its address from the network; the plugin's ADD output equals the chain's output
    without it (exactly: what it was given, and what the same chain without ambient-cni gives an identical
    container); DEL runs on stop and on the exit of a ``--rm`` container; uninstall restores podman's file."""
    env = pm_env
    net = Network.create(env)
    podman_bytes = net.conflist.read_bytes()
    net.install(node, mode)
    assert net.chained_plugins() == ["bridge", "portmap", "firewall", "tuning", "ambient-cni"]
    if mode == "inplace":
        assert json.loads(net.conflist.read_text())["plugins"][-1]["type"] == "ambient-cni"
    else:
        assert net.conflist.read_bytes() == podman_bytes  # podman's file untouched; ours shadows it by name
    real = install_recorder(env.bin_dir, tmp_path / "calls")
    ip, mac = net.prefix + "50", "02:ac:00:00:00:50"
    try:
        started = env.run("-d", "--name", f"plain-{mode}", "--network", net.name, "--ip", ip, "--mac-address", mac,
                          TOOL_IMAGE, "pause")
        assert started.returncode == 0, started.stderr
        assert (SAME_NAME_WARNING in started.stderr) == (mode == "owned"), started.stderr
        cid = started.stdout.strip()
        assert f"eth0 inet {ip}\n" in _addresses(env, f"plain-{mode}")

        (add,) = [c for c in recorded(tmp_path / "calls", cid) if c.command == "ADD"]
        given = add.stdin_json()
        # podman's own CNI_ARGS: the container name as K8S_POD_NAME, the static MAC/IP, no namespace
        assert add.env["CNI_ARGS"] == f"IgnoreUnknown=1;K8S_POD_NAME=plain-{mode};MAC={mac};IP={ip}"
        assert add.stdout_json() == given["prevResult"], "the plugin changed the chain's result"
        assert json.dumps(add.stdout_json()) == json.dumps(given["prevResult"]), "key order changed"
        cached = env.cni_cache_entry(net.name, cid)
        assert cached["result"] == add.stdout_json(), "podman kept something else than the plugin printed"
        assert cached["result"]["ips"][0]["address"] == f"{ip}/24"
        assert '"not enrolled: not a Kubernetes pod' in (node.run_dir / rundir.PLUGIN_LOG).read_text()

        assert env.podman("stop", "-t", "1", f"plain-{mode}").returncode == 0
        dels = [c for c in recorded(tmp_path / "calls", cid) if c.command == "DEL"]
        assert len(dels) == 1 and dels[0].stdout == b""
        assert dels[0].stdin_json()["prevResult"] == cached["result"]  # DEL carries the cached result
        assert env.podman("rm", f"plain-{mode}").returncode == 0

        # the same container on the same network without ambient-cni: the chain's output is the same
        base = env.run("-d", "--name", f"base-{mode}", "--network", net.name, "--ip", ip, "--mac-address", mac,
                       TOOL_IMAGE, "pause", conf_dir=env.layout.baseline_conf_dir)
        assert base.returncode == 0, base.stderr
        base_cid = base.stdout.strip()
        assert recorded(tmp_path / "calls", base_cid) == []
        assert _masked(env.cni_cache_entry(net.name, base_cid)["result"]) == _masked(cached["result"])
        assert env.podman("rm", "-f", "-t", "0", f"base-{mode}", conf_dir=env.layout.baseline_conf_dir).returncode == 0

        # --rm: ADD, then DEL when the container exits (from podman's cleanup process)
        once = env.run("--rm", "--network", net.name, TOOL_IMAGE, "ip")
        assert once.returncode == 0 and f"eth0 inet {net.prefix}" in once.stdout, once.stderr
        commands = [c.command for c in recorded(tmp_path / "calls")
                    if c.command != "VERSION" and c.container_id not in (cid, base_cid)]
        assert commands == ["ADD", "DEL"]
        assert not list((Path("/var/lib/cni/results")).glob(f"{net.name}-*"))
    finally:
        remove_recorder(env.bin_dir, real)
        uninstalled = net.uninstall(node)
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert net.conflist.read_bytes() == podman_bytes
    assert sorted(p.name for p in env.conf_dir.glob("*.conflist")) == [net.conflist.name]
    assert not (env.bin_dir / "ambient-cni").exists()
    assert env.podman("network", "rm", net.name).returncode == 0


def test_owned_mode_network_rm_deletes_our_file_not_podmans(pm_env: PodmanEnv, node: Node) -> None:
    """Why podman users should pick inplace: podman looks networks up by name and, in owned mode, loads the
    network from our first-sorting copy, so ``podman network rm`` deletes *our* file and the network lives on
    from podman's own file, now without ambient-cni. In inplace mode the network and our entry go together."""
    env = pm_env
    owned = Network.create(env)
    owned.install(node, "owned")
    assert env.podman("network", "rm", owned.name).returncode == 0
    assert not (env.conf_dir / "00-ambient-cni.conflist").exists()
    assert owned.conflist.exists()
    assert owned.chained_plugins() == ["bridge", "portmap", "firewall", "tuning"]
    assert env.podman("network", "exists", owned.name).returncode == 0
    owned.uninstall(node)
    assert env.podman("network", "rm", owned.name).returncode == 0

    inplace = Network.create(env)
    inplace.install(node, "inplace")
    assert env.podman("network", "rm", inplace.name).returncode == 0
    assert env.podman("network", "exists", inplace.name).returncode != 0
    assert list(env.conf_dir.glob("*.conflist")) == []
    inplace.uninstall(node)


def test_missing_plugin_hides_the_network(pm_env: PodmanEnv, node: Node) -> None:
    """podman runs VERSION on every plugin of every conflist it loads; without the binary the network is hidden
    (fail closed: no container starts on it without ambient-cni)."""
    env = pm_env
    net = Network.create(env)
    net.install(node, "inplace")
    try:
        target = (env.bin_dir / "ambient-cni").resolve()
        (env.bin_dir / "ambient-cni").unlink()
        res = env.run("--rm", "--network", net.name, TOOL_IMAGE, "true")
        assert res.returncode != 0
        assert f"unable to find network with name or ID {net.name}" in res.stderr, res.stderr
        assert 'failed to find plugin \\"ambient-cni\\"' in res.stderr, res.stderr
        (env.bin_dir / "ambient-cni").symlink_to(target.relative_to(env.bin_dir))
        assert env.run("--rm", "--network", net.name, TOOL_IMAGE, "true").returncode == 0
    finally:
        net.uninstall(node)
        env.podman("network", "rm", net.name)
