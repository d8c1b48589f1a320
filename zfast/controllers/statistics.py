"""The statistics controller: every counter of the node, every second, as time series.

Each ``tick()`` calls ``collect()`` (a ``Node.stats()``-like dict), reads each instance's
CPU and memory (``/proc/<pid>`` or a cgroup directory) and the maps' fill, flattens all
of it into named integer series (zfast.telemetry.serieskeys) and stores one row in the
statistics store (zfast.telemetry.seriesstore: an hour of 1 s rows, a week of 1 min rows),
whose summaries (zfast.telemetry.summaries) answer ``zfast stats --since``.

``open_reader`` and ``Series`` are the store's, importable from here too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from zfast.dataplane.mapbatch import lookup_batches
from zfast.telemetry.series import MISSING, Series
from zfast.telemetry.serieskeys import SeriesKey, flatten
from zfast.telemetry.seriesstore import (
    COARSE_KEEP_S,
    COARSE_STEP_S,
    FILE_NAME,
    FINE_KEEP_S,
    StatsStore,
    open_reader,
)

__all__ = ["StatisticsController", "api_routes", "read_resources", "count_entries",
           "open_reader", "Series"]

log = logging.getLogger("zfast.statistics")

# ---------------------------------------------------------------- what a tick reads

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
            key = SeriesKey("service", service=svc["name"], field="packets")
            svc["pps"], svc["bps"] = rate(key.name), rate(key.sibling(field="bytes"))
            for be in svc.get("backends", []):
                key = SeriesKey("backend", service=svc["name"], address=be["address"], field="packets")
                be["pps"], be["bps"] = rate(key.name), rate(key.sibling(field="bytes"))
        for pp in out.get("public_ports", []):
            pp["pps"] = rate(SeriesKey("port", address=pp.get("address", "*"), port=pp["port"],
                                       proto=pp["proto"], field="packets").name)
        out["drop_pps"] = {r: rate(SeriesKey("drop", reason=r).name) for r in out.get("drops", {})}
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


# ---------------------------------------------------------------- API

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
