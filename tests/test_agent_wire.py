"""The node agent as a real process (file cluster view, recording dataplane) driven over wire protocol v1.

Real parts: the agent subprocess, its UNIX socket, real network namespaces for the pods' netns, SQLite in a
temp state dir. The pods themselves are entries of the cluster-state file (there is no kube-apiserver here).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pytest

from cni_plugin import rundir, snapshot, wire
from cni_plugin.enrollment import Exemptions
from testbed.agent import AMBIENT, AgentProcess, call, pod, request, send_raw, write_state
from testbed.netns import Netns
from testbed.paths import REPO_ROOT, VENV_PYTHON
from testbed.poll import wait_for

NAMESPACES = {
    "shop": AMBIENT,
    "plain": {},
    "kube-system": AMBIENT,  # excluded by default even though labelled
    "istio-system": AMBIENT,
}


@pytest.fixture
def state_file(scratch: Path) -> Path:
    path = scratch / "cluster" / "state.yaml"
    path.parent.mkdir()
    write_state(path, NAMESPACES, [
        pod("cart-0", "shop", uid="uid-cart"),
        pod("optout-0", "shop", uid="uid-optout", labels={"istio.io/dataplane-mode": "none"}),
        pod("optin-0", "plain", uid="uid-optin", labels=AMBIENT),
        pod("plain-0", "plain", uid="uid-plain"),
        pod("coredns-0", "kube-system", uid="uid-dns"),
        pod("ambient-cni-node-x1", "istio-system", uid="uid-agent"),
        pod("hostnet-0", "shop", uid="uid-hostnet", hostNetwork=True),
        pod("sidecar-0", "shop", uid="uid-sidecar", annotations={"sidecar.istio.io/status": "{}"}),
        pod("other-node-0", "shop", uid="uid-other", nodeName="node-b"),
    ])
    return path


@pytest.fixture
def agent(scratch: Path, state_file: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(scratch / "agent", cluster_state=state_file)
    proc.base.mkdir()
    try:
        yield proc.start()
    finally:
        proc.kill()


@pytest.fixture
def pod_ns(netns_factory: Callable[..., Netns]) -> Netns:
    return netns_factory("acag")


@pytest.mark.parametrize(
    ("name", "namespace", "enrolled"),
    [
        ("cart-0", "shop", True),  # namespace labelled
        ("optout-0", "shop", False),  # pod label none
        ("optin-0", "plain", True),  # pod-level opt-in
        ("plain-0", "plain", False),
        ("coredns-0", "kube-system", False),  # excluded namespace
        ("ambient-cni-node-x1", "istio-system", False),  # the agent's own pod
        ("hostnet-0", "shop", False),
        ("sidecar-0", "shop", False),
        ("", "", False),  # not a Kubernetes pod
        ("late-0", "shop", True),  # not in the view yet: namespace rule with empty labels
        ("late-0", "plain", False),
    ],
)
def test_add_decides_from_the_agents_view(
    agent: AgentProcess, pod_ns: Netns, name: str, namespace: str, enrolled: bool
) -> None:
    started = time.monotonic()
    reply = call(agent.sock, request("add", name, namespace, uid=f"u-{name}", netns=pod_ns.path))
    assert time.monotonic() - started < 1.0
    assert reply["ok"] is True, reply
    assert reply["enrolled"] is enrolled
    names = [(r["namespace"], r["name"]) for r in agent.records()]
    assert names == ([(namespace, name)] if enrolled else [])


def reconcile_passes(agent: AgentProcess) -> float:
    _status, metrics = agent.http("/metrics")
    for line in metrics.splitlines():
        if line.startswith("ambient_cni_agent_reconcile_passes_total "):
            return float(line.split()[1])
    return 0.0


def test_reconcile_keeps_a_fresh_add_the_view_has_not_caught_up_with(agent: AgentProcess, pod_ns: Netns) -> None:
    """The race behind a flaky ``cart-0`` case above: the ADD carries a uid the view does not hold yet (a pod
    recreated under its old name), and a reconcile pass landing right after the ADD took it for a replaced pod
    and removed the record of a live, just-enrolled pod. Such a record now gets the same grace as one whose pod
    is missing from the view."""
    add = request("add", "cart-0", "shop", uid="uid-cart-recreated", netns=pod_ns.path, container_id="cid-new")
    assert call(agent.sock, add)["enrolled"] is True
    before = reconcile_passes(agent)
    wait_for(lambda: reconcile_passes(agent) >= before + 2, what="two reconcile passes after the ADD")
    assert [(r["container_id"], r["uid"]) for r in agent.records()] == [("cid-new", "uid-cart-recreated")]


def test_add_del_check_are_idempotent(agent: AgentProcess, pod_ns: Netns) -> None:
    add = request("add", "cart-0", "shop", uid="uid-cart", netns=pod_ns.path, container_id="cid-1")
    for _ in range(2):
        assert call(agent.sock, add) == {"v": 1, "id": add["id"], "ok": True, "enrolled": True}
    records = agent.records()
    assert len(records) == 1
    assert records[0]["netns_inode"] == os.stat(pod_ns.path).st_ino
    assert records[0]["ips"] == ["10.9.0.5/24", "fd00::5/64"]
    check = dict(add, op="check")
    assert call(agent.sock, check)["ok"] is True
    unknown = call(agent.sock, dict(check, container_id="cid-unknown"))
    assert (unknown["ok"], unknown["code"]) == (False, 3)
    assert "no record" in unknown["msg"]
    for expected in (True, False):
        reply = call(agent.sock, dict(add, op="del", netns=""))
        assert (reply["ok"], reply["enrolled"]) == (True, expected)
    assert agent.records() == []
    assert call(agent.sock, dict(add, op="check"))["code"] == 3


def test_add_of_missing_netns_fails_without_a_record(agent: AgentProcess) -> None:
    reply = call(agent.sock, request("add", "cart-0", "shop", netns="/var/run/netns/acag-does-not-exist"))
    assert (reply["ok"], reply["code"]) == (False, 101)
    assert "does not exist" in reply["msg"]
    assert agent.records() == []


def test_gc_drops_attachments_not_listed(agent: AgentProcess, netns_factory: Callable[..., Netns]) -> None:
    keep, drop = netns_factory("acag"), netns_factory("acag")
    call(agent.sock, request("add", "cart-0", "shop", netns=keep.path, container_id="keep"))
    call(agent.sock, request("add", "optin-0", "plain", netns=drop.path, container_id="drop"))
    reply = call(agent.sock, request("gc", valid_attachments=[{"container_id": "keep", "ifname": "eth0"}]))
    assert reply["ok"] is True
    assert [r["container_id"] for r in agent.records()] == ["keep"]


def test_status_reports_ready(agent: AgentProcess) -> None:
    reply = call(agent.sock, request("status"))
    assert reply["ok"] is True


def test_restart_between_add_and_del_keeps_the_record(agent: AgentProcess, pod_ns: Netns) -> None:
    add = request("add", "cart-0", "shop", uid="uid-cart", netns=pod_ns.path, container_id="cid-r")
    assert call(agent.sock, add)["enrolled"] is True
    assert agent.stop() == 0
    assert not os.path.exists(agent.sock)
    assert (agent.run_dir / rundir.SNAPSHOT).exists(), "the snapshot stays when the agent stops"
    agent.start()
    records = agent.records()
    assert [(r["container_id"], r["uid"]) for r in records] == [("cid-r", "uid-cart")]
    assert call(agent.sock, add)["enrolled"] is True  # a repeated ADD after restart: still one record
    assert len(agent.records()) == 1
    assert call(agent.sock, dict(add, op="del"))["enrolled"] is True
    assert agent.records() == []


def test_snapshot_holds_namespace_and_pod_verdicts(agent: AgentProcess) -> None:
    snap = snapshot.read(str(agent.run_dir / rundir.SNAPSHOT))
    assert snap.node == "node-a"
    assert snap.namespaces == {"istio-system": True, "kube-system": False, "plain": False, "shop": True}
    assert snap.pods["shop/cart-0"] is True
    assert snap.pods["shop/optout-0"] is False
    assert snap.pods["plain/optin-0"] is True
    assert snap.pods["shop/hostnet-0"] is False
    assert snap.pods["shop/sidecar-0"] is False
    assert snap.pods["istio-system/ambient-cni-node-x1"] is False
    assert "shop/other-node-0" not in snap.pods
    assert snap.exemptions == Exemptions(exclude_namespaces=frozenset({"kube-system"}))  # what the plugin follows
    assert agent.metric("ambient_cni_agent_snapshot_writes_total") >= 1
    assert snap.verdict("shop", "new-pod") is snapshot.Verdict.ENROLLED
    assert snap.verdict("plain", "new-pod") is snapshot.Verdict.UNKNOWN_POD
    mode = os.stat(agent.run_dir).st_mode & 0o777
    assert mode == 0o700
    assert os.stat(agent.sock).st_mode & 0o777 == 0o600


# -- robustness ------------------------------------------------------------------------------------
def test_bad_frames_get_clear_refusals_and_the_server_keeps_serving(agent: AgentProcess) -> None:
    header = wire.HEADER
    cases = {
        "wrong version": (wire.encode_frame(dict(request("status"), v=2)), 1, "unsupported protocol version"),
        "oversized": (header.pack(wire.MAX_FRAME + 1), 6, "exceeds"),
        "not msgpack": (header.pack(3) + b"\xc1\xc1\xc1", 6, "malformed"),
        "not a map": (wire.encode_frame([1, 2]), 6, "must be a map"),  # type: ignore[arg-type]
        "unknown op": (wire.encode_frame(dict(request("status"), op="explode")), 4, "unknown op"),
        "missing container id": (wire.encode_frame(dict(request("add"), container_id="")), 6, "container_id"),
        "bad deadline": (wire.encode_frame(dict(request("add"), deadline_ms=-1)), 6, "deadline_ms"),
    }
    for label, (data, code, text) in cases.items():
        reply = send_raw(agent.sock, data)
        assert reply is not None, label
        assert (reply["ok"], reply["code"]) == (False, code), (label, reply)
        assert text in reply["msg"], (label, reply)
    # truncated frame then EOF: no reply, no crash
    assert send_raw(agent.sock, header.pack(100) + b"abc", shut_write=True) is None
    assert call(agent.sock, request("status"))["ok"] is True


def test_slow_client_times_out_without_stalling_others(agent: AgentProcess) -> None:
    slow = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for conn in slow:
            conn.connect(agent.sock)
            conn.sendall(wire.HEADER.pack(50))  # announce 50 bytes, send none
        started = time.monotonic()
        assert call(agent.sock, request("status"))["ok"] is True
        assert time.monotonic() - started < 0.5
        slow[0].settimeout(5)
        raw = slow[0].recv(65536)
        reply = wire.decode_body(raw[4:])
        assert (reply["ok"], reply["code"]) == (False, 6)
        assert "not received within" in reply["msg"]
    finally:
        for conn in slow:
            conn.close()


_NOBODY_CLIENT = """
import socket, sys
from cni_plugin import wire
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.settimeout(5)
try:
    conn.connect(sys.argv[1])
except PermissionError as exc:
    print("EACCES", exc); sys.exit(0)
conn.sendall(wire.encode_frame({"v": 1, "op": "status", "id": "x"}))
data = b""
while True:
    chunk = conn.recv(65536)
    if not chunk:
        break
    data += chunk
print("REPLY", wire.decode_body(data[4:]))
"""


def _run_as_nobody(sock: str, keep_dac_override: bool) -> str:
    caps = ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"] if keep_dac_override else []
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *caps,
            str(VENV_PYTHON), "-c", _NOBODY_CLIENT, sock]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_non_root_client_is_refused(agent: AgentProcess) -> None:
    # Without privileges the 0700 dir / 0600 socket already stop uid 65534 ...
    assert _run_as_nobody(agent.sock, keep_dac_override=False).startswith("EACCES")
    # ... and one that gets past the file modes (CAP_DAC_OVERRIDE) is refused by SO_PEERCRED.
    out = _run_as_nobody(agent.sock, keep_dac_override=True)
    assert out.startswith("REPLY"), out
    assert "'ok': False" in out and "permission denied: peer uid 65534" in out and "'code': 100" in out
    assert call(agent.sock, request("status"))["ok"] is True


def test_110_concurrent_adds_are_each_acknowledged_once(agent: AgentProcess, scratch: Path) -> None:
    names = [f"acst{uuid.uuid4().hex[:6]}" for _ in range(110)]
    batch = scratch / "netns.batch"
    batch.write_text("".join(f"netns add {n}\n" for n in names))
    subprocess.run(["ip", "-batch", str(batch)], check=True)
    try:
        requests = [request("add", f"p{i}", "shop", uid=f"uid-{i}", netns=f"/var/run/netns/{n}",
                            container_id=f"cid-{i}") for i, n in enumerate(names)]
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=110) as pool:
            replies = list(pool.map(lambda m: call(agent.sock, m, timeout=30), requests))
        elapsed = time.monotonic() - started
        assert all(r["ok"] and r["enrolled"] for r in replies), [r for r in replies if not r["ok"]][:3]
        assert sorted(r["id"] for r in replies) == sorted(m["id"] for m in requests)
        records = agent.records()
        assert len(records) == 110
        assert len({r["container_id"] for r in records}) == 110
        assert elapsed < 20
        _status, metrics = agent.http("/metrics")
        assert 'ambient_cni_agent_requests_total{op="add",result="ok"} 110.0' in metrics
        assert "ambient_cni_agent_enrolled_pods 110.0" in metrics
    finally:
        batch.write_text("".join(f"netns delete {n}\n" for n in names))
        subprocess.run(["ip", "-force", "-batch", str(batch)], check=False)


# -- lifecycle -------------------------------------------------------------------------------------
def test_readyz_follows_the_cluster_view(scratch: Path) -> None:
    state = scratch / "late" / "state.yaml"
    state.parent.mkdir()
    state.write_text("namespaces: [not: {valid")
    agent = AgentProcess(scratch / "agent", cluster_state=state)
    agent.base.mkdir()
    try:
        agent.start(wait_ready=False)
        agent.wait_health_addr()
        assert agent.http("/healthz")[0] == 200
        status, body = agent.http("/readyz")
        assert status == 503 and "invalid" in body, body
        assert not (agent.run_dir / rundir.SNAPSHOT).exists(), "no snapshot from an unsynced view"
        write_state(state, {"shop": AMBIENT}, [])
        agent.wait_ready(timeout=10)
        assert (agent.run_dir / rundir.SNAPSHOT).exists()
        status_reply = call(agent.sock, request("status"))
        assert status_reply["ok"] is True
    finally:
        agent.kill()


def test_file_view_reloads_and_keeps_last_good_view(agent: AgentProcess, state_file: Path, pod_ns: Netns) -> None:
    snap_path = str(agent.run_dir / rundir.SNAPSHOT)
    assert snapshot.read(snap_path).namespaces["plain"] is False
    write_state(state_file, {**NAMESPACES, "plain": AMBIENT}, [pod("plain-0", "plain", uid="uid-plain")])
    wait_for(lambda: snapshot.read(snap_path).namespaces["plain"] is True, what="snapshot after reload")
    assert call(agent.sock, request("add", "plain-0", "plain", netns=pod_ns.path))["enrolled"] is True
    generation = snapshot.read(snap_path).generation
    state_file.write_text("pods: [{name: broken")  # in-place broken write
    wait_for(lambda: any(line["msg"].startswith("cluster-state file invalid") for line in agent.log_lines()),
             what="the agent to read the broken write")
    snap = snapshot.read(snap_path)
    assert snap.generation == generation and snap.namespaces["plain"] is True
    assert agent.http("/readyz")[0] == 200  # last good view kept


def test_reconcile_removes_unenrolled_and_enrolls_running_pods(
    agent: AgentProcess, state_file: Path, pod_ns: Netns
) -> None:
    add = request("add", "cart-0", "shop", uid="uid-cart", netns=pod_ns.path, container_id="cid-rc")
    assert call(agent.sock, add)["enrolled"] is True
    # the namespace loses its label: reconcile removes the record without any CNI event
    write_state(state_file, {**NAMESPACES, "shop": {}}, [pod("cart-0", "shop", uid="uid-cart")])
    wait_for(lambda: agent.records() == [], what="record removed after unlabelling")
    # an already-running pod (netns hint left by the plugin) whose namespace gets labelled is enrolled; its
    # netns holds the address the hint names (the agent checks that before it trusts the hint)
    subprocess.run(["ip", "-n", pod_ns.name, "addr", "add", "10.9.0.7/24", "dev", "lo"], check=True)
    hints = agent.run_dir / rundir.HINTS
    hints.mkdir(exist_ok=True)
    (hints / "plain_web-0").write_text(
        f'{{"netns": "{pod_ns.path}", "container_id": "cid-hint", "ifname": "eth0", "uid": "uid-web", '
        '"ips": ["10.9.0.7/24"], "written_at": 1}'
    )
    write_state(state_file, {**NAMESPACES, "plain": AMBIENT}, [pod("web-0", "plain", uid="uid-web")])
    wait_for(lambda: [r["container_id"] for r in agent.records()] == ["cid-hint"], what="running pod enrolled")
    record = agent.records()[0]
    assert record["source"] == "reconcile" and record["netns_inode"] == os.stat(pod_ns.path).st_ino


def test_sigterm_drains_in_flight_requests(agent: AgentProcess) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(agent.sock)
        frame = wire.encode_frame(request("status"))
        conn.sendall(frame[:3])  # the request is in flight ...
        wait_for(lambda: agent.pending_connections() == 0, what="the agent to accept the connection")  # ... taken
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not os.path.exists(agent.sock), what="the agent to stop listening")  # no new connections
        assert agent.proc.poll() is None, "the agent must wait for the in-flight request"
        conn.sendall(frame[3:])
        conn.settimeout(5)
        data = conn.recv(65536)
        reply = msgpack.unpackb(data[4:])
        assert reply["ok"] is False and reply["code"] == 50  # status while stopping: cannot take ADDs
        assert agent.proc.wait(10) == 0
    finally:
        conn.close()
    assert (agent.run_dir / rundir.SNAPSHOT).exists()


def test_plugin_log_lines_are_re_emitted(agent: AgentProcess) -> None:
    log = agent.run_dir / rundir.PLUGIN_LOG
    with open(log, "a") as handle:
        handle.write('{"time": "t", "level": "warning", "msg": "ADD failed closed", "pod_name": "cart-0"}\n')
    wait_for(lambda: any(line.get("scope") == "cni-plugin" for line in agent.log_lines()), what="re-emit")
    line = next(line for line in agent.log_lines() if line.get("scope") == "cni-plugin")
    assert (line["level"], line["msg"], line["pod_name"]) == ("warning", "ADD failed closed", "cart-0")
    log.write_text('{"level": "info", "msg": "after truncation"}\n')  # truncation/rotation
    wait_for(lambda: any(line.get("msg") == "after truncation" for line in agent.log_lines()), what="after trunc")


def test_cli_errors_are_clear(scratch: Path) -> None:
    argv = [str(VENV_PYTHON), "-m", "ambient_cni", "agent", "--run-dir", str(scratch / "r"), "--state-dir",
            str(scratch / "s"), "--dataplane", "record", "--health-addr", "nonsense",  # noop's older name parses
            "--cluster-state", str(scratch / "x.yaml")]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "--health-addr must be HOST:PORT" in done.stderr and "Traceback" not in done.stderr
    env = dict(os.environ, AMBIENT_CNI_HEALTH_ADDR="still-bad")
    done = subprocess.run([*argv[:-4], "--cluster-state", str(scratch / "x.yaml")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30, env=env)
    assert "still-bad" in done.stderr and "Traceback" not in done.stderr
    struct.pack(">I", 0)  # keep the import used for readers of the framing


def test_reconcile_follows_a_replaced_netns_and_drops_a_gone_one(
    scratch: Path, state_file: Path, netns_factory: Callable[..., Netns]
) -> None:
    """A pod whose netns was replaced under the same uid must not stay "enrolled" on a dead netns (seen in the
    field: after an undrained reboot such a pod sat outside the mesh for weeks while marked enrolled). The agent
    compares the recorded inode with the live one on every reconcile pass."""
    proc = AgentProcess(scratch / "agent-rc", cluster_state=state_file, extra_args=["--reconcile-interval", "0.2"])
    proc.base.mkdir()
    agent = proc.start()
    try:
        ns = netns_factory("acrc")
        add = request("add", "cart-0", "shop", uid="uid-cart", netns=ns.path, container_id="cid-old")
        assert call(agent.sock, add)["enrolled"] is True
        old_inode = os.stat(ns.path).st_ino
        # the sandbox is recreated: a new netns at the same path, with the plugin's hint for it
        subprocess.run(["ip", "netns", "del", ns.name], check=True)
        subprocess.run(["ip", "netns", "add", ns.name], check=True)
        subprocess.run(["ip", "-n", ns.name, "addr", "add", "10.9.0.5/24", "dev", "lo"], check=True)
        new_inode = os.stat(ns.path).st_ino
        assert new_inode != old_inode
        hints = agent.run_dir / rundir.HINTS
        hints.mkdir(exist_ok=True)
        (hints / "shop_cart-0").write_text(
            f'{{"netns": "{ns.path}", "container_id": "cid-new", "ifname": "eth0", "uid": "uid-cart", '
            '"ips": ["10.9.0.5/24"], "written_at": 1}'
        )
        wait_for(
            lambda: [(r["container_id"], r["netns_inode"]) for r in agent.records()] == [("cid-new", new_inode)],
            what="record re-enrolled on the new netns",
        )
        # the netns disappears for good (and its hint with it): the record goes
        (hints / "shop_cart-0").unlink()
        subprocess.run(["ip", "netns", "del", ns.name], check=True)
        wait_for(lambda: agent.records() == [], what="record removed once the netns is gone")
    finally:
        proc.kill()
