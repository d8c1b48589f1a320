"""The statistics store: an embedded SQLite file of samples, kept at two resolutions.

* ``fine``: one row a tick, kept ``fine_keep`` seconds (an hour);
* ``coarse``: the last row of every minute, kept ``coarse_keep`` seconds (a week);
  older rows are dropped. Counters are exact at every minute boundary, so rates over
  minutes stay exact; gauges are sampled at the minute's last tick.

A row is ``(ts_ms, layout, data)``: ``data`` is the zlib-compressed little-endian int64
array of the values, ``layout`` names them (a row of ``layouts`` holds the name list and
the services' VIPs; a new one is written only when the set of series changes, e.g. by an
apply). Every insert is its own transaction (WAL): a daemon killed with SIGKILL loses at
most the tick in progress.

The store does not know what the names mean (serieskeys.py does); readers get a Series.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np

from zfast.telemetry.series import MISSING, Series, name_selector
from zfast.telemetry.summaries import summarize

FILE_NAME = "stats.sqlite"
FINE_KEEP_S = 3600.0           # 1 s samples for an hour
COARSE_STEP_S = 60             # then one sample a minute
COARSE_KEEP_S = 7 * 86400.0    # for a week; older rows are dropped
SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layouts (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: readers cache layouts by id
    names TEXT NOT NULL,        -- JSON list of series names, in the order of the values
    meta  TEXT NOT NULL         -- JSON: {"services": {name: vip}}
);
CREATE TABLE IF NOT EXISTS fine (
    ts     INTEGER PRIMARY KEY, -- milliseconds since the epoch
    layout INTEGER NOT NULL,
    data   BLOB NOT NULL        -- zlib(int64 little-endian values)
);
CREATE TABLE IF NOT EXISTS coarse (
    ts     INTEGER PRIMARY KEY,
    layout INTEGER NOT NULL,
    data   BLOB NOT NULL
);
"""


class StatsStore:
    """The SQLite file: rows, layouts, downsampling. Thread-safe (one connection, a lock)."""

    def __init__(self, path: Path, readonly: bool = False, synchronous: str = "NORMAL"):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(f"no statistics store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5,
                                      isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=5, isolation_level=None,
                                      check_same_thread=False)
            self.db.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL: a commit is in the file (the OS's cache) when execute returns, so
            # a SIGKILLed daemon keeps every tick; only a power cut may lose the last ones.
            self.db.execute(f"PRAGMA synchronous = {synchronous}")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO info VALUES ('schema', ?)", (SCHEMA_VERSION,))
        self.db.execute("PRAGMA busy_timeout = 5000")
        self._layouts: dict[int, tuple[list[str], dict]] = {}
        self._layout_ids: dict[tuple, int] = {}

    def close(self) -> None:
        with self._lock:
            self.db.close()

    # ---- layouts

    def layout(self, lid: int) -> tuple[list[str], dict]:
        got = self._layouts.get(lid)
        if got is None:
            row = self.db.execute("SELECT names, meta FROM layouts WHERE id = ?", (lid,)).fetchone()
            if row is None:
                raise KeyError(f"layout {lid} missing from {self.path}")
            got = (json.loads(row[0]), json.loads(row[1]))
            self._layouts[lid] = got
            self._layout_ids[(tuple(got[0]), json.dumps(got[1], sort_keys=True))] = lid
        return got

    def layout_id(self, names: list[str], meta: dict) -> int:
        key = (tuple(names), json.dumps(meta, sort_keys=True))
        lid = self._layout_ids.get(key)
        if lid is None:
            row = self.db.execute("SELECT id FROM layouts WHERE names = ? AND meta = ?",
                                  (json.dumps(names), key[1])).fetchone()
            if row is None:
                cur = self.db.execute("INSERT INTO layouts (names, meta) VALUES (?, ?)",
                                      (json.dumps(names), key[1]))
                lid = cur.lastrowid
            else:
                lid = row[0]
            self._layout_ids[key] = lid
            self._layouts[lid] = (list(names), meta)
        return lid

    # ---- writes

    def insert(self, ts: float, names: list[str], values: list[int], meta: dict) -> int:
        data = zlib.compress(np.asarray(values, dtype="<i8").tobytes(), 1)
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                lid = self.layout_id(names, meta)
                self.db.execute("INSERT OR REPLACE INTO fine VALUES (?, ?, ?)",
                                (int(round(ts * 1000)), lid, data))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                self._layout_ids.clear()   # a rolled-back layout id must not be reused
                self._layouts.clear()
                raise
        return len(data)

    def rollup(self, upto: float, fine_keep: float, coarse_keep: float, step: int) -> None:
        """Copy the last fine row of every complete step (minute) before upto into coarse,
        then drop fine rows older than fine_keep, coarse rows older than coarse_keep and
        layouts no row uses."""
        step_ms = step * 1000
        upto_ms = int(upto * 1000) // step_ms * step_ms
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                last = self.db.execute("SELECT max(ts) FROM coarse").fetchone()[0]
                start = (last // step_ms + 1) * step_ms if last is not None else 0
                if start < upto_ms:
                    self.db.execute(
                        "INSERT OR REPLACE INTO coarse (ts, layout, data) "
                        "SELECT max(ts), layout, data FROM fine WHERE ts >= ? AND ts < ? "
                        "GROUP BY ts / ?", (start, upto_ms, step_ms))
                now_ms = int(upto * 1000)
                self.db.execute("DELETE FROM fine WHERE ts < ?", (now_ms - int(fine_keep * 1000),))
                self.db.execute("DELETE FROM coarse WHERE ts < ?", (now_ms - int(coarse_keep * 1000),))
                gone = [r[0] for r in self.db.execute(
                    "SELECT id FROM layouts WHERE id NOT IN (SELECT layout FROM fine) "
                    "AND id NOT IN (SELECT layout FROM coarse)")]
                if gone:
                    self.db.executemany("DELETE FROM layouts WHERE id = ?", [(g,) for g in gone])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            for g in gone:
                meta = self._layouts.pop(g, None)
                if meta is not None:
                    self._layout_ids.pop((tuple(meta[0]), json.dumps(meta[1], sort_keys=True)), None)

    # ---- reads

    def bounds(self, table: str) -> tuple[float | None, float | None]:
        lo, hi = self.db.execute(f"SELECT min(ts), max(ts) FROM {table}").fetchone()
        return (lo / 1000 if lo is not None else None, hi / 1000 if hi is not None else None)

    def latest(self) -> tuple[float, dict[str, int]] | None:
        """The newest stored sample: (time, {name: value})."""
        with self._lock:
            row = self.db.execute("SELECT ts, layout, data FROM fine ORDER BY ts DESC LIMIT 1").fetchone()
            if row is None:
                return None
            names, _ = self.layout(row[1])
        values = np.frombuffer(zlib.decompress(row[2]), dtype="<i8")
        return row[0] / 1000, {n: int(v) for n, v in zip(names, values)}

    def _rows(self, table: str, since_ms: int, until_ms: int) -> list:
        return self.db.execute(f"SELECT ts, layout, data FROM {table} WHERE ts >= ? AND ts <= ? "
                               "ORDER BY ts", (since_ms, until_ms)).fetchall()

    def series(self, since: float, until: float | None = None, names: Iterable[str] | None = None,
               step: float | None = None) -> Series:
        """Samples in [since, until]: 1 s rows where the fine table still has them, minute
        rows before (or minute rows only when step >= 60)."""
        since_ms = int(since * 1000)
        until_ms = int(until * 1000) if until is not None else 2 ** 62
        with self._lock:
            if step is not None and step >= COARSE_STEP_S:
                rows = self._rows("coarse", since_ms, until_ms)
            else:
                fine = self._rows("fine", since_ms, until_ms)
                first_fine = fine[0][0] if fine else until_ms + 1
                rows = self._rows("coarse", since_ms, min(until_ms, first_fine - 1)) + fine
            layouts = {lid: self.layout(lid) for lid in {r[1] for r in rows}}
        want = name_selector(names)
        order: dict[str, int] = {}
        for lid in sorted(layouts):
            for n in layouts[lid][0]:
                if n not in order and want(n):
                    order[n] = len(order)
        out = np.full((len(rows), len(order)), MISSING, dtype=np.int64)
        by_layout: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_layout.setdefault(r[1], []).append(i)
        for lid, idx in by_layout.items():
            lnames = layouts[lid][0]
            src = [j for j, n in enumerate(lnames) if n in order]
            if not src:
                continue
            dst = [order[lnames[j]] for j in src]
            block = np.stack([np.frombuffer(zlib.decompress(rows[i][2]), dtype="<i8") for i in idx])
            out[np.ix_(idx, dst)] = block[:, src]
        times = np.array([r[0] / 1000 for r in rows], dtype=np.float64)
        meta = layouts[rows[-1][1]][1] if rows else {}
        return Series(times, list(order), out, meta)

    def summary(self, since: float, until: float | None = None) -> dict:
        """Packets, bytes and rates per service, backend, public port and drop reason over
        [since, until] (see summarize)."""
        return summarize(self.series(since, until))

    def size(self) -> int:
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal"))
                   if os.path.exists(p))


def open_reader(path: Path) -> StatsStore:
    """A read-only view of a node's store (``zfast report`` / ``stats --since`` can read the
    file while the daemon writes it): .series(), .summary(), .latest()."""
    path = Path(path)
    return StatsStore(path / FILE_NAME if path.is_dir() else path, readonly=True)
