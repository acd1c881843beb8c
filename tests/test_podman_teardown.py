"""Nothing of a podman test stays on the machine: containers (running, refused, stopped), podman's storage,
networks and images, the containers' netns files, libcni's cache entries, the cgroups, the environment's netns
with every rule in it (also the firewall plugin's rules that a refused ADD leaks), and the machine-wide paths
podman creates outside ``--root``/``--runroot`` when they did not exist before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.podman import env as env_mod
from testbed.podman.config import TOOL_IMAGE
from testbed.podman.product import PRODUCT, Identity, Network, Node

pytestmark = [pytest.mark.podman, pytest.mark.timeout(300)]


def test_teardown_leaves_nothing_behind() -> None:
    if not PRODUCT.exists():
        pytest.fail(f"{PRODUCT} is missing: build it with `make build`", pytrace=False)
    alone = not any(env_mod._alive(e.owner_pid) for e in env_mod.load_all())
    machine_before = {p for p in env_mod.MACHINE_PATHS if os.path.lexists(p)}
    env = env_mod.up()
    try:
        net = Network.create(env)
        node = Node(env)
        net.install(node, "inplace")
        # no agent has ever run here: no enrollment snapshot, so an enrolled-looking pod is refused at once
        refused = env.run("--name", "refused", "--network", net.name, TOOL_IMAGE, "true",
                          cni_args=Identity("shop", "cart-9", "u-9").cni_args)
        assert refused.returncode != 0
        assert "ambient-cni: enrollment of pod shop/cart-9 is unknown" in refused.stderr, refused.stderr
        save = env.netns_exec("iptables-save", "-t", "filter").stdout
        leaked = [line for line in save.splitlines() if line.startswith("-A CNI-FORWARD") and net.prefix in line]
        assert leaked, save
        running = env.run("-d", "--name", "running", "--network", net.name, TOOL_IMAGE, "pause")
        assert running.returncode == 0, running.stderr
        sandbox = env.sandbox("running")
        assert Path(sandbox).exists()
        stopped = env.run("--name", "stopped", "--network", net.name, TOOL_IMAGE, "true")
        assert stopped.returncode == 0, stopped.stderr
    finally:
        problems = env_mod.down(env)
    assert problems == []
    assert env_mod.leftovers(env) == []
    assert not Path(env.netns_path).exists() and not Path(sandbox).exists()
    if alone:
        assert {p for p in env_mod.MACHINE_PATHS if os.path.lexists(p)} == machine_before
        assert not env_mod.STATE_DIR.exists()
