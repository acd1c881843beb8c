"""A container re-added without Kubernetes identity keeps the identity of its first ADD (fail closed).

Runtimes such as podman run DEL then ADD for the same container id (``network reload``, ``restart``,
``stop``+``start``) and give the new ADD only the caller's CNI_ARGS. The plugin remembers container id -> pod
identity in ``<run_dir>/identities/`` (``cni_plugin/identity_cache.py``); the agent forgets the entries of
pods that are gone (``nodeagent/identity_gc.py``). Checked here: the cache on its own (paths confined, bad
entries refused fast), the frozen plugin (inheritance, refusals, GC), the agent's pruning, and the whole
DEL + identity-less ADD sequence through libcni and a real agent. The podman end-to-end is in
``tests/test_podman_enrolled.py``.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import files, identity_cache, rundir, snapshot
from cni_plugin.wire import PodRef
from nodeagent.clusterview.model import ClusterState, Pod
from nodeagent.identity_gc import prune_identities
from nodeagent.store import PodRecord, PodStore
from testbed.agent import AMBIENT, AgentProcess, pod, write_state
from testbed.cni import netconf, write_conflist
from testbed.netns import Netns
from testbed.poll import wait_for
from testbed.runners import DriverResult, plugin_env, run_driver, run_plugin
from tests.plugin_fixtures import assert_no_traceback, load_fixture

CID = "4f" * 32  # podman's and containerd's ids: 64 hex digits
CART = PodRef(namespace="shop", name="cart-0", uid="6f1c0000-0000-4000-8000-000000000001")
CART_ARGS = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID={CART.uid}"
PODMAN_ARGS = "IgnoreUnknown=1;K8S_POD_NAME=c2"  # what podman sends when the caller adds nothing


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------------------------- the cache


def test_remember_and_recall(run_dir: Path) -> None:
    assert identity_cache.remember(str(run_dir), CID, CART)
    entry = run_dir / rundir.IDENTITIES / CID
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    assert identity_cache.recall(str(run_dir), CID) == CART
    assert json.loads(entry.read_text())["container_id"] == CID
    assert identity_cache.stored_ids(str(run_dir)) == [CID]
    assert _tree(run_dir) == {"identities", f"identities/{CID}"}, "no temp file left behind"
    assert identity_cache.recall(str(run_dir), "5e" * 32) is None
    assert identity_cache.forget(str(run_dir), CID)
    assert identity_cache.recall(str(run_dir), CID) is None


@pytest.mark.parametrize("container_id", ["", "../../escape", "a/b", ".hidden", "-x", "x" * 256, "a\0b", "ü"])
def test_container_ids_that_cannot_name_a_file_there(run_dir: Path, container_id: str) -> None:
    canary = run_dir.parent / "canary"
    canary.mkdir()
    before = _tree(run_dir.parent)
    assert rundir.identity_path(str(run_dir), container_id) is None
    assert not identity_cache.remember(str(run_dir), container_id, CART)
    assert identity_cache.recall(str(run_dir), container_id) is None
    assert not identity_cache.forget(str(run_dir), container_id)
    assert _tree(run_dir.parent) == before


@pytest.mark.parametrize(
    "pod_ref",
    [
        PodRef(namespace="Shop", name="cart-0"),
        PodRef(namespace="shop", name="../cart"),
        PodRef(namespace="shop", name="cart_0"),
        PodRef(namespace="shop", name="x" * 254),
        PodRef(namespace="s" * 64, name="cart-0"),
        PodRef(namespace="shop", name="cart-0", uid="a/b"),
        PodRef(namespace="shop", name="cart-0", infra_container_id="../x"),
    ],
)
def test_invalid_identities_are_not_remembered(run_dir: Path, pod_ref: PodRef) -> None:
    assert not identity_cache.remember(str(run_dir), CID, pod_ref)
    assert not (run_dir / rundir.IDENTITIES / CID).exists()


def _write_entry(run_dir: Path, data: bytes | None = None, doc: Any = None) -> Path:
    entry = run_dir / rundir.IDENTITIES / CID
    entry.parent.mkdir(mode=0o700, exist_ok=True)
    entry.write_bytes(data if data is not None else json.dumps(doc).encode())
    return entry


GOOD = {"v": 1, "container_id": CID, "namespace": "shop", "name": "cart-0", "uid": "u", "infra_container_id": ""}


@pytest.mark.parametrize(
    ("label", "content"),
    [
        ("garbage", b"\xff\xfe not json"),
        ("empty", b""),
        ("list", b"[]"),
        ("null", b"null"),
        ("deeply nested", b"[" * 100_000 + b"]" * 100_000),
        ("other version", json.dumps({**GOOD, "v": 2}).encode()),
        ("wrong types", json.dumps({**GOOD, "uid": 7}).encode()),
        ("another container", json.dumps({**GOOD, "container_id": "5e" * 32}).encode()),
        ("invalid name", json.dumps({**GOOD, "name": "../../etc"}).encode()),
        ("too large", json.dumps({**GOOD, "pad": "x" * 5000}).encode()),
    ],
)
def test_unusable_entries_are_errors_not_absent(run_dir: Path, label: str, content: bytes) -> None:
    _write_entry(run_dir, content)
    with pytest.raises(identity_cache.IdentityError):
        identity_cache.recall(str(run_dir), CID)


def test_special_files_are_refused_fast(run_dir: Path, tmp_path: Path) -> None:
    directory = run_dir / rundir.IDENTITIES
    directory.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text(json.dumps(GOOD))
    for make in (lambda p: p.symlink_to(target), lambda p: os.mkfifo(p), lambda p: p.mkdir(),
                 lambda p: p.symlink_to("/dev/zero")):
        entry = directory / CID
        make(entry)
        started = time.monotonic()
        with pytest.raises(identity_cache.IdentityError):
            identity_cache.recall(str(run_dir), CID)
        assert time.monotonic() - started < 1.0
        entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def test_prune_keeps_valid_attachments_only(run_dir: Path) -> None:
    ids = [f"{i:02x}" * 32 for i in range(3)]
    for container_id in ids:
        assert identity_cache.remember(str(run_dir), container_id, CART)
    (run_dir / rundir.IDENTITIES / ".123-abcd.tmp").write_text("half")
    assert identity_cache.prune(str(run_dir), {ids[1]}) == 2
    assert sorted(os.listdir(run_dir / rundir.IDENTITIES)) == sorted([".123-abcd.tmp", ids[1]])


# ------------------------------------------------------------------------------------- the frozen plugin


def _conf(run_dir: Path, version: str = "1.0.0", **keys: Any) -> bytes:
    prev = load_fixture("prevresults", "1.0.0")
    conf = netconf(version, run_dir=run_dir, prevResult=prev, deadline_ms=200, **keys)
    return json.dumps(conf).encode()


def _snapshot(run_dir: Path, namespaces: dict[str, bool]) -> None:
    data = snapshot.encode(snapshot.Snapshot(node="n", generation=1, namespaces=namespaces, pods={}), time.time())
    (run_dir / rundir.SNAPSHOT).write_bytes(data)


def _plugin(run_dir: Path, command: str, cni_args: str | None, container_id: str = CID, **conf: Any) -> Any:
    res = run_plugin(plugin_env(command, container_id=container_id, cni_args=cni_args), _conf(run_dir, **conf))
    assert_no_traceback(res.stdout, res.stderr)
    return res


def test_readd_without_identity_inherits_it_and_fails_closed(run_dir: Path, plugin_binary: Path) -> None:
    """ADD with identity (enrolled namespace, agent down: refused) leaves the entry; DEL keeps it; the
    identity-less re-ADD is the same enrolled pod again (refused the same way), never a pass-through."""
    _snapshot(run_dir, {"shop": True})
    first = _plugin(run_dir, "ADD", CART_ARGS)
    assert first.code == 1 and first.json["code"] == 11 and "pod shop/cart-0" in first.json["msg"], first.describe()
    assert identity_cache.recall(str(run_dir), CID) == CART
    deleted = _plugin(run_dir, "DEL", CART_ARGS)
    assert deleted.code == 0 and deleted.stdout == b""
    assert identity_cache.recall(str(run_dir), CID) == CART, "DEL must not forget the identity"
    again = _plugin(run_dir, "ADD", PODMAN_ARGS)
    assert again.code == 1 and again.json["code"] == 11, again.describe()
    assert "pod shop/cart-0 is enrolled" in again.json["msg"]
    log = (run_dir / rundir.PLUGIN_LOG).read_text()
    assert "using the one remembered for this container" in log
    # another container without identity and without an entry: not a Kubernetes pod, passes through
    other = _plugin(run_dir, "ADD", PODMAN_ARGS, container_id="5e" * 32)
    assert other.code == 0 and other.json == load_fixture("prevresults", "1.0.0"), other.describe()
    assert identity_cache.stored_ids(str(run_dir)) == [CID]


def test_not_enrolled_pods_are_remembered_too(run_dir: Path, plugin_binary: Path) -> None:
    """A pod whose namespace is enrolled later must not fall out on its next re-ADD: every Kubernetes ADD is
    remembered; exempt pods (excluded namespaces) are not."""
    _snapshot(run_dir, {"shop": False})
    assert _plugin(run_dir, "ADD", CART_ARGS).code == 0
    assert identity_cache.recall(str(run_dir), CID) == CART
    excluded = "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-0;K8S_POD_UID=u"
    assert _plugin(run_dir, "ADD", excluded, container_id="5e" * 32).code == 0
    assert identity_cache.stored_ids(str(run_dir)) == [CID]


def test_an_explicit_identity_wins_over_the_remembered_one(run_dir: Path, plugin_binary: Path) -> None:
    _snapshot(run_dir, {"shop": True, "web": False})
    assert identity_cache.remember(str(run_dir), CID, CART)
    web = "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front-0;K8S_POD_UID=u"
    res = _plugin(run_dir, "ADD", web)
    assert res.code == 0, res.describe()
    assert identity_cache.recall(str(run_dir), CID) == PodRef(namespace="web", name="front-0", uid="u")


def test_unusable_entry_refuses_add_and_never_fails_del(run_dir: Path, plugin_binary: Path) -> None:
    _snapshot(run_dir, {"shop": True})
    entry = _write_entry(run_dir, b"{not json")
    added = _plugin(run_dir, "ADD", PODMAN_ARGS)
    assert added.code == 1 and added.json["code"] == 5, added.describe()
    assert str(entry) in added.json["msg"] and "refusing to treat it as outside the mesh" in added.json["msg"]
    deleted = _plugin(run_dir, "DEL", PODMAN_ARGS)
    assert deleted.code == 0 and deleted.stdout == b"", deleted.describe()
    checked = _plugin(run_dir, "CHECK", PODMAN_ARGS)
    assert checked.code == 1 and checked.json["code"] == 5


def test_enrolled_pod_is_refused_when_its_identity_cannot_be_remembered(run_dir: Path, plugin_binary: Path) -> None:
    _snapshot(run_dir, {"shop": True, "web": False})
    (run_dir / rundir.IDENTITIES).write_text("a file where the directory should be")
    refused = _plugin(run_dir, "ADD", CART_ARGS)
    assert refused.code == 1 and refused.json["code"] == 5, refused.describe()
    assert "cannot remember pod shop/cart-0" in refused.json["msg"]
    web = "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=front-0;K8S_POD_UID=u"
    assert _plugin(run_dir, "ADD", web).code == 0  # not enrolled: best effort, passes


def test_gc_forgets_containers_that_are_not_valid_attachments(run_dir: Path, plugin_binary: Path) -> None:
    keep, drop = "aa" * 32, "bb" * 32
    for container_id in (keep, drop):
        assert identity_cache.remember(str(run_dir), container_id, CART)
    conf = netconf("1.1.0", run_dir=run_dir)
    conf["cni.dev/valid-attachments"] = [{"containerID": keep, "ifname": "eth0"}]
    res = run_plugin(plugin_env("GC", container_id=None, netns=None, ifname=None), json.dumps(conf).encode())
    assert res.code == 0, res.describe()
    assert identity_cache.stored_ids(str(run_dir)) == [keep]


# -------------------------------------------------------------------------------------- the agent's prune


def test_agent_forgets_entries_of_gone_pods_only(run_dir: Path, tmp_path: Path) -> None:
    store = PodStore(str(tmp_path / "state"))
    ids = {name: f"{i + 1:02x}" * 32 for i, name in enumerate(("in-view", "gone", "young", "replaced", "recorded"))}
    for name, container_id in ids.items():
        assert identity_cache.remember(str(run_dir), container_id, PodRef(namespace="shop", name=name, uid=f"u-{name}"))
    corrupt = _write_entry(run_dir, b"garbage")
    store.upsert(PodRecord(container_id=ids["recorded"], ifname="eth0", uid="u-recorded", name="recorded",
                           namespace="shop", netns_path="/x", netns_inode=1))
    temp = run_dir / rundir.IDENTITIES / files.temp_name(ids["gone"])  # a writer killed mid-write
    temp.write_text("{")
    now = time.time()
    for path in (run_dir / rundir.IDENTITIES).iterdir():
        if path.name != ids["young"]:
            os.utime(path, (now - 60, now - 60))
    state = ClusterState(pods={
        ("shop", "in-view"): Pod("in-view", "shop", uid="u-in-view"),
        ("shop", "replaced"): Pod("replaced", "shop", uid="u-new"),
    })
    assert prune_identities(str(run_dir), state, store, grace_s=10.0, now=now) == 2
    left = set(os.listdir(run_dir / rundir.IDENTITIES))
    assert left == {ids["in-view"], ids["young"], ids["recorded"], corrupt.name}
    store.close()


# ------------------------------------------------------------------ DEL + identity-less ADD, libcni + agent


@pytest.fixture
def chain(scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path, cni_bin_dir: Path,
          node_netns: Netns, driver_binary: Path) -> Iterator[dict[str, Any]]:
    state = scratch / "cluster" / "state.yaml"
    state.parent.mkdir()
    write_state(state, {"shop": AMBIENT}, [pod("cart-0", uid=CART.uid, namespace="shop")])
    agent = AgentProcess(scratch / "agent", cluster_state=state)
    agent.base.mkdir()
    net = write_conflist(conf_dir, "0.4.0", ipam_dir=ipam_dir,
                         ambient={"run_dir": str(agent.run_dir), "deadline_ms": 2000})
    try:
        agent.start()
        yield {"agent": agent, "net": net, "conf_dir": conf_dir, "cache_dir": cache_dir, "bin_dir": cni_bin_dir,
               "node": node_netns, "state": state}
    finally:
        agent.kill()


def _driver(chain: dict[str, Any], command: str, netns: Netns, container_id: str, cni_args: str) -> DriverResult:
    return run_driver(command, chain["net"].name, netns.path, conf_dir=chain["conf_dir"], bin_dir=chain["bin_dir"],
                      cache_dir=chain["cache_dir"], node=chain["node"], container_id=container_id,
                      cni_args=cni_args)


def test_reload_sequence_keeps_the_pod_enrolled_through_libcni(chain: dict[str, Any],
                                                                netns_factory: Callable[..., Netns]) -> None:
    """podman's ``network reload``: ADD (caller's identity), DEL (libcni's cached CNI_ARGS), ADD (caller's env,
    no identity). The agent holds the pod after the second ADD exactly as after the first; once the pod is gone
    from the cluster view (and DEL removed the record), the agent forgets the identity."""
    agent: AgentProcess = chain["agent"]
    pod_ns = netns_factory("acid")
    cid = f"ac{uuid.uuid4().hex}"
    assert _driver(chain, "add", pod_ns, cid, CART_ARGS).code == 0
    first = [(r["namespace"], r["name"], r["uid"], r["container_id"]) for r in agent.records()]
    assert first == [("shop", "cart-0", CART.uid, cid)]
    deleted = _driver(chain, "del", pod_ns, cid, CART_ARGS)
    assert deleted.code == 0 and agent.records() == [], deleted.describe()
    readded = _driver(chain, "add", pod_ns, cid, PODMAN_ARGS)
    assert readded.code == 0, readded.describe()
    assert [(r["namespace"], r["name"], r["uid"], r["container_id"]) for r in agent.records()] == first
    # the final DEL of a container whose cached CNI_ARGS carry no identity still reaches the agent
    assert _driver(chain, "del", pod_ns, cid, PODMAN_ARGS).code == 0
    assert agent.records() == []
    entry = agent.run_dir / rundir.IDENTITIES / cid
    assert entry.exists()
    old = time.time() - 60
    os.utime(entry, (old, old))
    write_state(chain["state"], {"shop": AMBIENT}, [])
    wait_for(lambda: not entry.exists(), timeout=10, what="the agent forgets the gone pod's identity")
