"""ZDS: the agent's zds_server + InPodDataplane against ZDS clients speaking the protobuf over a real
SOCK_SEQPACKET socket with real netns fds (SCM_RIGHTS): our peer (zds_peer) and a scripted client
(``testbed.zds.ScriptedZtunnel``)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nodeagent import logs
from nodeagent.dataplane import diagnose
from nodeagent.dataplane.api import DataplaneError, PodWork
from nodeagent.dataplane.inpod import InPodDataplane
from testbed.netns import Netns
from testbed.pods import listening_ports
from testbed.poll import wait_for
from testbed.zds import ScriptedZtunnel
from zds import zds_pb2
from zds_peer.client import Peer


@pytest.fixture
def dataplane(tmpdir_short: str) -> Iterator[InPodDataplane]:
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds.sock"), ack_timeout_s=1.0)
    try:
        yield dp
    finally:
        dp.close()


def pod_in(ns: Netns, uid: str = "", ips: tuple[str, ...] = ("10.9.0.2/24",)) -> PodWork:
    return PodWork(uid=uid or f"uid-{ns.name}", name=ns.name, namespace="test", netns_path=ns.path, ips=ips)


def test_no_ztunnel_is_retryable_and_changes_nothing(
    dataplane: InPodDataplane, netns_factory: Callable[..., Netns]
) -> None:
    ns = netns_factory()
    assert dataplane.ready()[0] is False
    with pytest.raises(DataplaneError) as err:
        dataplane.add(pod_in(ns), time.monotonic() + 2)
    assert err.value.retryable and err.value.code == 11
    assert "ISTIO" not in ns.iptables_save()


def test_peer_add_del_with_listeners_in_the_pod(dataplane: InPodDataplane, netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    peer = Peer(dataplane.zds.path).start()
    try:
        assert peer.replay_done.wait(5)
        wait_for(lambda: dataplane.ready()[0], what="ready")
        pod = pod_in(ns)
        inode = dataplane.add(pod, time.monotonic() + 5)
        assert inode == os.stat(ns.path).st_ino
        assert {15001, 15006, 15008} <= listening_ports(ns)  # opened by a host process inside the pod
        assert "ISTIO_PRERT" in ns.iptables_save()
        assert dataplane.add(pod, time.monotonic() + 5) == inode  # idempotent re-add
        assert ns.iptables_save().count("-A PREROUTING -j ISTIO_PRERT") == 1
        dataplane.remove(pod)
        wait_for(lambda: pod.uid not in peer.proxies, what="proxy drained")
        assert not {15001, 15006, 15008} & listening_ports(ns)
        assert "ISTIO" not in ns.iptables_save()
        assert "0x111" not in ns.run("ip", "rule").stdout
        dataplane.remove(pod)  # repeated: fine
    finally:
        peer.stop()


def test_replay_on_connect_and_reconnect(dataplane: InPodDataplane, netns_factory: Callable[..., Netns]) -> None:
    a, b = netns_factory(), netns_factory()
    first = ScriptedZtunnel(dataplane.zds.path)
    try:
        wait_for(lambda: first.kinds() == ["snapshot_sent"], what="empty replay")
        pa = pod_in(a)
        dataplane.add(pa, time.monotonic() + 3)
        assert first.got[-1] == ("add", pa.uid, os.stat(a.path).st_ino)  # the fd really is the pod's netns
        # a reconnecting ztunnel gets the full replay: Add + the netns fd of every pod held, then SnapshotSent
        second = ScriptedZtunnel(dataplane.zds.path)
        try:
            wait_for(lambda: "snapshot_sent" in second.kinds(), what="replay")
            assert second.got == [("add", pa.uid, os.stat(a.path).st_ino), ("snapshot_sent", "", None)]
            # live adds go to the newest connection only; dels to all
            pb = pod_in(b)
            n_first = len(first.got)
            dataplane.add(pb, time.monotonic() + 3)
            assert second.got[-1] == ("add", pb.uid, os.stat(b.path).st_ino)
            assert len(first.got) == n_first
            dataplane.remove(pb)
            assert ("del", pb.uid, None) in first.got and ("del", pb.uid, None) in second.got
        finally:
            second.close()
    finally:
        first.close()


def test_replay_sends_each_pods_own_netns_even_if_the_pod_goes_meanwhile(
        tmpdir_short: str, netns_factory: Callable[..., Netns]) -> None:
    """A reconnect replay takes a while (one ack per pod). A pod removed meanwhile has its netns handle closed
    (its DelWorkload to the busy connection gives up), and the fd number is soon reused by another file: the
    replay must still send the netns it listed (the server owns duplicates), never a stale number."""
    dp = InPodDataplane(os.path.join(tmpdir_short, "zds2.sock"), ack_timeout_s=2.0)
    a, x, b, other = netns_factory(), netns_factory(), netns_factory(), netns_factory()
    first = ScriptedZtunnel(dp.zds.path)
    reused: list[int] = []
    try:
        wait_for(lambda: first.kinds() == ["snapshot_sent"], what="empty replay")
        pods = [pod_in(ns) for ns in (a, x, b)]
        for pod in pods:
            dp.add(pod, time.monotonic() + 5)
        b_fd = dp._pods[pods[2].uid].handle.fd
        # acks 1.2 s apart: Add(a) at 0, Add(x) at 1.2 s, Add(b) at 2.4 s; the DEL below gives up at ~2 s
        slow = ScriptedZtunnel(dp.zds.path, ack_delay_s=1.2)
        try:
            wait_for(lambda: slow.kinds()[:1] == ["add"], what="replay under way")
            dp.remove(pods[2])  # closes b's handle once its DelWorkload to the busy connection gives up
            for _ in range(64):  # take b's old fd number for another netns, as any new open would
                reused.append(os.open(other.path, os.O_RDONLY | os.O_CLOEXEC))
                if reused[-1] == b_fd:
                    break
            wait_for(lambda: "snapshot_sent" in slow.kinds(), timeout=15, what="replay")
            got = {uid: ino for kind, uid, ino in slow.got if kind == "add"}
            assert got == {pod.uid: os.stat(ns.path).st_ino for pod, ns in zip(pods, (a, x, b), strict=True)}
        finally:
            slow.close()
    finally:
        for fd in reused:
            os.close(fd)
        first.close()
        dp.close()


def test_replay_leaves_out_a_pod_whose_path_names_another_netns_and_closes_its_duplicate(
        dataplane: InPodDataplane, netns_factory: Callable[..., Netns]) -> None:
    """The replay hands the ZDS server duplicates of the pods' netns fds (the server closes them once sent);
    a pod left out because its path no longer names the netns we hold must not leak its duplicate."""
    a, b, other = netns_factory(), netns_factory(), netns_factory()
    client = ScriptedZtunnel(dataplane.zds.path)
    try:
        wait_for(lambda: client.kinds() == ["snapshot_sent"], what="empty replay")
        pa, pb = pod_in(a), pod_in(b)
        for pod in (pa, pb):
            dataplane.add(pod, time.monotonic() + 5)
        dataplane._pods[pa.uid].pod = dataclasses.replace(pa, netns_path=other.path)  # the path was reused
        fds_before = sorted(os.listdir("/proc/self/fd"))
        entries = dataplane._replay()
        try:
            assert [e.uid for e in entries] == [pb.uid]
            held = dataplane._pods[pb.uid].handle
            assert held is not None and entries[0].fd not in (None, held.fd)  # a duplicate, owned by the caller
            assert entries[0].fd is not None and os.fstat(entries[0].fd).st_ino == os.stat(b.path).st_ino
        finally:
            for entry in entries:
                if entry.fd is not None:
                    os.close(entry.fd)
        assert sorted(os.listdir("/proc/self/fd")) == fds_before
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["silent", "error"])
def test_ack_timeout_or_error_fails_closed(
    dataplane: InPodDataplane, netns_factory: Callable[..., Netns], mode: str
) -> None:
    ns = netns_factory()
    client = ScriptedZtunnel(dataplane.zds.path, mode=mode)
    try:
        wait_for(lambda: "snapshot_sent" in client.kinds(), what="replay")
        t0 = time.monotonic()
        with pytest.raises(DataplaneError) as err:
            dataplane.add(pod_in(ns), time.monotonic() + 5)
        elapsed = time.monotonic() - t0
        if mode == "silent":
            assert err.value.retryable and "acknowledge" in err.value.msg
            assert 0.9 <= elapsed < 3.0  # the ack deadline (1 s here, 5 s by default)
        else:
            assert not err.value.retryable and "rejected by test" in err.value.msg
        # no half state: no rules, no routes, no record
        assert "ISTIO" not in ns.iptables_save()
        assert "0x111" not in ns.run("ip", "rule").stdout
        assert dataplane.enrolled() == {}
    finally:
        client.close()


@pytest.fixture
def agent_log() -> Iterator[io.StringIO]:
    """The agent's log lines (its real JSON formatter), at debug level, for this test."""
    stream = io.StringIO()
    logs.setup(None, "debug", stream=stream)
    try:
        yield stream
    finally:
        logs.get_logger().handlers.clear()


def test_zds_lines_carry_the_pod_so_doctor_finds_them(
    dataplane: InPodDataplane, netns_factory: Callable[..., Netns], agent_log: io.StringIO
) -> None:
    """Every ZDS line about a pod names it (pod_namespace, pod_name, pod_uid), as the agent's other lines do:
    ``ambient-cni doctor`` shows a pod's lines by matching those fields (``diagnose.agent_log_lines``)."""
    ns = netns_factory()
    client = ScriptedZtunnel(dataplane.zds.path, mode="silent")
    try:
        wait_for(lambda: "snapshot_sent" in client.kinds(), what="replay")
        pod = pod_in(ns)
        with pytest.raises(DataplaneError):
            dataplane.add(pod, time.monotonic() + 5)
    finally:
        client.close()
    peer = Peer(dataplane.zds.path).start()
    try:
        wait_for(lambda: dataplane.ready()[0], what="ready")
        dataplane.add(pod, time.monotonic() + 5)
        dataplane.remove(pod)
    finally:
        peer.stop()
    lines = [json.loads(line) for line in agent_log.getvalue().splitlines()]
    zds = [line for line in lines if line.get("scope") == "zds" and line.get("pod_uid") == pod.uid]
    assert {line["msg"] for line in zds} >= {"zds: no ack from ztunnel in time, closing the connection",
                                             "zds: ztunnel acknowledged the pod's netns"}
    assert all(line["pod_namespace"] == "test" and line["pod_name"] == ns.name for line in zds
               if "pod_name" in line)
    assert all(isinstance(line.get("zds_connection"), int) for line in lines if line.get("scope") == "zds"
               and "zds_connection" in line)
    shown = diagnose.agent_log_lines(agent_log.getvalue(), pod.uid, "test", ns.name, limit=100)
    assert any("zds: no ack from ztunnel in time" in line for line in shown), shown
    assert any("zds: ztunnel acknowledged the pod's netns" in line for line in shown), shown
    assert any("redirection installed, netns handed to ztunnel" in line for line in shown), shown
    assert not diagnose.agent_log_lines(agent_log.getvalue(), "uid-someone-else", "test", "someone-else")


def test_peer_with_slow_acks_hits_the_deadline(dataplane: InPodDataplane, netns_factory: Callable[..., Netns]) -> None:
    ns = netns_factory()
    peer = Peer(dataplane.zds.path, ack_delay_s=1.5).start()
    try:
        wait_for(lambda: peer.replays_seen >= 1, timeout=10, what="replay")
        with pytest.raises(DataplaneError) as err:
            dataplane.add(pod_in(ns), time.monotonic() + 5)
        assert err.value.retryable
        assert "ISTIO" not in ns.iptables_save()
        # the connection was closed; the peer reconnects, and the fresh replay drops the pod there too
        wait_for(lambda: peer.replays_seen >= 2, timeout=10, what="second replay")
        wait_for(lambda: not peer.proxies, what="proxy dropped")
    finally:
        peer.stop()


def test_concurrent_adds(dataplane: InPodDataplane, netns_factory: Callable[..., Netns]) -> None:
    nss = [netns_factory() for _ in range(6)]
    peer = Peer(dataplane.zds.path).start()
    try:
        assert peer.replay_done.wait(5)
        errors: list[BaseException] = []

        def add(ns: Netns) -> None:
            try:
                dataplane.add(pod_in(ns), time.monotonic() + 10)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=add, args=(ns,)) for ns in nss]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(dataplane.enrolled()) == 6 and len(peer.proxies) == 6
    finally:
        peer.stop()


def test_generated_pb2_is_up_to_date(tmpdir_short: str) -> None:
    """zds_pb2.py(i) are committed; they must equal what grpcio-tools' protoc makes from zds.proto now."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "zds"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"--python_out={tmpdir_short}",
         f"--pyi_out={tmpdir_short}", str(src / "zds.proto")],
        check=True,
    )
    for name in ("zds_pb2.py", "zds_pb2.pyi"):
        assert (Path(tmpdir_short) / name).read_text() == (src / name).read_text(), f"{name} stale: make zds-proto"
    # field numbers as ztunnel publishes them
    req = zds_pb2.WorkloadRequest.DESCRIPTOR.fields_by_name
    assert {k: req[k].number for k in ("add", "del", "snapshot_sent", "keep")} == {
        "add": 1, "del": 2, "snapshot_sent": 3, "keep": 5}
    assert zds_pb2.DelWorkload.DESCRIPTOR.fields_by_name["uid"].number == 2
    assert zds_pb2.WorkloadRequest.DESCRIPTOR.full_name == "istio.workload.zds.WorkloadRequest"
