"""Netns safety: only a pod's network namespace is accepted; the host's and the agent's are refused
with a clear error and nothing changes. Entering a netns moves only a dedicated thread."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

import netns_threads
from nodeagent.dataplane import netns
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.dataplane.inpod import InPodDataplane
from testbed.netns import Netns, sh


def host_rules() -> str:
    return sh("iptables-save").stdout + sh("ip6tables-save").stdout + sh("ip", "rule").stdout


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/proc/self/ns/net", "agent's own network namespace"),
        ("/proc/1/ns/net", "network namespace"),
        ("/proc/thread-self/ns/net", "agent's own network namespace"),
        ("/proc/self/ns/mnt", "not a network namespace"),
        ("/etc/hostname", "not a namespace file"),
        ("/nonexistent/netns/xyz", "does not exist"),
        ("/proc", "directory"),
        ("", "no network namespace path"),
    ],
)
def test_open_refuses(path: str, message: str) -> None:
    with pytest.raises(netns.NetnsError, match=message):
        netns.open_netns(path)


def test_open_accepts_a_pod_netns_and_reports_its_inode(netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    with netns.open_netns(ns.path) as h:
        assert h.inode == os.stat(ns.path).st_ino
        assert h.fd >= 0


def test_thread_and_subprocess_inherit_only_the_thread(netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    want = f"net:[{os.stat(ns.path).st_ino}]"
    mine = os.readlink("/proc/thread-self/ns/net")
    with netns.open_netns(ns.path) as h:
        seen = netns_threads.run_in_netns(
            h.fd,
            lambda: (
                os.readlink("/proc/thread-self/ns/net"),
                subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout.strip(),
            ),
        )
    assert seen == (want, want)  # the worker thread and a child it forks are inside the pod netns
    assert os.readlink("/proc/thread-self/ns/net") == mine  # the caller never moved
    assert os.readlink("/proc/self/ns/net") == mine


@pytest.mark.parametrize("path", ["/proc/self/ns/net", "/proc/1/ns/net", "/etc/hostname", "/nonexistent/ns"])
def test_dataplane_add_refuses_and_changes_nothing(tmpdir_short: str, path: str) -> None:
    from zds_peer.client import Peer

    before = host_rules()
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), ack_timeout_s=2.0)
    peer = Peer(dp.zds.path).start()
    try:
        assert peer.replay_done.wait(5)
        pod = PodWork(uid="u-bad", name="bad", namespace="ns", netns_path=path, ips=("10.0.0.9/24",))
        with pytest.raises(DataplaneError) as err:
            dp.add(pod, time.monotonic() + 5)
        assert err.value.retryable is False
        assert path in err.value.msg or "does not exist" in err.value.msg
        assert dp.enrolled() == {}
        assert peer.proxies == {}
        dp.remove(pod)  # never raises for a bad/missing netns
    finally:
        peer.stop()
        dp.close()
    assert host_rules() == before
