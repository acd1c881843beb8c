"""Shared fixtures: real network namespaces, temp CNI dirs, the frozen plugin and the libcni driver.

Everything a fixture creates (netns, temp dirs) is removed in a ``finally``, also when the test fails.
Fixtures that need build outputs fail (never skip) with the command that builds them.

Network safety: the node-side probe path (``ISTIO_POSTRT``, the ``istio-inpod-probes-*`` sets) must only ever be
created in a netns a test made. Every test ends by checking this machine's own netns for it (read only: one
netlink dump of the ipset list) and the session checks the nat table too; either fails loudly.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import netns as netns_mod
from testbed.cni import make_bin_dir
from testbed.netns import Netns
from testbed.paths import MissingBuildOutput, require_driver, require_plugin
from tests.plugin_fixtures import FakeAgent

# Fixture modules of their own (pytest registers their fixtures for every test; nothing imports them).
pytest_plugins = ["tests.dataplane_fixtures"]


def _machine_probe_sets() -> list[str] | None:
    """Names of probe sets in this machine's own netns (the test process's); None without the rights to list
    them (a non-root run of the pure tests, which cannot create any either)."""
    from pyroute2 import IPSet

    try:
        with IPSet() as ipset:
            names = [str(m.get_attr("IPSET_ATTR_SETNAME")) for m in ipset.list()]
    except Exception as exc:  # pyroute2 raises its own error types; only "not permitted" means "cannot know"
        if getattr(exc, "code", None) in (errno.EPERM, errno.EACCES) or isinstance(exc, PermissionError):
            return None
        raise
    return sorted(n for n in names if n.startswith("istio-inpod-probes"))


def _machine_host_chain() -> bool:
    proc = subprocess.run(["iptables", "-t", "nat", "-S", "ISTIO_POSTRT"], capture_output=True, text=True)
    return proc.returncode == 0


@pytest.fixture(scope="session", autouse=True)
def _machine_netns_untouched_session() -> Iterator[None]:
    before = (_machine_probe_sets(), _machine_host_chain())
    yield
    after = (_machine_probe_sets(), _machine_host_chain())
    assert after == before, f"this machine's own netns gained node-side probe state: {before} -> {after}"


@pytest.fixture(autouse=True)
def _machine_netns_untouched() -> Iterator[None]:
    before = _machine_probe_sets()
    yield
    after = _machine_probe_sets()
    assert after == before, f"a test created probe sets in this machine's own netns: {before} -> {after}"


def _required(require: Callable[[], Path]) -> Path:
    try:
        return require()
    except MissingBuildOutput as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def plugin_binary() -> Path:
    """``dist/ambient-cni`` (fails the test with `make build` advice when missing)."""
    return _required(require_plugin)


@pytest.fixture(scope="session")
def driver_binary() -> Path:
    """``tests/tools/bin/cnitool`` (fails the test with `make driver` advice when missing)."""
    return _required(require_driver)


def _scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cni_bin_dir(plugin_binary: Path) -> Iterator[Path]:
    """A temp CNI_PATH: symlinks to /usr/lib/cni/* plus ``ambient-cni`` -> dist/ambient-cni."""
    for base in _scratch_dir("acpt-bin-"):
        yield make_bin_dir(base / "bin", plugin_binary)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temp dir removed after the test (pass or fail)."""
    yield from _scratch_dir("acpt-")


@pytest.fixture
def conf_dir(scratch: Path) -> Path:
    path = scratch / "net.d"
    path.mkdir()
    return path


@pytest.fixture
def cache_dir(scratch: Path) -> Path:
    """libcni's result cache (CNI_CACHE_DIR); never /var/lib/cni."""
    path = scratch / "cache"
    path.mkdir()
    return path


@pytest.fixture
def ipam_dir(scratch: Path) -> Path:
    """host-local's dataDir; never /var/lib/cni/networks."""
    path = scratch / "ipam"
    path.mkdir()
    return path


@pytest.fixture
def run_dir(scratch: Path) -> Path:
    """The plugin's run_dir (snapshot, cni.sock, plugin.log, pods/); never /var/run/ambient-cni."""
    path = scratch / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def netns_factory() -> Iterator[Callable[..., Netns]]:
    """``make(prefix="acpt") -> Netns`` (``testbed.netns.Netns``): a fresh netns with lo up; all removed after
    the test, also when it fails."""
    created: list[str] = []

    def make(prefix: str = "acpt", loopback_up: bool = True) -> Netns:
        name = netns_mod.unique_name(prefix)
        created.append(name)
        return netns_mod.create(name, loopback_up)

    try:
        yield make
    finally:
        for name in reversed(created):
            netns_mod.remove(name)


@pytest.fixture
def node_netns(netns_factory: Callable[..., Netns]) -> Netns:
    """A netns that plays the node: run the driver inside it so bridges/routes/iptables stay out of the host."""
    return netns_factory("acnode")


@pytest.fixture
def pod_netns(netns_factory: Callable[..., Netns]) -> Netns:
    return netns_factory("acpod")


@pytest.fixture
def fake_agent(run_dir: Path) -> Iterator[Callable[..., FakeAgent]]:
    """``start(respond) -> FakeAgent`` on ``<run_dir>/cni.sock`` (see ``tests.plugin_fixtures.FakeAgent``)."""
    agents: list[FakeAgent] = []

    def start(respond: Callable[[dict[str, Any]], bytes | None]) -> FakeAgent:
        agent = FakeAgent(run_dir, respond)
        agents.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in agents:
            agent.close()
