"""One agent per run dir and state dir, and private files (real agent processes, real netns, the frozen plugin
through the libcni driver, the real ``zds_peer`` as ztunnel).

A DaemonSet rolling update or a stuck terminating pod starts a second agent on a node whose agent still runs.
Before the lock, the second one re-bound the ZDS socket and republished the enrollment snapshot from its own
view before it noticed the first, so ztunnel reconnected to an agent that had enrolled nothing and an enrolled
namespace read "not enrolled". Now the second agent exits non-zero with one line and touches nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from cni_plugin import rundir
from testbed.agent import AMBIENT, AgentProcess, call, pod, request, write_state
from testbed.cluster import AMBIENT_NS, PLAIN_NS, Cluster
from testbed.netns import Netns
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.peer import PeerProcess
from testbed.poll import wait_for


def second_agent(run_dir: Path, state_dir: Path, cluster_state: Path, zds: str,
                 host_netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs an agent to completion (a refused one exits at once). ``host_netns`` None: the recording dataplane
    (nothing of the node is touched even if the refusal failed); else the inpod one on that test node netns."""
    dataplane = ["--dataplane", "noop"] if host_netns is None else [
        "--dataplane", "inpod", "--zds-socket", zds, "--host-netns", host_netns]
    argv = [str(VENV_PYTHON), "-m", "ambient_cni", "agent", "--run-dir", str(run_dir), "--state-dir", str(state_dir),
            "--cluster-state", str(cluster_state), *dataplane, "--health-addr", "127.0.0.1:0", "--node-name", "node-a"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIENT_CNI_")}
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env)


def enrolled(agent: AgentProcess) -> list[dict[str, object]]:
    """The records without the time of their last verification (the first agent's passes keep updating it)."""
    return [{k: v for k, v in r.items() if k != "verified_at"} for r in agent.records()]


def test_a_second_agent_changes_nothing(cluster: Cluster, netns_factory: Callable[..., Netns],
                                        scratch: Path) -> None:
    first = cluster.agent
    _ns, uid = cluster.add_pod(netns_factory, "web-0")
    zds = str(first.base / "zds.sock")
    snapshot_path = first.run_dir / rundir.SNAPSHOT
    zds_inode, snapshot_bytes = os.stat(zds).st_ino, snapshot_path.read_bytes()
    records = enrolled(first)
    log_size = (first.run_dir / rundir.AGENT_LOG).stat().st_size

    # the intruder's view says the ambient namespace is not enrolled: publishing it would fail open
    other_view = scratch / "other.yaml"
    write_state(other_view, {AMBIENT_NS: {}, PLAIN_NS: {}}, [])
    for run_dir, state_dir in ((first.run_dir, scratch / "other-state"), (scratch / "other-run", first.state_dir)):
        done = second_agent(run_dir, state_dir, other_view, zds, host_netns=cluster.common["node"].path)
        assert done.returncode != 0
        assert "already runs with" in done.stderr and "nothing was changed" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert os.stat(zds).st_ino == zds_inode
        assert snapshot_path.read_bytes() == snapshot_bytes
        assert enrolled(first) == records
    assert not (scratch / "other-state").exists(), "refused before touching its own state dir"
    assert (first.run_dir / rundir.AGENT_LOG).stat().st_size >= log_size
    assert str(os.getpid()) not in (first.run_dir / rundir.LOCK).read_text()

    # ztunnel reconnects (a new peer process): it reaches the first agent, gets the enrolled pod in the
    # snapshot, and enrolled ADDs keep working
    cluster.peer.stop()
    cluster.peer = replacement = PeerProcess(zds, str(first.base))  # the fixture only stops the first one
    try:
        first.wait_ready(30)
        wait_for(lambda: f'pod WorkloadUid("{uid}") received netns, starting proxy' in replacement.log(),
                 timeout=20, what="the enrolled pod in the new connection's snapshot")
        _ns2, uid2 = cluster.add_pod(netns_factory, "web-1")
        wait_for(lambda: f'pod WorkloadUid("{uid2}") received netns, starting proxy' in replacement.log(),
                 timeout=20, what="a new enrolled ADD after the reconnect")
        assert sorted(r["name"] for r in first.records()) == ["web-0", "web-1"]
        assert stat.S_IMODE(os.stat(zds).st_mode) == 0o600
    finally:
        replacement.stop()


def test_a_symlinked_lock_file_is_refused(scratch: Path) -> None:
    run_dir = scratch / "agent" / "run"
    run_dir.mkdir(parents=True, mode=0o700)
    target = scratch / "elsewhere"
    os.symlink(target, run_dir / rundir.LOCK)
    state = scratch / "state.yaml"
    write_state(state, {"shop": AMBIENT}, [])
    done = second_agent(run_dir, scratch / "agent" / "state", state, str(scratch / "zds.sock"))
    assert done.returncode != 0 and "symlink" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not target.exists()


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in directory.iterdir()}


def test_dirs_are_0700_and_every_agent_file_0600_whatever_existed_before(
    scratch: Path, netns_factory: Callable[..., Netns]
) -> None:
    state = scratch / "state.yaml"
    write_state(state, {"shop": AMBIENT}, [pod("cart-0", "shop", uid="uid-cart")])
    agent = AgentProcess(scratch / "agent", cluster_state=state)
    # as a hostPath DirectoryOrCreate leaves them, with files from an older agent that were world-readable
    for directory in (agent.run_dir, agent.state_dir):
        directory.mkdir(parents=True)
        os.chmod(directory, 0o755)
    for path in (agent.state_dir / "agent.db", agent.run_dir / rundir.AGENT_LOG):
        path.touch()
        os.chmod(path, 0o644)
    try:
        agent.start()
        ns = netns_factory("acperm")
        assert call(agent.sock, request("add", "cart-0", "shop", uid="uid-cart", netns=ns.path))["enrolled"] is True
        for directory in (agent.run_dir, agent.state_dir):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
        state_files = _modes(agent.state_dir)
        assert {"agent.db", "agent.db-wal", "agent.db-shm", "agent.lock"} <= set(state_files), state_files
        assert set(state_files.values()) == {0o600}, state_files
        run_files = _modes(agent.run_dir)
        assert {"agent.log", "agent.lock", "enrollment.json", "cni.sock"} <= set(run_files), run_files
        assert all(mode == 0o600 for name, mode in run_files.items() if name != "pods"), run_files
    finally:
        agent.kill()
