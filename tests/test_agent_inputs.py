"""The node agent (a real process, file cluster view, recording dataplane) trusts neither its socket nor the
files in its run dir: pod identity on the wire is checked as the plugin checks it, netns hints are read only
inside ``<run_dir>/pods`` (never through a symlink, never blocking on a FIFO), and odd files at the snapshot
path do not stop it from publishing. Real netns for the pods; the cluster-state file stands in for the API
server (there is none here), which is why it can hold names a real API server would refuse.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin import rundir, snapshot
from testbed.agent import AMBIENT, AgentProcess, call, pod, request, write_state
from testbed.netns import Netns
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.poll import wait_for


@pytest.fixture
def state_file(scratch: Path) -> Path:
    path = scratch / "cluster" / "state.yaml"
    path.parent.mkdir()
    write_state(path, {"shop": AMBIENT}, [pod("cart-0", "shop", uid="uid-cart")])
    return path


@pytest.fixture
def agent(scratch: Path, state_file: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(scratch / "agent", cluster_state=state_file)
    proc.base.mkdir()
    try:
        yield proc.start()
    finally:
        proc.kill()


BAD_PODS = [
    ("namespace", "../../etc", "namespace"),
    ("namespace", "/abs", "namespace"),
    ("namespace", "Shop", "namespace"),
    ("namespace", "a" * 64, "namespace"),
    ("name", "../../../x", "name"),
    ("name", "cart..0", "name"),
    ("name", "a" * 254, "name"),
    ("uid", "../uid", "uid"),
    ("uid", "u" * 129, "uid"),
    ("infra_container_id", "a/b", "infra"),
]


@pytest.mark.parametrize(("field", "value", "needle"), BAD_PODS, ids=[f"{f}-{v[:12]}" for f, v, _ in BAD_PODS])
@pytest.mark.parametrize("op", ["add", "check", "del"])
def test_pod_identity_on_the_wire_is_checked_like_the_plugins(
    op: str, field: str, value: str, needle: str, agent: AgentProcess, pod_netns: Netns
) -> None:
    message = request(op, "cart-0", "shop", uid="uid-cart", netns=pod_netns.path)
    message["pod"][field] = value
    reply = call(agent.sock, message)
    assert (reply["ok"], reply["code"]) == (False, 4), reply
    assert "field 'pod'" in reply["msg"] and needle.upper() in reply["msg"].upper(), reply
    assert agent.records() == []
    assert call(agent.sock, request("status"))["ok"] is True


def _hint(netns: str, uid: str, container_id: str) -> str:
    return json.dumps({"netns": netns, "container_id": container_id, "ifname": "eth0", "uid": uid, "ips": [],
                       "written_at": 1})


def test_reconcile_reads_hints_only_inside_the_hints_dir(
    scratch: Path, netns_factory: Callable[..., Netns]
) -> None:
    """Pods of the view whose hint is a FIFO, a symlink to a crafted file, or reached by a name that walks out
    of ``pods/`` are never enrolled through it, and do not stop the pass: a pod with a proper hint listed after
    them is enrolled."""
    crafted_ns, good_ns = netns_factory("acin"), netns_factory("acin")
    canary = scratch / "canary"
    canary.mkdir()
    (canary / "evil_x").write_text(_hint(crafted_ns.path, "uid-evil", "cid-evil"))
    (canary / "link-target").write_text(_hint(crafted_ns.path, "uid-link", "cid-link"))
    canary_before = sorted((p.name, p.stat().st_mtime_ns) for p in canary.iterdir())

    agent = AgentProcess(scratch / "agent")
    hints = agent.run_dir / rundir.HINTS
    hints.mkdir(parents=True)
    os.mkfifo(hints / "shop_fifo-0")
    (hints / "shop_link-0").symlink_to(canary / "link-target")
    (hints / "shop_good-0").write_text(_hint(good_ns.path, "uid-good", "cid-good"))
    traversing = os.path.relpath(canary, hints) + "/evil"  # <run>/pods/<this>_x is canary/evil_x
    state = scratch / "cluster" / "state.yaml"
    state.parent.mkdir()
    write_state(state, {"shop": AMBIENT, traversing: AMBIENT}, [
        pod("fifo-0", "shop", uid="uid-fifo"),
        pod("link-0", "shop", uid="uid-link"),
        pod("x", traversing, uid="uid-evil"),
        pod("good-0", "shop", uid="uid-good"),
    ])
    agent.cluster_state = state
    agent.base.mkdir(exist_ok=True)
    try:
        agent.start()
        wait_for(lambda: [r["container_id"] for r in agent.records()] == ["cid-good"], timeout=15,
                   what="the pod with a proper hint enrolled by reconcile")
        wait_for(lambda: any(line.get("msg") == "reconcile pass" for line in agent.log_lines()), what="a pass")
        assert [r["container_id"] for r in agent.records()] == ["cid-good"]
        assert sorted((p.name, p.stat().st_mtime_ns) for p in canary.iterdir()) == canary_before
        assert stat.S_ISFIFO((hints / "shop_fifo-0").lstat().st_mode), "the agent only reads hints"
    finally:
        agent.kill()


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-fifo", "directory-temp"])
def test_an_odd_file_at_the_snapshot_path_does_not_stop_publishing(kind: str, scratch: Path, state_file: Path) -> None:
    agent = AgentProcess(scratch / "agent", cluster_state=state_file)
    agent.run_dir.mkdir(parents=True, mode=0o700)
    path = agent.run_dir / rundir.SNAPSHOT
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(scratch / "elsewhere")
        path.symlink_to(scratch / "elsewhere")
    else:  # a stale directory under a temp-like name next to it changes nothing
        (agent.run_dir / f".{rundir.SNAPSHOT}.ambient-tmp.00000000").mkdir()
    try:
        agent.start(timeout=15)
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600  # every agent file: 0600
        assert snapshot.read(str(path)).pods == {"shop/cart-0": True}
        if kind == "symlink-to-fifo":
            assert stat.S_ISFIFO((scratch / "elsewhere").lstat().st_mode), "replaced, never written through"
    finally:
        agent.kill()


def _doctor(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # 127.0.0.1:9 (discard): nothing listens, so doctor falls back to the netns hint at once
    return subprocess.run([str(VENV_PYTHON), "-m", "ambient_cni", "doctor", *args, "--run-dir", str(run_dir),
                           "--health-addr", "127.0.0.1:9"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=30)


def test_doctor_reads_hints_only_inside_the_hints_dir(scratch: Path, pod_netns: Netns) -> None:
    run_dir = scratch / "run"
    (run_dir / rundir.HINTS).mkdir(parents=True)
    (scratch / "evil_x").write_text(_hint(pod_netns.path, "uid-evil", "cid-evil"))
    walked = _doctor(run_dir, "--pod", "../../evil/x")  # <run>/pods/../../evil_x
    assert walked.returncode == 2, walked.stdout + walked.stderr
    assert "DNS-1123" in walked.stderr and "Traceback" not in walked.stderr
    assert "uid-evil" not in walked.stdout
    os.mkfifo(run_dir / rundir.HINTS / "shop_cart-0")
    started = time.monotonic()
    fifo = _doctor(run_dir, "--pod", "shop/cart-0")
    assert time.monotonic() - started < 20
    assert fifo.returncode != 0 and "no usable netns hint" in fifo.stderr and "Traceback" not in fifo.stderr
