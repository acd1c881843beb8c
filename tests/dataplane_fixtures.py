"""Fixtures of the dataplane and traffic tests (registered by ``tests/conftest.py`` through ``pytest_plugins``):
a bridge node with pods, a short temp dir for UNIX sockets, and the whole chain on one node (``testbed``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.cluster import Cluster, running_cluster
from testbed.netns import Netns
from testbed.pods import Node, bridge_node


@pytest.fixture
def node() -> Iterator[Node]:
    """A node netns with a bridge (``testbed.pods.Node``); it and its pods are removed after the test."""
    with bridge_node() as made:
        yield made


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    """A short temp dir (UNIX socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="acdp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, driver_binary: Path, cni_bin_dir: Path, scratch: Path, conf_dir: Path,
    cache_dir: Path, ipam_dir: Path, node_netns: Netns,
) -> Iterator[Cluster]:
    """The node; ``@pytest.mark.parametrize("cluster", [[agent flags...]], indirect=True)`` adds agent flags."""
    with running_cluster(node_netns, conf_dir=conf_dir, bin_dir=cni_bin_dir, cache_dir=cache_dir,
                         ipam_dir=ipam_dir, state_file=scratch / "cluster.yaml",
                         agent_args=getattr(request, "param", [])) as made:
        yield made
