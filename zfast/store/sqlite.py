"""The embedded store: one SQLite file (WAL, synchronous=FULL), shared by whoever opens it.

A commit is fsynced before ``commit()`` returns, so a node killed right after keeps it. Several
processes may open the same file (two nodes on one machine): revision numbers come from a
``BEGIN IMMEDIATE`` transaction, and ``watch`` polls the file every 200 ms, so it also sees
commits made by other processes. Leases are rows with an expiry, renewed by a keepalive thread:
good enough for the nodes of one machine.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from zfast.store import (
    DEFAULT_MAX_EVENTS,
    Backoff,
    Revision,
    Store,
    StoreError,
    Watch,
    check_name,
    deliver,
    event_time,
    lease_key,
    log,
)

POLL_S = 0.2
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS revisions (
    project TEXT NOT NULL,
    rev     INTEGER NOT NULL,
    config  TEXT NOT NULL,
    who     TEXT NOT NULL,
    time    REAL NOT NULL,
    changes TEXT NOT NULL,   -- JSON list of strings
    source  TEXT NOT NULL,
    PRIMARY KEY (project, rev)
);
CREATE TABLE IF NOT EXISTS events (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    data TEXT NOT NULL       -- the event, JSON
);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS documents (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    key     TEXT PRIMARY KEY,
    holder  TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


def _row_to_revision(row) -> Revision:
    project, rev, config, who, t, changes, source = row
    return Revision(rev=rev, project=project, config=config, who=who, time=t,
                    changes=json.loads(changes), source=source)


_COLUMNS = "project, rev, config, who, time, changes, source"


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, path: Path, node: str, max_events: int = DEFAULT_MAX_EVENTS):
        super().__init__(node)
        self.path = Path(path)
        self.max_events = max_events
        self._lock = threading.RLock()
        self._last_ok: float | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
            self._last_ok = time.time()
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from e

    def _open(self) -> None:
        """Connect, switch to WAL and create the schema. Nodes sharing one file may open it
        at the same instant; the switch to WAL (and WAL recovery) answer SQLITE_BUSY without
        calling the busy handler, so a busy open is tried again until BUSY_TIMEOUT_MS."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            db = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                                 isolation_level=None, check_same_thread=False)
            try:
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch SQLite to WAL (journal_mode {mode})")
                db.execute("PRAGMA synchronous = FULL")
                self._db = db
                with self._tx():
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(stmt)
                return
            except sqlite3.OperationalError as e:
                db.close()
                busy = "locked" in str(e) or "busy" in str(e)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
            except BaseException:
                db.close()
                raise

    # --- plumbing --------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "SqliteStore"):
            self.store = store

        def __enter__(self):
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()
            return False

    def _tx(self) -> "SqliteStore._Tx":
        """A write transaction (BEGIN IMMEDIATE: other writers wait, up to busy_timeout)."""
        return SqliteStore._Tx(self)

    def _query(self, sql: str, args: tuple = ()) -> list:
        try:
            with self._lock:
                rows = self._db.execute(sql, args).fetchall()
            self._last_ok = time.time()
            return rows
        except sqlite3.Error as e:
            raise StoreError(f"SQLite store {self.path}: {e}") from e

    def _write(self, fn: Callable[[sqlite3.Connection], object]):
        try:
            with self._tx() as db:
                result = fn(db)
            self._last_ok = time.time()
            return result
        except sqlite3.Error as e:
            raise StoreError(f"SQLite store {self.path}: {e}") from e

    # --- revisions -------------------------------------------------------------------
    def commit(self, project: str, config_text: str, who: str, changes: list[str],
               source: str) -> Revision:
        check_name("project", project)

        def do(db):
            (prev,) = db.execute("SELECT COALESCE(MAX(rev), 0) FROM revisions WHERE project = ?",
                                 (project,)).fetchone()
            r = Revision(rev=prev + 1, project=project, config=config_text, who=who,
                         time=time.time(), changes=list(changes), source=source)
            self._insert(db, r)
            return r

        return self._write(do)

    @staticmethod
    def _insert(db, r: Revision, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        db.execute(f"{verb} INTO revisions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (r.project, r.rev, r.config, r.who, r.time, json.dumps(r.changes), r.source))

    def remember(self, revs: list[Revision]) -> None:
        """Keep revisions numbered elsewhere (the etcd store's local cache)."""
        if revs:
            self._write(lambda db: [self._insert(db, r, replace=True) for r in revs])

    def latest(self, project: str) -> Revision | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM revisions WHERE project = ? "
                           "ORDER BY rev DESC LIMIT 1", (project,))
        return _row_to_revision(rows[0]) if rows else None

    def get(self, project: str, rev: int) -> Revision:
        rows = self._query(f"SELECT {_COLUMNS} FROM revisions WHERE project = ? AND rev = ?",
                           (project, int(rev)))
        if not rows:
            raise KeyError(f"{project}: no revision {rev}")
        return _row_to_revision(rows[0])

    def history(self, project: str, limit: int = 100) -> list[Revision]:
        rows = self._query(f"SELECT {_COLUMNS} FROM revisions WHERE project = ? "
                           "ORDER BY rev DESC LIMIT ?", (project, int(limit)))
        return [_row_to_revision(r) for r in rows]

    def _latest_rev(self, project: str) -> int:
        return self._query("SELECT COALESCE(MAX(rev), 0) FROM revisions WHERE project = ?",
                           (project,))[0][0]

    def _watch_loop(self, project: str, callback, after: int, w: Watch) -> None:
        last, backoff, failing = after, Backoff(POLL_S, 5.0), False
        while not w.stopped.is_set():
            try:
                if self._latest_rev(project) > last:
                    r = self.latest(project)
                    if r is not None and r.rev > last:
                        last = r.rev
                        deliver(callback, r)
                if failing:
                    log.info("SQLite store %s readable again", self.path)
                failing = False
                backoff.reset()
                w.stopped.wait(POLL_S)
            except StoreError as e:
                if not failing:
                    log.warning("watch of %s: %s (retrying)", project, e)
                failing = True
                w.stopped.wait(backoff.next())

    # --- health and events ---------------------------------------------------------------
    def health(self) -> dict:
        error = None
        try:
            self._query("SELECT COUNT(*) FROM sqlite_master")
            if not os.access(self.path, os.W_OK):
                error = f"{self.path} is not writable"
        except StoreError as e:
            error = str(e)
        return {"kind": self.kind, "ok": error is None, "error": error, "path": str(self.path),
                "last_ok": self._last_ok}

    def add_event(self, event: dict) -> dict:
        event = dict(event)
        event.setdefault("time", time.time())
        event.setdefault("node", self.node)
        data, t = json.dumps(event, default=str), event_time(event)

        def do(db):
            cur = db.execute("INSERT INTO events (time, data) VALUES (?, ?)", (t, data))
            db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - self.max_events,))

        self._write(do)
        return event

    def events(self, since: float | None = None, limit: int | None = None) -> list[dict]:
        where, args = ("WHERE time >= ?", (float(since),)) if since is not None else ("", ())
        if limit is None:
            rows = self._query(f"SELECT data FROM events {where} ORDER BY id", args)
        else:
            rows = self._query(f"SELECT data FROM events {where} ORDER BY id DESC LIMIT ?",
                               args + (int(limit),))[::-1]
        return [json.loads(r[0]) for r in rows]

    # --- leases ------------------------------------------------------------------------
    def put(self, key: str, value: str) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO documents (key, value) VALUES (?, ?)", (key, value)))

    def fetch(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM documents WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def items(self, prefix: str) -> dict[str, str]:
        rows = self._query("SELECT key, value FROM documents WHERE substr(key, 1, ?) = ? "
                           "ORDER BY key", (len(prefix), prefix))
        return dict(rows)

    def lease_campaign(self, name: str, node: str, ttl_s: float,
                       project: str | None = None) -> bool:
        key = lease_key(name, project)

        def do(db):
            now = time.time()
            row = db.execute("SELECT holder, expires FROM leases WHERE key = ?", (key,)).fetchone()
            if row and row[1] > now and row[0] != node:
                return False
            db.execute("INSERT OR REPLACE INTO leases (key, holder, expires) VALUES (?, ?, ?)",
                       (key, node, now + ttl_s))
            return True

        if not self._write(do):
            return False

        def refresh() -> bool:
            return self._write(lambda db: db.execute(
                "UPDATE leases SET expires = ? WHERE key = ? AND holder = ? AND expires > ?",
                (time.time() + ttl_s, key, node, time.time())).rowcount == 1)

        if not self._keeper_running(key, node):
            self._start_keeper(key, node, max(0.05, ttl_s / 3), refresh, lambda: None)
        return True

    def lease_holder(self, name: str, project: str | None = None) -> str | None:
        rows = self._query("SELECT holder FROM leases WHERE key = ? AND expires > ?",
                           (lease_key(name, project), time.time()))
        return rows[0][0] if rows else None

    def lease_resign(self, name: str, node: str, project: str | None = None) -> None:
        key = lease_key(name, project)
        self._stop_keeper(key)
        self._write(lambda db: db.execute("DELETE FROM leases WHERE key = ? AND holder = ?",
                                          (key, node)))

    def close(self) -> None:
        super().close()
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
