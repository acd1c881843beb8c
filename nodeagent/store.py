"""Durable records of enrolled pods: SQLite in the state dir, keyed by (container_id, ifname).

WAL with ``synchronous=NORMAL``: a committed record survives a crash or kill of the agent process (the WAL
is in the OS page cache, fsynced at checkpoints). Only a power loss can drop the last commits, and a power
loss also destroys every pod netns those records describe, so the reconciler rebuilds them from the view
either way. FULL would add an fsync to every ADD's critical path for no state that outlives the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field, replace

DB_NAME = "agent.db"
SCHEMA_VERSION = 1

STATE_ENROLLED = "enrolled"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pods (
    container_id TEXT NOT NULL,
    ifname       TEXT NOT NULL,
    uid          TEXT NOT NULL DEFAULT '',
    name         TEXT NOT NULL DEFAULT '',
    namespace    TEXT NOT NULL DEFAULT '',
    netns_path   TEXT NOT NULL DEFAULT '',
    netns_inode  INTEGER NOT NULL DEFAULT 0,
    ips          TEXT NOT NULL DEFAULT '[]',
    state        TEXT NOT NULL DEFAULT 'enrolled',
    source       TEXT NOT NULL DEFAULT 'cni',
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (container_id, ifname)
);
CREATE INDEX IF NOT EXISTS pods_uid ON pods (uid);
"""

_COLUMNS = (
    "container_id, ifname, uid, name, namespace, netns_path, netns_inode, ips, state, source, created_at, updated_at"
)


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class PodRecord:
    container_id: str
    ifname: str
    uid: str
    name: str
    namespace: str
    netns_path: str
    netns_inode: int
    ips: tuple[str, ...] = ()
    state: str = STATE_ENROLLED
    source: str = "cni"  # "cni" (an ADD) or "reconcile" (found without a CNI event)
    created_at: float = 0.0
    updated_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    def to_json(self) -> dict[str, object]:
        return {
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "netns_path": self.netns_path,
            "netns_inode": self.netns_inode,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "ips": list(self.ips),
            "state": self.state,
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


def _row_to_record(row: tuple[object, ...]) -> PodRecord:
    (cid, ifname, uid, name, namespace, netns_path, inode, ips, state, source, created, updated) = row
    return PodRecord(
        container_id=str(cid),
        ifname=str(ifname),
        uid=str(uid),
        name=str(name),
        namespace=str(namespace),
        netns_path=str(netns_path),
        netns_inode=int(inode),  # type: ignore[call-overload]
        ips=tuple(json.loads(str(ips))),
        state=str(state),
        source=str(source),
        created_at=float(created),  # type: ignore[arg-type]
        updated_at=float(updated),  # type: ignore[arg-type]
    )


class PodStore:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._lock = threading.Lock()
        # SQLite creates the database 0644 and its -wal/-shm with the database's mode: create everything under
        # umask 077, then force 0600 on what existed before.
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path + suffix, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def upsert(self, record: PodRecord) -> PodRecord:
        now = time.time()
        with self._lock:
            existing = self._db.execute(
                "SELECT created_at FROM pods WHERE container_id=? AND ifname=?", record.key
            ).fetchone()
            created = float(existing[0]) if existing else (record.created_at or now)
            stored = replace(record, created_at=created, updated_at=now)
            self._db.execute(
                f"INSERT OR REPLACE INTO pods ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    stored.container_id, stored.ifname, stored.uid, stored.name, stored.namespace,
                    stored.netns_path, stored.netns_inode, json.dumps(list(stored.ips)), stored.state,
                    stored.source, stored.created_at, stored.updated_at,
                ),
            )
        return stored

    def get(self, container_id: str, ifname: str) -> PodRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM pods WHERE container_id=? AND ifname=?", (container_id, ifname)
            ).fetchone()
        return _row_to_record(row) if row else None

    def by_uid(self, uid: str) -> list[PodRecord]:
        if not uid:
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM pods WHERE uid=?", (uid,)).fetchall()
        return [_row_to_record(r) for r in rows]

    def by_pod(self, namespace: str, name: str) -> list[PodRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM pods WHERE namespace=? AND name=?", (namespace, name)
            ).fetchall()
        return [_row_to_record(r) for r in rows]

    def delete(self, container_id: str, ifname: str) -> bool:
        with self._lock:
            cursor = self._db.execute("DELETE FROM pods WHERE container_id=? AND ifname=?", (container_id, ifname))
        return cursor.rowcount > 0

    def all(self) -> list[PodRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM pods ORDER BY namespace, name").fetchall()
        return [_row_to_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM pods").fetchone()[0])
