"""The statistics controller without a kernel: a fake collect() and a fake clock.

Exact counters in the store, reset-aware rates and percentiles, downsampling and what is
dropped, layout changes (an apply adds a backend), a restart on the same file, and a
child process SIGKILLed while it samples: every tick it finished is in the file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from zfast.controllers import statistics
from zfast.controllers.statistics import StatisticsController

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_040.0   # a minute boundary


class Fake:
    """A node whose counters the test moves: stats() like Node.stats()."""

    def __init__(self, backends=("10.1.0.2", "10.1.0.3")):
        self.backends = {a: [0, 0] for a in backends}
        self.drops = {"drop_malformed": 0, "drop_no_service": 0}
        self.port = {"allowed": 0, "denied": 0, "rate_limited": 0}
        self.flows = 0

    def send(self, address: str, packets: int, size: int = 100) -> None:
        self.backends[address][0] += packets
        self.backends[address][1] += packets * size

    def stats(self) -> dict:
        bes = [{"address": a, "packets": p, "bytes": b, "weight": 1, "healthy": True}
               for a, (p, b) in self.backends.items()]
        return {"node": "t", "time": 0.0,
                "services": [{"name": "app", "vip": "10.0.0.10",
                              "packets": sum(b["packets"] for b in bes),
                              "bytes": sum(b["bytes"] for b in bes), "backends": bes}],
                "public_ports": [{"port": 2222, "proto": "tcp", "address": "203.0.113.10",
                                  "service": "app", "packets": sum(self.port.values()),
                                  "allowed": self.port["allowed"],
                                  "denied": self.port["denied"] + self.port["rate_limited"],
                                  "rate_limited": self.port["rate_limited"]}],
                "drops": dict(self.drops),
                "verdicts": {"redirect": {"packets": 5, "bytes": 500}},
                "flows": self.flows}


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def fake():
    return Fake()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ctl(tmp_path, fake, clock):
    c = StatisticsController(fake.stats, tmp_path / "stats.sqlite", clock=clock)
    yield c
    c.stop()


def run(ctl, clock, fake, seconds, per_second):
    """seconds ticks, one a second; per_second(i) -> {address: packets} sent before tick i."""
    for i in range(seconds):
        for address, packets in per_second(i).items():
            fake.send(address, packets)
        clock.t += 1
        ctl.tick()


def test_stored_sample_is_exactly_what_was_collected(ctl, fake, clock):
    fake.send("10.1.0.2", 7, 60)
    fake.send("10.1.0.3", 5, 1500)
    fake.drops["drop_malformed"] = 3
    fake.port.update(allowed=11, denied=2, rate_limited=1)
    fake.flows = 42
    ctl.tick()
    ts, got = ctl.stored_latest()
    assert ts == T0
    assert got["service/app/packets"] == 12 and got["service/app/bytes"] == 7 * 60 + 5 * 1500
    assert got["backend/app/10.1.0.2/packets"] == 7
    assert got["backend/app/10.1.0.3/bytes"] == 5 * 1500
    assert got["backend/app/10.1.0.3/healthy"] == 1 and got["backend/app/10.1.0.3/weight"] == 1
    assert got["port/203.0.113.10/2222/tcp/allowed"] == 11
    assert got["port/203.0.113.10/2222/tcp/denied"] == 3
    assert got["port/203.0.113.10/2222/tcp/rate_limited"] == 1
    assert got["drop/drop_malformed"] == 3
    assert got["verdict/redirect/bytes"] == 500
    assert got["flows"] == 42
    assert got["cpu/self"] > 0 and got["memory/self"] > 1 << 20   # this process's


def test_big_counters_stay_exact(ctl, fake, clock):
    fake.backends["10.1.0.2"] = [2 ** 62 + 1, 2 ** 62 + 3]
    ctl.tick()
    clock.t += 1
    fake.backends["10.1.0.2"][0] += 1
    ctl.tick()
    _, got = ctl.stored_latest()
    assert got["backend/app/10.1.0.2/packets"] == 2 ** 62 + 2
    s = ctl.series(T0)
    assert s.total("backend/app/10.1.0.2/packets") == 1


def test_rates_and_percentiles(ctl, fake, clock):
    ctl.tick()
    # 100 s: 1000 pps on one backend, 10 pps on the other; one second of 50,000
    run(ctl, clock, fake, 100, lambda i: {"10.1.0.2": 50_000 if i == 50 else 1000,
                                          "10.1.0.3": 10})
    s = ctl.series(T0, T0 + 100)
    assert len(s) == 101
    r = s.rate("backend/app/10.1.0.2/packets")
    assert np.isnan(r[0]) and r[1] == 1000 and r[51] == 50_000
    summary = ctl.summary(T0)
    svc = summary["services"][0]
    assert svc["name"] == "app" and svc["vip"] == "10.0.0.10"
    assert svc["packets"] == 99 * 1000 + 50_000 + 100 * 10
    assert svc["pps"] == pytest.approx(svc["packets"] / 100)
    assert svc["p50_pps"] == 1010
    assert svc["max_pps"] == 50_010
    assert 1010 < svc["p99_pps"] <= 50_010
    be = {b["address"]: b for b in svc["backends"]}
    assert be["10.1.0.3"]["packets"] == 1000 and be["10.1.0.3"]["p50_pps"] == 10
    assert be["10.1.0.2"]["weight"] == 1 and be["10.1.0.2"]["healthy"] is True
    # a window of the last 10 s only
    last = ctl.summary(T0 + 90)
    assert last["services"][0]["packets"] == 10 * 1010 and last["seconds"] == 10
    assert summary["flows"]["last"] == 0
    assert summary["instances"]["self"]["memory"] > 0


def test_counter_reset_never_gives_a_negative_rate(tmp_path, fake, clock):
    ctl = StatisticsController(fake.stats, tmp_path / "s.sqlite", clock=clock)
    run(ctl, clock, fake, 5, lambda i: {"10.1.0.2": 100})   # 500 packets
    ctl.stop()
    # the daemon restarts with fresh maps: counters start again from 0
    fake.backends = {"10.1.0.2": [0, 0], "10.1.0.3": [0, 0]}
    ctl = StatisticsController(fake.stats, tmp_path / "s.sqlite", clock=clock)
    run(ctl, clock, fake, 5, lambda i: {"10.1.0.2": 30})
    s = ctl.series(T0)
    name = "backend/app/10.1.0.2/packets"
    assert list(s[name]) == [100, 200, 300, 400, 500, 30, 60, 90, 120, 150]
    rates = s.rate(name)[1:]
    assert (rates >= 0).all()
    assert list(rates) == [100, 100, 100, 100, 30, 30, 30, 30, 30]
    assert s.total(name) == 400 + 150
    summary = ctl.summary(T0)
    assert summary["services"][0]["packets"] == 550
    assert all(b["p50_pps"] is None or b["p50_pps"] >= 0 for b in summary["services"][0]["backends"])
    ctl.stop()


def test_current_gives_rates_for_watch(ctl, fake, clock):
    ctl.tick()
    assert ctl.current()["services"][0].get("pps") is None
    fake.send("10.1.0.2", 300)
    fake.drops["drop_malformed"] += 4
    clock.t += 2
    ctl.tick()
    cur = ctl.current()
    assert cur["services"][0]["pps"] == 150
    assert {b["address"]: b["pps"] for b in cur["services"][0]["backends"]} == \
        {"10.1.0.2": 150, "10.1.0.3": 0}
    assert cur["drop_pps"]["drop_malformed"] == 2
    assert cur["public_ports"][0]["pps"] == 0


def test_a_new_backend_appears_in_the_series(ctl, fake, clock):
    run(ctl, clock, fake, 3, lambda i: {"10.1.0.2": 10})
    fake.backends["10.1.0.4"] = [0, 0]             # an apply added it
    run(ctl, clock, fake, 3, lambda i: {"10.1.0.4": 7})
    del fake.backends["10.1.0.3"]                  # and removed another
    run(ctl, clock, fake, 2, lambda i: {"10.1.0.4": 7})
    s = ctl.series(T0, names=["backend/app/*/packets"])
    assert s.names == ["backend/app/10.1.0.2/packets", "backend/app/10.1.0.3/packets",
                       "backend/app/10.1.0.4/packets"]
    assert list(s["backend/app/10.1.0.4/packets"]) == [-1, -1, -1, 7, 14, 21, 28, 35]
    assert list(s["backend/app/10.1.0.3/packets"])[-2:] == [-1, -1]
    assert s.total("backend/app/10.1.0.4/packets") == 28
    assert np.isnan(s.get("backend/app/10.1.0.4/packets")[0])
    summary = ctl.summary(T0)
    be = {b["address"]: b for b in summary["services"][0]["backends"]}
    assert be["10.1.0.4"]["packets"] == 28 and be["10.1.0.3"]["present"] is False


def test_downsampling_keeps_an_hour_of_seconds_and_minutes_for_a_week(tmp_path, fake):
    clock = Clock(T0)
    ctl = StatisticsController(fake.stats, tmp_path / "s.sqlite", clock=clock,
                               fine_keep=120, coarse_keep=600)
    # 5 minutes, one tick a second, 60 pps
    for i in range(300):
        fake.send("10.1.0.2", 60)
        ctl.tick()
        clock.t += 1
    fine_lo, fine_hi = ctl.store.bounds("fine")
    assert fine_hi == T0 + 299
    assert fine_lo >= T0 + 299 - 120 - 60        # pruned once a minute: at most a minute late
    coarse = ctl.series(T0, step=60)
    # the last sample of each complete minute: T0+59, T0+119, ...
    assert list(coarse.time) == [T0 + 59, T0 + 119, T0 + 179, T0 + 239]
    assert list(coarse["backend/app/10.1.0.2/packets"]) == [3600, 7200, 10800, 14400]
    assert list(coarse.rate("backend/app/10.1.0.2/packets")[1:]) == [60, 60, 60]
    # a series over all of it: minute rows where the fine ones are gone, then seconds
    both = ctl.series(T0)
    assert both.time[0] == T0 + 59 and both.time[-1] == T0 + 299
    assert (np.diff(both.time) > 0).all()
    r = both.rate("backend/app/10.1.0.2/packets")[1:]
    assert np.allclose(r, 60)
    # then nothing for a while: older minute rows go once they are coarse_keep old
    clock.t += 900
    fake.send("10.1.0.2", 60)
    ctl.tick()
    clock.t += 60
    ctl.tick()
    assert ctl.store.bounds("coarse")[0] >= clock.t - 600 - 60
    assert ctl.store.bounds("fine")[0] >= clock.t - 120 - 60
    n_layouts = ctl.store.db.execute("SELECT count(*) FROM layouts").fetchone()[0]
    assert n_layouts == 1
    ctl.stop()


def test_restart_keeps_the_file_and_rolls_up_what_it_missed(tmp_path, fake):
    clock = Clock(T0)
    path = tmp_path / "s.sqlite"
    ctl = StatisticsController(fake.stats, path, clock=clock)
    for _ in range(90):
        fake.send("10.1.0.2", 1)
        ctl.tick()
        clock.t += 1
    ctl.stop()
    ctl = StatisticsController(fake.stats, path, clock=clock)
    clock.t += 100
    ctl.tick()
    clock.t += 1
    ctl.tick()
    coarse = ctl.series(T0, step=60)
    assert list(coarse.time) == [T0 + 59, T0 + 89]   # minutes 0 and 1 (the daemon's last)
    assert ctl.series(T0)["backend/app/10.1.0.2/packets"][-1] == 90
    ctl.stop()


def test_reader_sees_the_writer_and_api_routes(ctl, fake, clock, tmp_path):
    run(ctl, clock, fake, 10, lambda i: {"10.1.0.3": 20})
    reader = statistics.open_reader(tmp_path)   # the directory: stats.sqlite inside
    try:
        assert reader.latest()[1]["backend/app/10.1.0.3/packets"] == 200
        assert reader.summary(T0)["services"][0]["packets"] == 180   # 10 samples, 9 deltas
        run(ctl, clock, fake, 1, lambda i: {"10.1.0.3": 20})
        assert reader.latest()[1]["backend/app/10.1.0.3/packets"] == 220
    finally:
        reader.close()
    routes = statistics.api_routes(ctl, clock=clock)
    code, body = routes[("POST", "/stats/summary")]({"since": 5})
    assert code == 200 and body["services"][0]["packets"] == 100
    code, body = routes[("POST", "/stats/series")]({"since": 3, "names": ["service/app/packets"]})
    assert code == 200 and list(body["series"]) == ["service/app/packets"]
    assert len(body["time"]) == 4
    s = statistics.Series.from_json(json.loads(json.dumps(body)))
    assert s.total("service/app/packets") == 60
    assert routes[("POST", "/stats/summary")](None)[0] == 400
    code, body = routes[("GET", "/stats/current")](None)
    assert code == 200 and body["services"][0]["pps"] == 20


def test_a_failing_collect_is_counted_and_reported(tmp_path, clock):
    seen = []

    def collect():
        raise RuntimeError("node API down")

    ctl = StatisticsController(collect, tmp_path / "s.sqlite", clock=clock, on_error=seen.append)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            ctl.tick()
    assert ctl.errors == 3 and seen == ["statistics: RuntimeError: node API down"]
    assert ctl.stored_latest() is None
    assert ctl.status()["healthy"] is False
    ctl.stop()


def test_read_resources_of_a_process_and_a_cgroup(tmp_path):
    cpu, mem = statistics.read_resources("/proc/self")
    assert cpu > 0 and mem > 1 << 20
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.stat").write_text("usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n")
    (cg / "memory.current").write_text("268435456\n")
    assert statistics.read_resources(cg) == (1234567, 268435456)


def test_start_samples_every_interval(tmp_path, fake):
    ctl = StatisticsController(fake.stats, tmp_path / "s.sqlite", interval=0.05)
    ctl.start()
    try:
        time.sleep(0.5)
    finally:
        ctl.stop()
    assert 5 <= ctl.ticks <= 12
    reader = statistics.open_reader(tmp_path / "s.sqlite")
    assert len(reader.series(0)) == ctl.ticks
    reader.close()


# Run with PYTHONPATH at this checkout: it imports the zfast under test.
CHILD = textwrap.dedent("""
    import time
    from zfast.controllers.statistics import StatisticsController
    n = [0]
    def collect():
        n[0] += 1
        return {{"services": [{{"name": "app", "vip": None, "packets": n[0], "bytes": 0,
                               "backends": []}}]}}
    ctl = StatisticsController(collect, {path!r}, interval=0.02)
    while True:
        s = ctl.tick()
        print(s["time"], s["services"][0]["packets"], flush=True)   # this tick is done
        time.sleep(0.02)
""")


def test_sigkill_loses_no_finished_tick(tmp_path):
    path = tmp_path / "s.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(path=str(path))],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    done = []
    try:
        for line in child.stdout:
            done.append(line.split())
            if len(done) == 40:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    reader = statistics.open_reader(path)
    s = reader.series(0)
    reader.close()
    stored = {int(v) for v in s["service/app/packets"]}
    finished = {int(p) for _, p in done}
    assert finished <= stored, sorted(finished - stored)
    # at most the tick in progress at the kill is missing after the last one reported
    assert max(stored) - max(finished) <= 1


def test_map_fill_is_read_every_few_seconds(tmp_path, fake, clock):
    calls = []

    def fill():
        calls.append(clock.t)
        return {"flows": (len(calls) * 10, 65536), "backends": 3}

    fake_stats = fake.stats

    def stats():
        st = fake_stats()
        del st["flows"]          # the node's stats without a flow count: map_fill gives it
        return st

    ctl = StatisticsController(stats, tmp_path / "s.sqlite", clock=clock, map_fill=fill,
                               map_fill_interval=5)
    for _ in range(12):
        ctl.tick()
        clock.t += 1
    assert calls == [T0, T0 + 5, T0 + 10]
    _, got = ctl.stored_latest()
    assert got["flows"] == 30 and got["map/flows/entries"] == 30 and got["map/flows/max"] == 65536
    assert got["map/backends/entries"] == 3 and got["map/backends/max"] == -1
    assert ctl.latest()["flows"] == 30
    assert ctl.latest()["maps"]["backends"] == {"entries": 3, "max": None}
    summary = ctl.summary(T0)
    assert summary["maps"]["flows"] == {"entries": 30, "max": 65536, "fill": round(30 / 65536, 6)}
    assert summary["flows"] == {"last": 30, "max": 30}
    ctl.stop()
