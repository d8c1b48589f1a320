"""How long `zfast.dataplane.loader.Loaded()` takes and what it leaves resident: without the program
cache, on a miss (empty cache) and on hits, each in a fresh process, in one run.

    python tools/loadtime.py [--hits 3] [--json]

Needs root (it loads the program). The cache is a temporary dir of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
t0 = time.monotonic()
from zfast.dataplane.loader import Loaded
t1 = time.monotonic()
dp = Loaded()
t2 = time.monotonic()
ru = resource.getrusage(resource.RUSAGE_SELF)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
maps = open("/proc/self/maps").read()
print(json.dumps({"cache": dp.cache, "import_s": t1 - t0, "load_s": t2 - t1,
                  "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
                  "peak_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "llvm": "libLLVM" in maps}))
"""


def run(cache: str) -> dict:
    env = {**os.environ, "ZFAST_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hits", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="zfast-loadtime-") as tmp:
        rows = [run("off"), run(tmp)] + [run(tmp) for _ in range(args.hits)]
    rows[0]["cache"] = "off (no cache)"
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'Loaded()':<16}{'load s':>8}{'import s':>10}{'CPU s':>8}{'RSS MiB':>9}"
          f"{'peak MiB':>10}  LLVM mapped")
    for r in rows:
        print(f"{r['cache']:<16}{r['load_s']:>8.2f}{r['import_s']:>10.2f}{r['cpu_s']:>8.2f}"
              f"{r['rss_mib']:>9.0f}{r['peak_mib']:>10.0f}  {'yes' if r['llvm'] else 'no'}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
