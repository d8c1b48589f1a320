"""A balancer starts in under a second (the program cache, zfast/dataplane/progcache.py).

In the standard lab, in one run: a start without the cache (`ZFAST_CACHE_DIR=off`, as
every start was before it), a cold start (an empty cache: compiles and writes the entry),
then repeat starts (hits). Each is timed from the exec of `zfast up` to the first UDP
datagram through the VIP answered by a backend (tools/starttime.py), and the daemon with
its child processes (the idle-flow sweeper) is measured once settled.

Needs root: without it the test fails, it does not skip.
"""

from __future__ import annotations

import statistics

from tests.e2e.kit import lab
from tools.starttime import measure  # tools/ is a package at the repo root (pytest.ini)

REPEATS = 3
FIRST_DATAGRAM_S = 1.0      # a repeat start, exec to the first datagram forwarded
RESIDENT_MIB = 80           # the daemon and its children, RSS summed (shared pages twice)


def test_a_repeat_start_forwards_within_a_second_in_80_mib():
    with lab.lab_env("zffs", start_node=False) as env:
        rows = measure(env.lab, repeats=REPEATS)
    table = "\n".join(f"{r['run']:<9} {r['cache']:<5} first datagram {r['first_datagram_s']:.3f} s, "
                      f"RSS {r['rss_mib']:.0f} MiB (PSS {r['pss_mib']:.0f}) in {r['processes']} "
                      f"processes" for r in rows)
    print("\n" + table)
    off, cold, repeats = rows[0], rows[1], rows[2:]
    assert [r["cache"] for r in rows] == ["off", "miss"] + ["hit"] * REPEATS, table
    repeat_s = statistics.median(r["first_datagram_s"] for r in repeats)
    assert repeat_s <= FIRST_DATAGRAM_S, table
    # the same run's ratios: a hit is no compile; a cold start costs what a start did before
    # (one compile, give or take this machine's noise of one compile, ~15 %) and an entry
    assert repeat_s <= 0.25 * cold["first_datagram_s"], table
    assert cold["first_datagram_s"] <= 1.2 * off["first_datagram_s"], table
    for r in repeats:
        assert r["processes"] == 2, table       # the daemon and its sweeper, both counted
        assert r["rss_mib"] <= RESIDENT_MIB, table
