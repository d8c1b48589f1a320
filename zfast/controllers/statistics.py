"""The statistics controller: every counter of the node, every second, as time series.

Each ``tick()`` calls ``collect()`` (a ``Node.stats()``-like dict), reads each instance's
CPU and memory (``/proc/<pid>`` or a cgroup directory) and the maps' fill, flattens all
of it into named integer series and stores one row in an embedded SQLite file:

* ``fine``: one row a tick, kept ``fine_keep`` seconds (an hour);
* ``coarse``: the last row of every minute, kept ``coarse_keep`` seconds (a week);
  older rows are dropped. Counters are exact at every minute boundary, so rates over
  minutes stay exact; gauges are sampled at the minute's last tick.

A row is ``(ts_ms, layout, data)``: ``data`` is the zlib-compressed little-endian int64
array of the values, ``layout`` names them (a row of ``layouts`` holds the name list and
the services' VIPs; a new one is written only when the set of series changes, e.g. by an
apply). Every tick is its own transaction (WAL): a daemon killed with SIGKILL loses at
most the tick in progress.

Series names (``/`` separates the parts; no part holds a ``/``)::

    service/<name>/packets|bytes
    backend/<service>/<address>/packets|bytes|weight|healthy
    port/<address>/<port>/<proto>/packets|allowed|denied|rate_limited
    drop/<reason>                     packets (reason as in stats' "drops")
    verdict/<reason>/packets|bytes
    flows                             entries of the flow table (gauge)
    cpu/<instance>                    CPU time, microseconds (counter)
    memory/<instance>                 bytes (gauge)
    map/<name>/entries|max            fill of a BPF map (gauges)

Rates come from reset-aware deltas: a counter that goes down (the daemon restarted with
fresh maps, a backend slot was reused) restarted from zero, so the delta is its new value,
never negative.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import sqlite3
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

log = logging.getLogger("zfast.statistics")

FILE_NAME = "stats.sqlite"
FINE_KEEP_S = 3600.0           # 1 s samples for an hour
COARSE_STEP_S = 60             # then one sample a minute
COARSE_KEEP_S = 7 * 86400.0    # for a week; older rows are dropped
MISSING = -1                   # no value (counters and gauges are never negative)
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

# Series that are gauges (everything else is a counter)
_GAUGE_SUFFIXES = ("/weight", "/healthy", "/entries", "/max")


def is_gauge(name: str) -> bool:
    return name == "flows" or name.startswith("memory/") or name.endswith(_GAUGE_SUFFIXES)


# ---------------------------------------------------------------- resources

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_resources(path: str | Path) -> tuple[int, int]:
    """(CPU time in microseconds, memory in bytes) of a process (``/proc/<pid>``, e.g.
    ``/proc/self``) or of a cgroup directory (v2: cpu.stat, memory.current; v1 cpuacct
    and memory directories work too)."""
    p = Path(path)
    if (p / "cpu.stat").exists() and (p / "memory.current").exists():
        usec = 0
        for line in (p / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                usec = int(line.split()[1])
                break
        return usec, int((p / "memory.current").read_text())
    if (p / "cpuacct.usage").exists():
        usec = int((p / "cpuacct.usage").read_text()) // 1000
        mem_file = p / "memory.usage_in_bytes"
        return usec, int(mem_file.read_text()) if mem_file.exists() else MISSING
    stat = (p / "stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "
    ticks = int(fields[11]) + int(fields[12])      # utime + stime
    rss_pages = int((p / "statm").read_text().split()[1])
    return ticks * 1_000_000 // _CLK_TCK, rss_pages * _PAGE


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()   # e.g. "0-3"
    return sum(int(b) - int(a) + 1 if b else 1
               for a, _, b in (part.partition("-") for part in text.split(",")))


def count_entries(map_fd: int, chunk: int = 4096) -> tuple[int, int]:
    """(entries, max_entries) of a BPF hash map by BPF_MAP_LOOKUP_BATCH: a few syscalls
    for the whole map (get_next_key would be one a key). For the flow table:
    ``count_entries(node.dp.table("flows").map_fd)``; a pinned map:
    ``count_entries(zfast.dataplane.bpflib.lib.bpf_obj_get(path.encode()))``."""
    from zfast.dataplane.mapbatch import lookup_batches

    info = {}
    with open(f"/proc/self/fdinfo/{map_fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    key_size, value_size = int(info["key_size"]), int(info["value_size"])
    max_entries = int(info["max_entries"])
    if info.get("map_type") in ("5", "6", "10"):     # per-CPU hash, array, LRU hash
        value_size = (value_size + 7) // 8 * 8 * _possible_cpus()
    total = sum(n for _, _, n in lookup_batches(map_fd, key_size, value_size, chunk))
    return total, max_entries


# ---------------------------------------------------------------- flattening

def flatten(stats: Mapping, resources: Mapping[str, tuple[int, int]] | None = None,
            maps: Mapping[str, tuple[int, int]] | None = None) -> tuple[list[str], list[int], dict]:
    """A stats dict (Node.stats()) as (names, integer values, meta)."""
    names: list[str] = []
    values: list[int] = []
    add_n, add_v = names.append, values.append
    vips = {}
    for svc in stats.get("services", ()):
        n = svc["name"]
        vips[n] = svc.get("vip")
        add_n(f"service/{n}/packets"); add_v(svc["packets"])
        add_n(f"service/{n}/bytes"); add_v(svc["bytes"])
        for be in svc.get("backends", ()):
            prefix = f"backend/{n}/{be['address']}/"
            add_n(prefix + "packets"); add_v(be["packets"])
            add_n(prefix + "bytes"); add_v(be["bytes"])
            if "weight" in be:
                add_n(prefix + "weight"); add_v(be["weight"])
            if "healthy" in be:
                add_n(prefix + "healthy"); add_v(1 if be["healthy"] else 0)
    for pp in stats.get("public_ports", ()):
        prefix = f"port/{pp.get('address', '*')}/{pp['port']}/{pp['proto']}/"
        for key in ("packets", "allowed", "denied", "rate_limited"):
            if key in pp:
                add_n(prefix + key); add_v(pp[key])
    for reason, packets in stats.get("drops", {}).items():
        add_n(f"drop/{reason}"); add_v(packets)
    for reason, v in stats.get("verdicts", {}).items():
        add_n(f"verdict/{reason}/packets"); add_v(v["packets"])
        add_n(f"verdict/{reason}/bytes"); add_v(v["bytes"])
    flows = stats.get("flows")
    if flows is None and maps and "flows" in maps:
        flows = maps["flows"][0]
    if flows is not None:
        add_n("flows"); add_v(flows)
    for inst, (cpu, mem) in (resources or {}).items():
        add_n(f"cpu/{inst}"); add_v(cpu)
        add_n(f"memory/{inst}"); add_v(mem)
    for name, (entries, most) in (maps or {}).items():
        add_n(f"map/{name}/entries"); add_v(entries)
        add_n(f"map/{name}/max"); add_v(most)
    return names, values, {"services": vips}


# ---------------------------------------------------------------- series

def deltas(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reset-aware deltas of counter columns m (n, k) int64 (MISSING where absent):
    (d (n-1, k) int64, valid (n-1, k) bool). A counter that went down restarted at 0,
    so its delta is its new value: never negative."""
    prev, cur = m[:-1], m[1:]
    valid = (prev >= 0) & (cur >= 0)
    d = cur - prev
    d = np.where(d < 0, cur, d)
    return np.where(valid, d, 0), valid


@dataclass
class Series:
    """Samples from ``since`` to ``until``: ``time`` (n,) seconds, one int64 column per name
    (MISSING where that series was absent: before it existed, after it went away)."""

    time: np.ndarray
    names: list[str]
    matrix: np.ndarray                       # (n, len(names)) int64
    meta: dict = field(default_factory=dict)  # the last layout's meta ({"services": {name: vip}})

    def __len__(self) -> int:
        return len(self.time)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.matrix[:, self._index[name]]

    def get(self, name: str) -> np.ndarray:
        """Values as float64, NaN where absent (for gauges and plots)."""
        col = self[name].astype(np.float64)
        col[col < 0] = np.nan
        return col

    def delta(self, name: str) -> np.ndarray:
        """Reset-aware increase between consecutive samples, (n-1,) int64 (0 where unknown)."""
        d, _ = deltas(self[name][:, None])
        return d[:, 0]

    def total(self, name: str) -> int:
        """Increase of a counter over the whole series, resets counted."""
        return int(self.delta(name).sum()) if len(self) > 1 else 0

    def rate(self, name: str) -> np.ndarray:
        """Per second, (n,) float64: NaN for the first sample and where unknown."""
        out = np.full(len(self), np.nan)
        if len(self) < 2:
            return out
        d, valid = deltas(self[name][:, None])
        dt = np.diff(self.time)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = d[:, 0] / dt
        r[~valid[:, 0] | (dt <= 0)] = np.nan
        out[1:] = r
        return out

    def matching(self, pattern: str) -> list[str]:
        return [n for n in self.names if fnmatch.fnmatchcase(n, pattern)]

    def to_json(self) -> dict:
        """{"time": [...], "series": {name: [int | None, ...]}, "meta": ...} (for the API)."""
        return {"time": self.time.tolist(),
                "series": {n: [None if v < 0 else int(v) for v in self.matrix[:, i]]
                           for i, n in enumerate(self.names)},
                "meta": self.meta}

    @classmethod
    def from_json(cls, doc: dict) -> "Series":
        names = list(doc["series"])
        n = len(doc["time"])
        m = np.full((n, len(names)), MISSING, dtype=np.int64)
        for j, name in enumerate(names):
            col = doc["series"][name]
            m[:, j] = [MISSING if v is None else v for v in col]
        return cls(np.asarray(doc["time"], dtype=np.float64), names, m, doc.get("meta", {}))


def _selector(names: Iterable[str] | None) -> Callable[[str], bool]:
    if names is None:
        return lambda _n: True
    exact = {n for n in names if not any(c in n for c in "*?[")}
    patterns = [n for n in names if n not in exact]
    return lambda n: n in exact or any(fnmatch.fnmatchcase(n, p) for p in patterns)


def _percentiles(rates: np.ndarray, qs=(50, 99)) -> np.ndarray:
    """nanpercentile of each column, NaN for columns with no value (no warning)."""
    if rates.shape[0] == 0:
        return np.full((len(qs), rates.shape[1]), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(rates, qs, axis=0)


def _num(x) -> float | None:
    """A JSON-friendly float (None for NaN)."""
    x = float(x)
    return None if x != x else round(x, 3)


# ---------------------------------------------------------------- the store

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
        want = _selector(names)
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


def summarize(s: Series) -> dict:
    """Totals and rates of a Series: {"since", "until", "seconds", "samples", "services": [{
    "name", "vip", "packets", "bytes", "pps", "bps", "p50_pps", "p99_pps", "max_pps",
    "backends": [{"address", "packets", "bytes", "pps", "bps", "p50_pps", "p99_pps",
    "weight", "healthy"}]}], "public_ports": [...], "drops": {reason: {"packets", "pps"}},
    "flows": {"last", "max"}, "instances": {name: {"cpu", "cpu_p99", "memory"}},
    "maps": {name: {"entries", "max", "fill"}}}. Packets and bytes are the increase over the
    window (resets counted); pps its average; p50/p99/max of the per-sample rates."""
    n = len(s)
    out = {"since": float(s.time[0]) if n else None, "until": float(s.time[-1]) if n else None,
           "seconds": float(s.time[-1] - s.time[0]) if n > 1 else 0.0, "samples": n,
           "services": [], "public_ports": [], "drops": {}, "flows": None, "instances": {},
           "maps": {}}
    if n == 0:
        return out
    seconds = out["seconds"]
    counters = [j for j, name in enumerate(s.names) if not is_gauge(name)]
    stats: dict[str, dict] = {}
    if n > 1 and counters:
        dt = np.diff(s.time)
        for lo in range(0, len(counters), 512):     # bounded temporaries with many series
            cols = counters[lo:lo + 512]
            d, valid = deltas(s.matrix[:, cols])
            with np.errstate(divide="ignore", invalid="ignore"):
                r = d / dt[:, None]
            r[~valid | (dt[:, None] <= 0)] = np.nan
            p50, p99 = _percentiles(r)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                peak = np.nanmax(r, axis=0) if r.shape[0] else np.full(len(cols), np.nan)
            total = d.sum(axis=0)
            for k, j in enumerate(cols):
                stats[s.names[j]] = {"total": int(total[k]), "p50": p50[k], "p99": p99[k],
                                     "max": peak[k]}
    last = s.matrix[-1]

    def counter(name: str) -> dict:
        st = stats.get(name, {"total": 0, "p50": np.nan, "p99": np.nan, "max": np.nan})
        return {"total": st["total"], "rate": st["total"] / seconds if seconds > 0 else None,
                "p50": _num(st["p50"]), "p99": _num(st["p99"]), "max": _num(st["max"])}

    def gauge_last(name: str) -> int | None:
        if name not in s:
            return None
        col = s[name]
        present = col[col >= 0]
        return int(present[-1]) if len(present) else None

    services: dict[str, dict] = {}
    for name in s.names:
        parts = name.split("/")
        if parts[0] == "service" and parts[2] == "packets":
            svc = parts[1]
            p, b = counter(name), counter(f"service/{svc}/bytes")
            services[svc] = {"name": svc, "vip": s.meta.get("services", {}).get(svc),
                             "packets": p["total"], "bytes": b["total"],
                             "pps": _num(p["rate"]) if p["rate"] is not None else None,
                             "bps": _num(b["rate"]) if b["rate"] is not None else None,
                             "p50_pps": p["p50"], "p99_pps": p["p99"], "max_pps": p["max"],
                             "present": bool(last[s._index[name]] >= 0), "backends": []}
    for name in s.names:
        parts = name.split("/")
        if parts[0] == "backend" and parts[3] == "packets" and parts[1] in services:
            prefix = f"backend/{parts[1]}/{parts[2]}/"
            p, b = counter(name), counter(prefix + "bytes")
            healthy = gauge_last(prefix + "healthy")
            services[parts[1]]["backends"].append({
                "address": parts[2], "packets": p["total"], "bytes": b["total"],
                "pps": _num(p["rate"]) if p["rate"] is not None else None,
                "bps": _num(b["rate"]) if b["rate"] is not None else None,
                "p50_pps": p["p50"], "p99_pps": p["p99"], "max_pps": p["max"],
                "weight": gauge_last(prefix + "weight"),
                "healthy": None if healthy is None else bool(healthy),
                "present": bool(last[s._index[name]] >= 0)})
        elif parts[0] == "port" and parts[4] == "packets":
            prefix = "/".join(parts[:4]) + "/"
            p = counter(name)
            entry = {"address": parts[1], "port": int(parts[2]), "proto": parts[3],
                     "packets": p["total"],
                     "pps": _num(p["rate"]) if p["rate"] is not None else None,
                     "p99_pps": p["p99"]}
            for key in ("allowed", "denied", "rate_limited"):
                if prefix + key in s:
                    entry[key] = counter(prefix + key)["total"]
            out["public_ports"].append(entry)
        elif parts[0] == "drop":
            p = counter(name)
            out["drops"][parts[1]] = {"packets": p["total"],
                                      "pps": _num(p["rate"]) if p["rate"] is not None else None}
        elif parts[0] == "cpu":
            c = counter(name)
            mem = s.get(f"memory/{parts[1]}") if f"memory/{parts[1]}" in s else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["instances"][parts[1]] = {
                    # microseconds of CPU a second / 1e6: the share of one CPU
                    "cpu": _num(c["rate"] / 1e6) if c["rate"] is not None else None,
                    "cpu_p99": _num(c["p99"] / 1e6) if c["p99"] is not None else None,
                    "memory": gauge_last(f"memory/{parts[1]}"),
                    "memory_max": _num(np.nanmax(mem)) if mem is not None else None}
        elif parts[0] == "map" and parts[2] == "entries":
            entries, most = gauge_last(name), gauge_last(f"map/{parts[1]}/max")
            fill = round(entries / most, 6) if entries is not None and most and most > 0 else None
            out["maps"][parts[1]] = {"entries": entries, "max": most, "fill": fill}
    out["services"] = list(services.values())
    if "flows" in s:
        flows = s.get("flows")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out["flows"] = {"last": gauge_last("flows"), "max": _num(np.nanmax(flows))}
    return out


# ---------------------------------------------------------------- the controller

class StatisticsController:
    """Samples ``collect()`` every ``interval`` seconds into the store at ``path``.

    resources: {instance name: "/proc/self" | "/proc/<pid>" | cgroup directory};
    default {"self": "/proc/self"}. map_fill: a callable returning {map name: (entries,
    max_entries)} (e.g. the flow table, see count_entries), called every map_fill_interval
    seconds at most (and less often when it is slow: it stays under 1% of a CPU); its "flows"
    entry also gives the ``flows`` series when the stats dict has no "flows".
    on_error(message): called when
    a tick fails with an error unlike the previous one (wire it to the event log).
    """

    def __init__(self, collect: Callable[[], dict], path: Path, clock: Callable[[], float] = time.time,
                 interval: float = 1.0, resources: Mapping[str, str | Path] | None = None,
                 map_fill: Callable[[], Mapping[str, tuple[int, int] | int]] | None = None,
                 on_error: Callable[[str], None] | None = None, fine_keep: float = FINE_KEEP_S,
                 coarse_keep: float = COARSE_KEEP_S, coarse_step: int = COARSE_STEP_S,
                 synchronous: str = "NORMAL", map_fill_interval: float = 5.0):
        self.collect = collect
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / FILE_NAME
        self.clock = clock
        self.interval = interval
        self.resources = dict(resources) if resources is not None else {"self": "/proc/self"}
        self.map_fill = map_fill
        self.map_fill_interval = map_fill_interval
        self._maps: dict | None = None
        self._maps_next = 0.0
        self.on_error = on_error
        self.fine_keep, self.coarse_keep, self.coarse_step = fine_keep, coarse_keep, coarse_step
        self.store = StatsStore(self.path, synchronous=synchronous)
        hi = self.store.bounds("fine")[1]
        self._bucket = int(hi // coarse_step) if hi is not None else None
        self._latest: dict | None = None
        self._prev: tuple[float, dict[str, int]] | None = None
        self._cur: tuple[float, dict[str, int]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.ticks = 0
        self.errors = 0
        self.last_error: str | None = None
        self.last_tick: float | None = None
        self.last_tick_s = 0.0      # wall time the last tick took
        self.last_row_bytes = 0

    # ---- life cycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="statistics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.store.close()

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            try:
                self.tick()
            except Exception:  # tick() records it; the loop goes on
                pass
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:           # fell behind (a slow collect): no burst of catch-up ticks
                next_at = now + self.interval
            if self._stop.wait(next_at - now):
                return

    # ---- one collection

    def _read_resources(self) -> dict[str, tuple[int, int]]:
        out = {}
        for inst, path in self.resources.items():
            try:
                out[inst] = read_resources(path)
            except (OSError, ValueError, IndexError):
                out[inst] = (MISSING, MISSING)   # an instance that is gone: no value
        return out

    def _read_maps(self, now: float) -> dict[str, tuple[int, int]]:
        """map_fill(), at most every map_fill_interval seconds and never more than 1% of a
        CPU (counting a full 1M-entry flow table takes ~0.3 s): the last value in between."""
        if self.map_fill is None:
            return {}
        if self._maps is not None and now < self._maps_next:
            return self._maps
        started = time.process_time()
        out = {}
        for name, v in self.map_fill().items():
            out[name] = (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), MISSING)
        cost = time.process_time() - started
        self._maps, self._maps_next = out, now + max(self.map_fill_interval, 100 * cost)
        return out

    def tick(self) -> dict:
        """Collect once and store one row (committed before this returns). Returns the
        sample (the collected dict with "instances", "maps" and "flows" added)."""
        started = time.perf_counter()
        now = self.clock()
        try:
            stats = self.collect()
            resources = self._read_resources()
            maps = self._read_maps(now)
            names, values, meta = flatten(stats, resources, maps)
            self.last_row_bytes = self.store.insert(now, names, values, meta)
            bucket = int(now // self.coarse_step)
            if self._bucket is not None and bucket > self._bucket:
                self.store.rollup(now, self.fine_keep, self.coarse_keep, self.coarse_step)
            self._bucket = bucket if self._bucket is None else max(bucket, self._bucket)
        except Exception as err:
            self.errors += 1
            message = f"statistics: {type(err).__name__}: {err}"
            if message != self.last_error:
                log.warning("%s", message)
                if self.on_error is not None:
                    try:
                        self.on_error(message)
                    except Exception:
                        pass
            self.last_error = message
            raise
        self.last_error = None
        sample = dict(stats)
        sample["time"] = now
        sample["instances"] = {k: {"cpu_seconds": c / 1e6 if c >= 0 else None,
                                   "memory_bytes": m if m >= 0 else None}
                               for k, (c, m) in resources.items()}
        sample["maps"] = {k: {"entries": e, "max": m if m >= 0 else None} for k, (e, m) in maps.items()}
        if "flows" not in sample and "flows" in maps:
            sample["flows"] = maps["flows"][0]
        self._latest = sample
        self._prev, self._cur = self._cur, (now, dict(zip(names, values)))
        self.ticks += 1
        self.last_tick = now
        self.last_tick_s = time.perf_counter() - started
        return sample

    # ---- reads

    def latest(self) -> dict | None:
        """The last sample (what tick() returned): a Node.stats()-like dict. Prometheus
        scrapes can read this instead of the maps."""
        return self._latest

    def stored_latest(self) -> tuple[float, dict[str, int]] | None:
        """The newest row in the store, read back: (time, {series name: value})."""
        return self.store.latest()

    def current(self) -> dict | None:
        """The last sample with rates from the last two ticks (for ``zfast stats --watch``):
        "pps" and "bps" on every service and backend, "pps" on every public port and in
        "drop_pps" {reason: pps}."""
        if self._latest is None:
            return None
        out = json.loads(json.dumps(self._latest, default=str))
        if self._prev is None:
            return out
        (t0, a), (t1, b) = self._prev, self._cur
        dt = t1 - t0

        def rate(name: str) -> float | None:
            if dt <= 0 or name not in a or name not in b or a[name] < 0 or b[name] < 0:
                return None
            d = b[name] - a[name]
            return round((d if d >= 0 else b[name]) / dt, 3)

        for svc in out.get("services", []):
            svc["pps"] = rate(f"service/{svc['name']}/packets")
            svc["bps"] = rate(f"service/{svc['name']}/bytes")
            for be in svc.get("backends", []):
                be["pps"] = rate(f"backend/{svc['name']}/{be['address']}/packets")
                be["bps"] = rate(f"backend/{svc['name']}/{be['address']}/bytes")
        for pp in out.get("public_ports", []):
            pp["pps"] = rate(f"port/{pp.get('address', '*')}/{pp['port']}/{pp['proto']}/packets")
        out["drop_pps"] = {r: rate(f"drop/{r}") for r in out.get("drops", {})}
        out["interval"] = dt
        return out

    def series(self, since: float, until: float | None = None, names: Iterable[str] | None = None,
               step: float | None = None) -> Series:
        """Stored samples in [since, until]; names: exact series names or fnmatch patterns
        ("backend/app/*/packets"); None = every series."""
        return self.store.series(since, until, names, step)

    def summary(self, since: float, until: float | None = None) -> dict:
        """For ``zfast stats --since 10m``: see summarize()."""
        return self.store.summary(since, until)

    def status(self) -> dict:
        """For ``zfast status``'s controllers section."""
        return {"healthy": self.last_error is None and self._thread is not None,
                "ticks": self.ticks, "errors": self.errors, "last_error": self.last_error,
                "last_tick": self.last_tick, "tick_ms": round(self.last_tick_s * 1000, 3),
                "row_bytes": self.last_row_bytes, "store": str(self.path),
                "store_bytes": self.store.size()}


# ---------------------------------------------------------------- API and readers

def open_reader(path: Path) -> StatsStore:
    """A read-only view of a node's store (``zfast report`` / ``stats --since`` can read the
    file while the daemon writes it): .series(), .summary(), .latest()."""
    path = Path(path)
    return StatsStore(path / FILE_NAME if path.is_dir() else path, readonly=True)


def api_routes(ctl: StatisticsController, clock: Callable[[], float] = time.time) -> dict:
    """Control API routes of the controller (merge into Node.routes()):

    POST /stats/summary {"since": seconds ago or epoch, "until"?}  -> summary
    POST /stats/series  {"since", "until"?, "names"?: [..], "step"?} -> Series.to_json()
    GET  /stats/current                                            -> current()
    A "since" below 10^9 is seconds before now (600 = the last 10 minutes)."""

    def when(v, default=None):
        if v is None:
            return default
        v = float(v)
        return clock() - v if v < 1e9 else v

    def summary(body):
        body = body or {}
        if "since" not in body:
            return 400, {"error": "summary needs {\"since\": seconds ago or epoch time}"}
        return 200, ctl.summary(when(body["since"]), when(body.get("until")))

    def series(body):
        body = body or {}
        if "since" not in body:
            return 400, {"error": "series needs {\"since\": seconds ago or epoch time}"}
        return 200, ctl.series(when(body["since"]), when(body.get("until")), body.get("names"),
                               body.get("step")).to_json()

    def current(_body):
        cur = ctl.current()
        return (200, cur) if cur is not None else (503, {"error": "no sample yet"})

    return {("POST", "/stats/summary"): summary, ("POST", "/stats/series"): series,
            ("GET", "/stats/current"): current}
