"""Durable records of enrolled pods: SQLite in the state dir, keyed by (container_id, ifname).

WAL with ``synchronous=NORMAL``: a committed record survives a crash or kill of the agent process (the WAL
is in the OS page cache, fsynced at checkpoints). Only a power loss can drop the last commits, and a power
loss also destroys every pod netns those records describe, so the reconciler rebuilds them from the view
either way. FULL would add an fsync to every ADD's critical path for no state that outlives the kernel.

The database is a cache of what the cluster view and the node's netns already say. A corrupt one (garbled
header, truncated file, a damaged page, a WAL that is not a WAL) is detected when it is opened (``quick_check``)
and whenever a query reports corruption: the files are moved aside as ``agent.db.corrupt-<time>`` (with their
``-wal``/``-shm``), a fresh database is opened, ``needs_rebuild`` is set (the agent is not ready until the
reconciler has rebuilt the records from the view and netns discovery) and the listeners are told (log, metric).

Every record carries the identity of its netns: inode *and* device (``netns_dev``, schema 2), the time the
agent last verified the pod's redirection (``verified_at``), and the redirection variant installed for it
(``variant``, schema 3: JSON of ``rules.Variant``, "" when unknown).

``kept_rules`` (schema 3) holds the netns whose in-pod rules a CNI DEL kept (the pod was dropped from ztunnel,
its rules stay until a re-ADD of the same netns or the reconciler removes them after a grace): one row per netns
identity. It must survive a restart: a netns left with our rules and no row would refuse its traffic for good.
Older databases are migrated in place (columns and tables added, never dropped).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

DB_NAME = "agent.db"
SCHEMA_VERSION = 3
CORRUPT_MARK = ".corrupt-"
SIDE_FILES = ("-wal", "-shm")

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
    netns_dev    INTEGER NOT NULL DEFAULT 0,
    verified_at  REAL NOT NULL DEFAULT 0,
    variant      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (container_id, ifname)
);
CREATE INDEX IF NOT EXISTS pods_uid ON pods (uid);
CREATE TABLE IF NOT EXISTS kept_rules (
    netns_inode  INTEGER NOT NULL,
    netns_dev    INTEGER NOT NULL,
    netns_path   TEXT NOT NULL,
    container_id TEXT NOT NULL DEFAULT '',
    ifname       TEXT NOT NULL DEFAULT '',
    uid          TEXT NOT NULL DEFAULT '',
    name         TEXT NOT NULL DEFAULT '',
    namespace    TEXT NOT NULL DEFAULT '',
    ips          TEXT NOT NULL DEFAULT '[]',
    variant      TEXT NOT NULL DEFAULT '',
    kept_at      REAL NOT NULL,
    PRIMARY KEY (netns_inode, netns_dev)
);
"""

# Columns added after schema 1, with their definitions (migration = ALTER TABLE ... ADD COLUMN).
_ADDED_COLUMNS = {
    "netns_dev": "INTEGER NOT NULL DEFAULT 0",
    "verified_at": "REAL NOT NULL DEFAULT 0",
    "variant": "TEXT NOT NULL DEFAULT ''",
}

_COLUMNS = (
    "container_id, ifname, uid, name, namespace, netns_path, netns_inode, ips, state, source, created_at, updated_at,"
    " netns_dev, verified_at, variant"
)
_KEPT_COLUMNS = "netns_inode, netns_dev, netns_path, container_id, ifname, uid, name, namespace, ips, variant, kept_at"

# SQLite primary result codes that mean "this file is damaged" (not "busy", "permission", "no space").
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
_CORRUPTION_CODES = (SQLITE_CORRUPT, SQLITE_NOTADB)
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000

T = TypeVar("T")


class StoreError(Exception):
    pass


class CorruptDatabase(Exception):
    """The database file (or its WAL) is damaged; the message says how."""


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
    netns_dev: int = 0  # 0: recorded by an agent before schema 2 (filled in at the first verification)
    verified_at: float = 0.0  # when the agent last found the pod's redirection as expected (0: not yet)
    variant: str = ""  # JSON of the rules.Variant installed ("" unknown: recorded before schema 3, or no rules)

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
            "netns_dev": self.netns_dev,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "ips": list(self.ips),
            "state": self.state,
            "source": self.source,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "verified_at": self.verified_at,
            "variant": _json_or_none(self.variant),
        }


@dataclass(frozen=True)
class KeptRules:
    """A netns whose in-pod rules a CNI DEL kept, and the pod it was enrolled as (for logs and the checks)."""

    netns_inode: int
    netns_dev: int
    netns_path: str
    container_id: str
    ifname: str
    uid: str
    name: str
    namespace: str
    ips: tuple[str, ...] = ()
    variant: str = ""
    kept_at: float = 0.0  # wall-clock time of the DEL (the grace is counted from it, across restarts)

    @property
    def ident(self) -> tuple[int, int]:
        return (self.netns_inode, self.netns_dev)

    @classmethod
    def of(cls, record: PodRecord, dev: int, when: float) -> KeptRules:
        return cls(record.netns_inode, dev, record.netns_path, record.container_id, record.ifname, record.uid,
                   record.name, record.namespace, record.ips, record.variant, when)

    def to_json(self) -> dict[str, object]:
        return {
            "netns_path": self.netns_path,
            "netns_inode": self.netns_inode,
            "netns_dev": self.netns_dev,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "uid": self.uid,
            "name": self.name,
            "namespace": self.namespace,
            "ips": list(self.ips),
            "variant": _json_or_none(self.variant),
            "kept_at": self.kept_at,
        }


def _json_or_none(text: str) -> object:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _ips(raw: object) -> tuple[str, ...]:
    try:
        ip_list = json.loads(str(raw))
    except ValueError:
        return ()
    return tuple(str(ip) for ip in ip_list) if isinstance(ip_list, list) else ()


def _row_to_kept(row: tuple[object, ...]) -> KeptRules:
    (inode, dev, path, cid, ifname, uid, name, namespace, ips, variant, kept_at) = row
    return KeptRules(_int(inode), _int(dev), str(path), str(cid), str(ifname), str(uid), str(name), str(namespace),
                     _ips(ips), str(variant), _float(kept_at))


def _row_to_record(row: tuple[object, ...]) -> PodRecord:
    (cid, ifname, uid, name, namespace, netns_path, inode, ips, state, source, created, updated, dev, verified,
     variant) = row
    return PodRecord(
        container_id=str(cid),
        ifname=str(ifname),
        uid=str(uid),
        name=str(name),
        namespace=str(namespace),
        netns_path=str(netns_path),
        netns_inode=_int(inode),
        ips=_ips(ips),
        state=str(state),
        source=str(source),
        created_at=_float(created),
        updated_at=_float(updated),
        netns_dev=_int(dev),
        verified_at=_float(verified),
        variant=str(variant),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _CORRUPTION_CODES
    text = str(exc)
    return "malformed" in text or "not a database" in text


def check_wal_header(path: str) -> None:
    """Raise CorruptDatabase when ``path`` (a -wal file) exists with content that is not a SQLite WAL.

    SQLite silently ignores such a WAL (and every commit in it): the records it held are lost either way, so it
    is treated like a damaged database (moved aside, logged, rebuilt) instead of passing unnoticed."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(32)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CorruptDatabase(f"cannot read {path}: {exc.strerror}") from None
    if not header:
        return  # an empty WAL is normal after a checkpoint
    if len(header) < 32:
        raise CorruptDatabase(f"{path} is {len(header)} bytes: shorter than a WAL header")
    magic, version = struct.unpack(">II", header[:8])
    if magic not in _WAL_MAGICS or version != _WAL_VERSION:
        raise CorruptDatabase(f"{path} does not start with a SQLite WAL header (magic {magic:#x})")


def quarantine_name(path: str, now: float | None = None) -> str:
    """``agent.db.corrupt-20260102T030405Z`` (a numeric suffix when that name is taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now if now is not None else time.time()))
    base = f"{path}{CORRUPT_MARK}{stamp}"
    candidate, n = base, 1
    while any(os.path.lexists(candidate + s) for s in ("", *SIDE_FILES)):
        n += 1
        candidate = f"{base}.{n}"
    return candidate


class PodStore:
    def __init__(self, state_dir: str, on_corruption: Callable[[str, str], None] | None = None) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._lock = threading.Lock()
        self.listeners: list[Callable[[str, str], None]] = [on_corruption] if on_corruption else []
        self.corruptions = 0  # databases moved aside by this process
        self.epoch = 0  # bumped at every move-aside: a rebuild must start after the last one
        self.needs_rebuild = False
        self.last_corruption = ""
        with self._lock:
            self._db = self._open_or_quarantine()

    # -- opening ------------------------------------------------------------------------------------------
    def _open_or_quarantine(self) -> sqlite3.Connection:
        try:
            return self._open()
        except CorruptDatabase as exc:
            self._quarantine_files(str(exc))
        try:
            return self._open()
        except CorruptDatabase as exc:  # a fresh file cannot be corrupt: something else is wrong here
            raise StoreError(f"cannot create a fresh state database {self.path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        """Open, check and migrate. Raises CorruptDatabase (damage) or StoreError (anything else)."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise StoreError(f"state database {self.path} is not a regular file")
        check_wal_header(self.path + "-wal")
        # SQLite creates the database 0644 and its -wal/-shm with the database's mode: create everything under
        # umask 077, then force 0600 on what existed before.
        old_umask = os.umask(0o077)
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise CorruptDatabase("quick_check: " + "; ".join(p.replace("\n", "; ") for p in problems)[:500])
            _migrate(db)
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if is_corruption(exc):
                raise CorruptDatabase(str(exc)) from None
            raise StoreError(f"cannot open the state database {self.path}: {exc}") from None
        except CorruptDatabase:
            if db is not None:
                db.close()
            raise
        finally:
            os.umask(old_umask)
        for suffix in ("", *SIDE_FILES):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.path + suffix, 0o600)
        return db

    def _quarantine_files(self, why: str) -> str:
        """Move the database and its side files aside. Caller holds the lock (or is the constructor)."""
        target = quarantine_name(self.path)
        for suffix in ("", *SIDE_FILES):
            try:
                os.rename(self.path + suffix, target + suffix)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"state database {self.path} is corrupt ({why}) and cannot be moved aside: "
                                 f"{exc.strerror}") from None
        self.corruptions += 1
        self.epoch += 1
        self.needs_rebuild = True
        self.last_corruption = why
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                listener(why, target)
        return target

    def _recover_locked(self, exc: sqlite3.Error) -> None:
        """A query reported corruption: move the files aside and continue on a fresh database."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._quarantine_files(f"query failed: {exc}")
        self._db = self._open_or_quarantine()

    def _call(self, op: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            try:
                return op(self._db)
            except sqlite3.Error as exc:
                if not is_corruption(exc):
                    raise StoreError(f"state database {self.path}: {exc}") from None
                self._recover_locked(exc)
            try:
                return op(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path} (fresh after a corruption): {exc}") from None

    # -- rebuild bookkeeping --------------------------------------------------------------------------------
    def mark_rebuilt(self, epoch: int) -> bool:
        """The reconciler finished a complete pass that started at ``epoch``: records are rebuilt unless the
        database was moved aside again meanwhile."""
        with self._lock:
            if self.needs_rebuild and epoch == self.epoch:
                self.needs_rebuild = False
                return True
            return False

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- records ------------------------------------------------------------------------------------------
    def upsert(self, record: PodRecord) -> PodRecord:
        now = time.time()

        def op(db: sqlite3.Connection) -> PodRecord:
            existing = db.execute(
                "SELECT created_at FROM pods WHERE container_id=? AND ifname=?", record.key
            ).fetchone()
            created = _float(existing[0]) if existing else (record.created_at or now)
            stored = replace(record, created_at=created, updated_at=now)
            db.execute(
                f"INSERT OR REPLACE INTO pods ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    stored.container_id, stored.ifname, stored.uid, stored.name, stored.namespace,
                    stored.netns_path, stored.netns_inode, json.dumps(list(stored.ips)), stored.state,
                    stored.source, stored.created_at, stored.updated_at, stored.netns_dev, stored.verified_at,
                    stored.variant,
                ),
            )
            return stored

        return self._call(op)

    def get(self, container_id: str, ifname: str) -> PodRecord | None:
        row = self._call(lambda db: db.execute(
            f"SELECT {_COLUMNS} FROM pods WHERE container_id=? AND ifname=?", (container_id, ifname)
        ).fetchone())
        return _row_to_record(row) if row else None

    def by_uid(self, uid: str) -> list[PodRecord]:
        if not uid:
            return []
        rows = self._call(lambda db: db.execute(f"SELECT {_COLUMNS} FROM pods WHERE uid=?", (uid,)).fetchall())
        return [_row_to_record(r) for r in rows]

    def delete(self, container_id: str, ifname: str) -> bool:
        count = self._call(lambda db: db.execute(
            "DELETE FROM pods WHERE container_id=? AND ifname=?", (container_id, ifname)
        ).rowcount)
        return count > 0

    def all(self) -> list[PodRecord]:
        rows = self._call(lambda db: db.execute(f"SELECT {_COLUMNS} FROM pods ORDER BY namespace, name").fetchall())
        return [_row_to_record(r) for r in rows]

    def count(self) -> int:
        return int(self._call(lambda db: db.execute("SELECT COUNT(*) FROM pods").fetchone()[0]))

    def mark_verified(self, keys: Iterable[tuple[str, str]], when: float) -> None:
        """Record that these pods' redirection was found as expected at ``when`` (one transaction)."""
        rows = [(when, cid, ifname) for cid, ifname in keys]
        if not rows:
            return

        def op(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany("UPDATE pods SET verified_at=? WHERE container_id=? AND ifname=?", rows)

        self._call(op)

    def set_variant(self, record: PodRecord, variant: str) -> None:
        """Store the variant now installed for ``record`` (only while the row still describes the same netns)."""
        self._call(lambda db: db.execute(
            "UPDATE pods SET variant=? WHERE container_id=? AND ifname=? AND netns_inode=?",
            (variant, *record.key, record.netns_inode),
        ))

    # -- rules kept after a CNI DEL -----------------------------------------------------------------------------
    def keep_rules(self, record: PodRecord, kept: KeptRules) -> None:
        """One transaction: the pod's record becomes a kept-rules row (the DEL's bookkeeping, crash-safe)."""

        def op(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.execute("DELETE FROM pods WHERE container_id=? AND ifname=?", record.key)
                db.execute(
                    f"INSERT OR REPLACE INTO kept_rules ({_KEPT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (kept.netns_inode, kept.netns_dev, kept.netns_path, kept.container_id, kept.ifname, kept.uid,
                     kept.name, kept.namespace, json.dumps(list(kept.ips)), kept.variant, kept.kept_at),
                )

        self._call(op)

    def kept(self) -> list[KeptRules]:
        rows = self._call(lambda db: db.execute(
            f"SELECT {_KEPT_COLUMNS} FROM kept_rules ORDER BY kept_at").fetchall())
        return [_row_to_kept(r) for r in rows]

    def kept_in(self, inode: int, dev: int) -> KeptRules | None:
        row = self._call(lambda db: db.execute(
            f"SELECT {_KEPT_COLUMNS} FROM kept_rules WHERE netns_inode=? AND netns_dev=?", (inode, dev)
        ).fetchone())
        return _row_to_kept(row) if row else None

    def drop_kept(self, inode: int, dev: int) -> bool:
        count = self._call(lambda db: db.execute(
            "DELETE FROM kept_rules WHERE netns_inode=? AND netns_dev=?", (inode, dev)
        ).rowcount)
        return count > 0

    def set_netns_dev(self, key: tuple[str, str], dev: int) -> None:
        """Fill in the device of a record written before schema 2 (its inode was just verified)."""
        self._call(lambda db: db.execute(
            "UPDATE pods SET netns_dev=? WHERE container_id=? AND ifname=? AND netns_dev=0", (dev, *key)
        ))


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection, begin: str = "BEGIN") -> Iterator[None]:
    """One explicit transaction on an autocommit connection: committed at the end, rolled back on any error."""
    db.execute(begin)
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, or bring an older one up to date (tables and columns added, never dropped)."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    with _transaction(db, "BEGIN IMMEDIATE"):
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        present = {str(row[1]) for row in db.execute("PRAGMA table_info(pods)").fetchall()}
        for column, definition in _ADDED_COLUMNS.items():
            if column not in present:
                db.execute(f"ALTER TABLE pods ADD COLUMN {column} {definition}")
        if int(version) < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
