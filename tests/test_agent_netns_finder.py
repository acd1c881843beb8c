"""How the agent finds a running pod's netns without a CNI event (the seed's "already running" path).

Pure parsing of /proc/<pid>/cgroup lines in the shapes kubelet's cgroup drivers produce, and one real case:
a process started inside a test netns and moved into a real cgroup named after the pod uid is found through
/proc, and the path it yields is that netns.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin import hints, rundir
from nodeagent import netns_finder
from testbed.netns import Netns
from testbed.poll import wait_for

UID = "1e054806-e667-4109-a5af-08b3e6ba0c42"


@pytest.mark.parametrize(
    "cgroup_text",
    [
        # cgroup v2, systemd driver
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID.replace('-', '_')}.slice/"
        "cri-containerd-abc.scope\n",
        # cgroup v2, cgroupfs driver
        f"0::/kubepods/burstable/pod{UID}/0123456789abcdef\n",
        # cgroup v1, several hierarchies
        f"12:pids:/kubepods/pod{UID}/abc\n11:memory:/kubepods/pod{UID}/abc\n0::/\n",
    ],
)
def test_cgroup_shapes_of_a_pod_are_recognised(cgroup_text: str) -> None:
    assert netns_finder.cgroup_mentions_pod(cgroup_text, UID)


@pytest.mark.parametrize(
    "cgroup_text",
    [
        "0::/system.slice/containerd.service\n",
        f"0::/kubepods/pod{UID}x/abc\n",  # another uid that merely starts with this one
        f"0::/kubepods/pod{UID[:-1]}/abc\n",  # a prefix of the uid
    ],
)
def test_other_cgroups_are_not_the_pod(cgroup_text: str) -> None:
    assert not netns_finder.cgroup_mentions_pod(cgroup_text, UID)


def test_no_uid_matches_nothing() -> None:
    assert not netns_finder.cgroup_mentions_pod(f"0::/kubepods/pod{UID}/abc\n", "")


def test_hint_parsing_is_tolerant_and_strict_where_it_matters() -> None:
    hint = hints.parse(
        '{"netns": "/var/run/netns/cni-1", "container_id": "c1", "ifname": "eth0", "uid": "u", '
        '"ips": ["10.0.0.5/24", "fd00::5/64"], "written_at": 1.5}'
    )
    assert hint is not None and hint.netns == "/var/run/netns/cni-1" and hint.ips == ("10.0.0.5/24", "fd00::5/64")
    for bad in ("", "not json", "[]", "1", "null", '"x"', '{"netns": ""}', '{"container_id": "c1"}',
                '{"netns": 5}', '{"netns": "/x", "ips": "10.0.0.5/24"}', '{"netns": "/x", "ips": [1]}',
                '{"netns": "/x", "uid": "../u"}', '{"netns": "/x", "written_at": "now"}',
                '{"netns": "/x\\u0000y"}', '{"netns": "/x\\ud800"}', "[" * 100_000 + "]" * 100_000):
        assert hints.parse(bad) is None, bad[:80]


def test_the_agent_reads_hints_only_inside_the_hints_dir(tmp_path: Path) -> None:
    """A crafted hint outside ``<run_dir>/pods`` is never reached: not by a traversing name, not through a
    symlink, and a FIFO in its place does not block the reader."""
    run_dir = tmp_path / "run"
    (run_dir / rundir.HINTS).mkdir(parents=True)
    outside = tmp_path / "evil_x"
    outside.write_text(json.dumps({"netns": "/proc/self/ns/net", "uid": "u"}))
    for namespace, name in (("../../evil", "x"), (str(tmp_path / "evil"), "x"), ("..", "evil_x")):
        assert netns_finder.read_hint(str(run_dir), namespace, name) is None
    (run_dir / rundir.HINTS / "shop_cart-0").symlink_to(outside)
    assert netns_finder.read_hint(str(run_dir), "shop", "cart-0") is None
    (run_dir / rundir.HINTS / "shop_cart-0").unlink()
    os.mkfifo(run_dir / rundir.HINTS / "shop_cart-0")
    started = time.monotonic()
    assert netns_finder.find(str(run_dir), "shop", "cart-0", "") is None
    assert time.monotonic() - started < 1
    (run_dir / rundir.HINTS).rename(tmp_path / "real-pods")
    (run_dir / rundir.HINTS).symlink_to(tmp_path / "real-pods")
    (tmp_path / "real-pods" / "shop_cart-0").unlink()
    (tmp_path / "real-pods" / "shop_cart-0").write_text(json.dumps({"netns": "/proc/self/ns/net"}))
    assert netns_finder.read_hint(str(run_dir), "shop", "cart-0") is None, "a symlinked hints dir is refused"


@pytest.fixture
def pod_cgroup() -> Iterator[Path]:
    # cgroup v2 (unified) where mounted, else a v1 controller hierarchy, as on these machines
    candidates = [Path("/sys/fs/cgroup"), *(Path("/sys/fs/cgroup") / c for c in ("pids", "cpu", "memory"))]
    root = next((c for c in candidates if (c / "cgroup.procs").exists()), None)
    if root is None:
        pytest.fail("no writable cgroup hierarchy under /sys/fs/cgroup")
    parent = root / f"acfind-{secrets.token_hex(3)}"
    cgroup = parent / f"pod{UID}"
    cgroup.mkdir(parents=True)
    try:
        yield cgroup
    finally:
        for directory in (cgroup, parent):  # refused while the killed sleepers are still leaving the cgroup
            wait_for(functools.partial(_rmdir, directory), 2.5, interval=0.05, tolerate=(OSError,),
                     what=f"{directory} to be removable")


def _rmdir(directory: Path) -> bool:
    directory.rmdir()
    return True


def _sleeper_in(ns: Netns) -> subprocess.Popen[bytes]:
    """``sleep 30`` inside ``ns``, returned once the exec happened (same pid, now sleep in the netns)."""
    proc = subprocess.Popen([*ns.exec_prefix(), "sleep", "30"])
    try:
        wait_for(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(ns.path).st_ino, 5,
                 tolerate=(OSError,), what="the sleeper to enter its netns")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def test_running_pod_is_found_through_proc(netns_factory: Callable[..., Netns], pod_cgroup: Path) -> None:
    ns = netns_factory("acfind")
    path = ns.path
    proc = _sleeper_in(ns)
    try:
        (pod_cgroup / "cgroup.procs").write_text(str(proc.pid))
        found = netns_finder.from_proc(UID)
        assert found is not None, "the pod's process was not found through /proc"
        assert found.source == "proc"
        assert found.inode == os.stat(path).st_ino
        assert netns_finder.from_proc("00000000-0000-0000-0000-000000000000") is None
    finally:
        proc.kill()
        proc.wait()


def test_the_pods_oldest_process_decides_and_every_candidate_is_checked(
    netns_factory: Callable[..., Netns], pod_cgroup: Path
) -> None:
    """A pid can be reused and a hint can be stale: the pod's oldest process names its netns, and whatever a
    source names must hold one of the pod's IPs, not be the host's or enrolled as another pod, and, when
    processes live in it, be the pod's."""
    first, later, stranger = (netns_factory("acfind") for _ in range(3))
    procs = []
    try:
        procs = [_sleeper_in(first), _sleeper_in(later), _sleeper_in(stranger)]
        for proc in procs[:2]:  # the first two join the pod's cgroup; the third stays outside any pod
            (pod_cgroup / "cgroup.procs").write_text(str(proc.pid))
        found = netns_finder.from_proc(UID)
        assert found is not None and found.netns_path == f"/proc/{procs[0].pid}/ns/net"
        assert (found.inode, found.dev) == netns_finder.netns_id(first.path)

        ip = "10.77.9.9/32"
        assert netns_finder.rejection(found, UID) == "no IP of the pod is known to check it against"
        assert "holds none of the pod's IPs (10.77.9.9)" in str(netns_finder.rejection(found, UID, (ip,)))
        subprocess.run(["ip", "-n", first.name, "addr", "add", ip, "dev", "lo"], check=True)
        assert netns_finder.rejection(found, UID, (ip,)) is None
        assert netns_finder.rejection(found, UID, (ip,), claimed_by=lambda _ident: "shop/other uid u2") == (
            "it is enrolled as another pod (shop/other uid u2)"
        )

        ident = netns_finder.netns_id(stranger.path)
        assert ident is not None
        subprocess.run(["ip", "-n", stranger.name, "addr", "add", ip, "dev", "lo"], check=True)
        stale_hint = netns_finder.NetnsLocation(stranger.path, ident[0], ips=(ip,), source="hint",
                                                dev=ident[1])
        assert "its processes belong to another pod" in str(netns_finder.rejection(stale_hint, UID))

        host = netns_finder.netns_id("/proc/self/ns/net")
        assert host is not None
        own = netns_finder.NetnsLocation("/proc/self/ns/net", host[0], ips=(ip,), source="hint", dev=host[1])
        assert "network namespace" in str(netns_finder.rejection(own, UID))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
