"""The state database is a cache: a damaged one is moved aside and rebuilt, never a reason to stop serving.

Process tests: a real agent (file view, recording dataplane), the frozen plugin run by the libcni driver in a
node netns (bridge + host-local give each pod netns a real address, the plugin leaves its netns hint), then the
database is damaged on disk between two runs of the agent. The agent must come back ready, with the records
rebuilt from the cluster view and the hints, the damaged files kept aside, a metric and a loud log line, and no
traceback. Store tests: the schema-1 migration and a query that meets corruption while the agent runs.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent import store as store_mod
from nodeagent.store import PodRecord, PodStore
from testbed.agent import AMBIENT, AgentProcess, pod, write_state
from testbed.cni import write_conflist
from testbed.netns import Netns
from testbed.poll import wait_for
from testbed.runners import DriverResult, run_driver


@pytest.fixture
def env(scratch: Path, conf_dir: Path, cache_dir: Path, ipam_dir: Path, cni_bin_dir: Path,
        node_netns: Netns, driver_binary: Path) -> dict[str, Any]:
    state = scratch / "cluster" / "state.yaml"
    state.parent.mkdir()
    write_state(state, {"shop": AMBIENT}, [pod("cart-0", "shop", uid="uid-cart-0"),
                                           pod("cart-1", "shop", uid="uid-cart-1")])
    agent = AgentProcess(scratch / "agent", cluster_state=state)
    agent.base.mkdir()
    chain = write_conflist(conf_dir, "1.0.0", ipam_dir=ipam_dir, ambient={"run_dir": str(agent.run_dir)})
    return {"agent": agent, "chain": chain, "conf_dir": conf_dir, "cache_dir": cache_dir, "bin_dir": cni_bin_dir,
            "node": node_netns}


@pytest.fixture
def agent(env: dict[str, Any]) -> Iterator[AgentProcess]:
    proc: AgentProcess = env["agent"]
    try:
        yield proc
    finally:
        proc.kill()


def cni_add(env: dict[str, Any], netns: Netns, name: str) -> DriverResult:
    cid = f"ac{uuid.uuid4().hex}"
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_UID=uid-{name}"
    return run_driver("add", env["chain"].name, netns.path, conf_dir=env["conf_dir"], bin_dir=env["bin_dir"],
                      cache_dir=env["cache_dir"], node=env["node"], container_id=cid, cni_args=args)


def _garble_header(db: Path) -> None:
    with open(db, "r+b") as fh:
        fh.write(b"this is no SQLite header")


def _truncate(db: Path) -> None:
    os.truncate(db, 4096 + 1000)  # the schema page, then half of the pods table's page


def _garble_table_page(db: Path) -> None:
    with open(db, "r+b") as fh:  # page 2 is the pods table's root
        fh.seek(4096)
        fh.write(b"\xde\xad\xbe\xef" * 1024)


def _garble_wal(db: Path) -> None:
    wal = db.with_name(db.name + "-wal")
    assert wal.stat().st_size > 32, "the killed agent left its commits in the WAL"
    with open(wal, "r+b") as fh:
        fh.write(b"\x00garbled WAL header\x00" + bytes(12))


DAMAGE = {"header": _garble_header, "truncated": _truncate, "table page": _garble_table_page, "wal": _garble_wal}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_database_is_moved_aside_and_rebuilt(
    env: dict[str, Any], agent: AgentProcess, netns_factory: Callable[..., Netns], damage: str
) -> None:
    agent.start()
    first = netns_factory("acdb")
    added = cni_add(env, first, "cart-0")
    assert added.code == 0, added.describe()
    assert [r["name"] for r in agent.records()] == ["cart-0"]
    if damage == "wal":
        agent.kill()  # SIGKILL: no checkpoint, the record lives in the WAL only
    else:
        assert agent.stop() == 0  # clean stop: everything checkpointed into agent.db
    db = agent.state_dir / "agent.db"
    DAMAGE[damage](db)

    agent.start()  # waits for /readyz: not ready until the records are rebuilt
    records = agent.records()
    assert [(r["name"], r["source"]) for r in records] == [("cart-0", "reconcile")], records
    assert records[0]["netns_inode"] == os.stat(first.path).st_ino
    aside = [p.name for p in agent.state_dir.iterdir() if ".corrupt-" in p.name]
    assert any(name.startswith("agent.db.corrupt-") for name in aside), aside
    _status, metrics = agent.http("/metrics")
    assert "ambient_cni_agent_state_db_corruptions_total 1.0" in metrics
    messages = [line["msg"] for line in agent.log_lines()]
    assert any(m.startswith("STATE DATABASE CORRUPT") for m in messages), messages
    assert any(m.startswith("state database rebuilt") for m in messages), messages
    # and it takes enrolled ADDs
    second = netns_factory("acdb")
    added = cni_add(env, second, "cart-1")
    assert added.code == 0, added.describe()
    wait_for(lambda: sorted(r["name"] for r in agent.records()) == ["cart-0", "cart-1"], what="both records")
    assert "Traceback" not in agent.stderr_path.read_text()


def test_schema_1_databases_are_migrated(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE pods (container_id TEXT NOT NULL, ifname TEXT NOT NULL, uid TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL DEFAULT '', namespace TEXT NOT NULL DEFAULT '', netns_path TEXT NOT NULL DEFAULT '',
            netns_inode INTEGER NOT NULL DEFAULT 0, ips TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL DEFAULT 'enrolled', source TEXT NOT NULL DEFAULT 'cni', created_at REAL NOT NULL,
            updated_at REAL NOT NULL, PRIMARY KEY (container_id, ifname));
        CREATE INDEX pods_uid ON pods (uid);
        INSERT INTO pods VALUES ('cid', 'eth0', 'uid-a', 'a', 'shop', '/run/netns/x', 4026532001,
            '["10.0.0.2/24"]', 'enrolled', 'cni', 1.0, 2.0);
        PRAGMA user_version=1;
    """)
    old.close()
    store = PodStore(str(tmp_path))
    try:
        (record,) = store.all()
        assert (record.uid, record.netns_inode, record.netns_dev, record.verified_at) == ("uid-a", 4026532001, 0, 0.0)
        store.set_netns_dev(record.key, 4)
        store.mark_verified([record.key], 123.0)
        again = store.get(*record.key)
        assert again is not None and (again.netns_dev, again.verified_at) == (4, 123.0)
        assert store._call(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == store_mod.SCHEMA_VERSION
        assert store.corruptions == 0 and not store.needs_rebuild
    finally:
        store.close()


def test_a_query_that_meets_corruption_moves_the_database_aside(tmp_path: Path) -> None:
    told: list[tuple[str, str]] = []
    store = PodStore(str(tmp_path), on_corruption=lambda why, moved_to: told.append((why, moved_to)))
    try:
        for i in range(200):
            store.upsert(PodRecord(f"c{i}", "eth0", f"u{i}", f"p{i}", "shop", "/run/netns/x", i))
        store._call(lambda db: db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        _garble_table_page(Path(store.path))
        # stands in for memory pressure: the next read goes to the damaged file instead of the page cache
        store._call(lambda db: db.execute("PRAGMA shrink_memory"))
        assert store.get("c5", "eth0") is None  # answered from a fresh database, not an exception
        assert store.needs_rebuild and store.corruptions == 1 and len(told) == 1
        assert "malformed" in told[0][0] and os.path.exists(told[0][1])
        stored = store.upsert(PodRecord("c-new", "eth0", "u", "p", "shop", "/run/netns/y", 7, netns_dev=3))
        assert store.all() == [stored]
        assert not store.mark_rebuilt(store.epoch - 1), "a pass that started before the move-aside does not count"
        assert store.mark_rebuilt(store.epoch) and not store.needs_rebuild
    finally:
        store.close()
