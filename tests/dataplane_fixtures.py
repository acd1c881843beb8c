"""Fixtures of the dataplane and traffic tests (registered by ``tests/conftest.py`` through ``pytest_plugins``):
a bridge node with pods, a short temp dir for UNIX sockets, and the whole chain on one node (``testbed``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.cluster import Cluster, running_cluster
from testbed.netns import Netns
from testbed.pods import Node, Pod, TcpServer, as_pod, bridge_node, tcp_exchange
from testbed.poll import wait_for

SERVER_PORT = 8080  # where ``two_pods``'s server listens


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


@pytest.fixture
def two_pods(cluster: Cluster, netns_factory: Callable[..., Netns]) -> tuple[Pod, Pod, TcpServer]:
    """Enrolled pods "client" and "server" on ``cluster``, a TCP echo server in the second on ``SERVER_PORT``, and one
    exchange already through both proxies (the test closes the server)."""
    a_ns, a_uid = cluster.add_pod(netns_factory, "client")
    b_ns, b_uid = cluster.add_pod(netns_factory, "server")
    a, b = as_pod(a_ns, a_uid, "client"), as_pod(b_ns, b_uid, "server")
    server = TcpServer(b, SERVER_PORT)
    assert tcp_exchange(a, (b.ip, SERVER_PORT), b"mesh") == b"echo:mesh"
    wait_for(lambda: cluster.peer.port_count(a.uid, 15001) == 1 and cluster.peer.port_count(b.uid, 15006) == 1,
             what="first exchange through both proxies")
    return a, b, server
