"""CPU and disk cost of the statistics controller: N ticks of a synthetic stats dict.

    .venv/bin/python -m tools.stats_bench [--backends 1000] [--ticks 600] [--services 10]

Measures process CPU time (time.process_time: user + system of every thread) of N
``tick()`` calls with a fake clock one second apart (the collect callable hands back a
prebuilt Node.stats()-like dict whose counters are those of a node up for days and move
every second as traffic would, so rows compress as real ones), then
prints the CPU share of one CPU at one tick a second, the bytes of a row, and the size the
store reaches with a week of it (an hour of 1 s rows + a week of 1 min rows), measured by
filling a store with that many rows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zfast.controllers import statistics
from zfast.telemetry import seriesstore
from zfast.telemetry.serieskeys import flatten


def synthetic(services: int, backends: int, ports: int = 20, reasons: int = 30):
    """A stats dict of `backends` backends over `services` services, and a function that
    moves its counters the way traffic would (every backend some packets a second)."""
    per = max(1, backends // services)
    rng = random.Random(1)
    st = {"node": "bench", "time": 0.0, "services": [], "public_ports": [], "drops": {},
          "verdicts": {}}
    n = 0
    for s in range(services):
        bes = []
        for b in range(per if s < services - 1 else backends - per * (services - 1)):
            n += 1
            # counters of a node up for days (they compress worse than young ones)
            bes.append({"address": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}",
                        "packets": rng.randint(10 ** 8, 10 ** 10),
                        "bytes": rng.randint(10 ** 11, 10 ** 13), "weight": 1, "healthy": True})
        st["services"].append({"name": f"svc{s}", "vip": f"10.0.{s}.10", "packets": 0,
                               "bytes": 0, "backends": bes})
    for p in range(ports):
        st["public_ports"].append({"port": 2000 + p, "proto": "tcp", "address": "203.0.113.10",
                                   "service": "svc0", "packets": 0, "allowed": 0, "denied": 0,
                                   "rate_limited": 0})
    for r in range(reasons):
        st["verdicts"][f"reason_{r}"] = {"packets": 0, "bytes": 0}
        if r < 10:
            st["drops"][f"drop_{r}"] = 0

    def advance():
        for svc in st["services"]:
            tp = tb = 0
            for be in svc["backends"]:
                p = rng.randint(0, 2000)
                be["packets"] += p
                be["bytes"] += p * rng.randint(60, 1500)
                tp += be["packets"]
                tb += be["bytes"]
            svc["packets"], svc["bytes"] = tp, tb
        for pp in st["public_ports"]:
            a = rng.randint(0, 100)
            pp["allowed"] += a
            pp["packets"] += a
        for r in st["verdicts"].values():
            r["packets"] += rng.randint(0, 10000)
            r["bytes"] += rng.randint(0, 10000) * 100
        for k in st["drops"]:
            st["drops"][k] += rng.randint(0, 10)
        st["flows"] = rng.randint(0, 65536)
        return st

    return st, advance


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--services", type=int, default=10)
    ap.add_argument("--ticks", type=int, default=600)
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)

    _, advance = synthetic(args.services, args.backends)
    # the collect cost (advancing the synthetic counters) is not the controller's: make the
    # dicts first, hand them out in turn
    import copy
    dicts = [copy.deepcopy(advance()) for _ in range(60)]
    clock = [1_700_000_000.0]
    i = [0]

    def collect():
        i[0] += 1
        return dicts[i[0] % len(dicts)]

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stats.sqlite"
        ctl = statistics.StatisticsController(collect, path, clock=lambda: clock[0])
        ctl.tick()   # the first tick writes the layout
        clock[0] += 1
        cpu0, wall0 = time.process_time(), time.perf_counter()
        row_bytes = 0
        for _ in range(args.ticks):
            ctl.tick()
            row_bytes += ctl.last_row_bytes
            clock[0] += 1
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        per_tick = cpu / args.ticks
        names = len(ctl.store.layout(1)[0])
        # a week in the store: fine_keep/1 s rows + coarse_keep/60 s rows
        fine_rows = int(seriesstore.FINE_KEEP_S)
        coarse_rows = int(seriesstore.COARSE_KEEP_S // seriesstore.COARSE_STEP_S)
        avg_row = row_bytes / args.ticks
        ctl.stop()

        # measure: a file with that many rows of these blobs (rows copied in SQL, fast)
        week_path = Path(tmp) / "week.sqlite"
        fill = seriesstore.StatsStore(week_path)
        blobs = []
        for d in dicts:
            names_, values, meta = flatten(d, {"self": (1, 2)}, {})
            blobs.append((names_, values, meta))
        t = 1_700_000_000.0
        for k in range(len(blobs)):
            fill.insert(t + k, *blobs[k])
        db = fill.db
        db.execute("BEGIN")
        base = db.execute("SELECT ts, layout, data FROM fine").fetchall()
        rows = []
        for k in range(fine_rows):
            ts, lid, data = base[k % len(base)]
            rows.append((1_800_000_000_000 + k * 1000, lid, data))
        db.executemany("INSERT OR REPLACE INTO fine VALUES (?, ?, ?)", rows)
        rows = []
        for k in range(coarse_rows):
            ts, lid, data = base[k % len(base)]
            rows.append((1_700_000_000_000 + k * 60000, lid, data))
        db.executemany("INSERT OR REPLACE INTO coarse VALUES (?, ?, ?)", rows)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        week_bytes = fill.size()
        fill.close()

    result = {"backends": args.backends, "series": names, "ticks": args.ticks,
              "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
              "cpu_ms_per_tick": round(per_tick * 1000, 3),
              "cpu_percent_at_1s": round(per_tick * 100, 3),
              "row_bytes": round(avg_row), "fine_rows": fine_rows, "coarse_rows": coarse_rows,
              "week_estimate_bytes": round(avg_row * (fine_rows + coarse_rows)),
              "week_measured_bytes": week_bytes}
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<22} {v}")
    return result


if __name__ == "__main__":
    main()
