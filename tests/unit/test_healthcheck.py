"""Health checks without root: the controller's rise/fall counting and its schedule on a fake
clock, the real socket prober against servers on loopback (1,000 targets, one thread), and
ServiceTable.set_health against a fake data plane (rings, flags, fail open, apply)."""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.fakes.dataplane import FakeDataplane
from zfast import config
from zfast.controllers import health
from zfast.controllers.health import HealthController, SocketProber, Target, judge_http
from zfast.dataplane.loader import BACKEND_DOWN, BACKEND_UP, NO_BACKEND
from zfast.reconcile.services import ServiceTable

ip = ipaddress.ip_address


def hc(kind="tcp", interval_ms=200, fall=3, rise=2, path=None) -> config.Health:
    return config.Health(kind=kind, interval_ms=interval_ms, fall=fall, rise=rise,
                         path=path if kind == "http" else None)


def target(n=2, service="app", port=8080, **kw) -> Target:
    return Target(service, ip(f"10.1.0.{n}"), port, hc(**kw))


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeProber:
    """Answers each check at once with answer(target, now) -> (ok, what), or never
    (None: it times out at its deadline, like the real one)."""

    def __init__(self, clock, answer):
        self.clock, self.answer = clock, answer
        self.started: list[tuple[float, tuple]] = []
        self.results = []
        self.pending: dict[tuple, float] = {}

    def start(self, key, target, timeout):
        now = self.clock()
        self.started.append((now, key))
        got = self.answer(target, now)
        if got is None:
            self.pending[key] = now + timeout
        else:
            self.results.append((key, *got))

    def poll(self, timeout):
        now = self.clock()
        for key, deadline in list(self.pending.items()):
            if deadline <= now:
                del self.pending[key]
                self.results.append((key, False, "timeout"))
        out, self.results = self.results, []
        return out

    def next_deadline(self):
        return min(self.pending.values(), default=None)

    def inflight(self):
        return len(self.pending)

    def wake(self):
        pass

    def close(self):
        pass


def run_for(ctrl, clock, seconds, step=0.001):
    """Drive the controller on the fake clock in steps of `step` seconds."""
    end = clock.t + seconds
    while clock.t < end - 1e-9:
        ctrl.run_once(max_wait=0)
        clock.t = round(clock.t + step, 6)
    ctrl.run_once(max_wait=0)


def controller(targets, answer, clock=None, jitter=False):
    clock = clock or Clock()
    calls = []
    prober = FakeProber(clock, answer)
    ctrl = HealthController(lambda: list(targets), lambda t, h: calls.append((clock.t, t.key, h)),
                            clock=clock, prober=prober, jitter=jitter)
    return ctrl, clock, prober, calls


# ---------------------------------------------------------------- counting

def test_fall_then_rise_counts_consecutive_checks():
    t = target(fall=3, rise=2)
    alive = {"up": True}
    ctrl, clock, prober, calls = controller([t], lambda tg, now: (alive["up"], "x"))
    start = clock.t
    run_for(ctrl, clock, 1.0)
    assert calls == [], "optimistic start: healthy checks report nothing"
    alive["up"] = False
    died = clock.t
    run_for(ctrl, clock, 1.0)
    assert len(calls) == 1 and calls[0][1:] == (t.key, False)
    # checks at start + k*0.2; the first after `died` fails, the third failure takes it out
    fails = [s for s, _ in prober.started if s >= died]
    assert calls[0][0] == pytest.approx(fails[2], abs=1e-6)
    assert calls[0][0] - died <= 3 * 0.2 + 1e-6
    alive["up"] = True
    back = clock.t
    run_for(ctrl, clock, 1.0)
    assert len(calls) == 2 and calls[1][1:] == (t.key, True)
    oks = [s for s, _ in prober.started if s >= back]
    assert calls[1][0] == pytest.approx(oks[1], abs=1e-6)
    assert calls[1][0] - back <= 2 * 0.2 + 1e-6
    assert prober.started[0][0] == start


def test_a_good_check_between_failures_resets_the_count():
    t = target(fall=3, rise=2)
    script = iter([True, False, False, True, False, False, True, False, False, False,
                   True, False, True, True])
    ctrl, clock, prober, calls = controller([t], lambda tg, now: (next(script), "x"))
    run_for(ctrl, clock, 0.2 * 9 + 0.01)        # checks 1..10: only 8, 9, 10 fail in a row
    assert [c[2] for c in calls] == [False]
    assert calls[0][0] == pytest.approx(prober.started[9][0])
    run_for(ctrl, clock, 0.2 * 4)              # ok, fail, ok, ok: the second ok pair counts
    assert [c[2] for c in calls] == [False, True]
    assert calls[1][0] == pytest.approx(prober.started[13][0])


def test_fall_1_and_rise_1():
    t = target(fall=1, rise=1)
    script = iter([False, True, False])
    ctrl, clock, prober, calls = controller([t], lambda tg, now: (next(script), "x"))
    run_for(ctrl, clock, 0.41)
    assert [c[2] for c in calls] == [False, True, False]


def test_unanswered_checks_time_out_before_the_next_one_and_count_as_failures():
    t = target(fall=2, rise=1, interval_ms=200)
    assert t.timeout < t.interval
    ctrl, clock, prober, calls = controller([t], lambda tg, now: None)
    run_for(ctrl, clock, 0.5)
    # checks at 0, 0.2, 0.4: each ends (times out) at +0.16, before the next starts
    assert [s - prober.started[0][0] for s, _ in prober.started] == pytest.approx([0, 0.2, 0.4])
    assert len(calls) == 1 and calls[0][2] is False
    assert calls[0][0] - prober.started[1][0] == pytest.approx(0.16, abs=0.002)
    assert ctrl.state("app", "10.1.0.2")["last"] == "timeout"


def test_long_intervals_cap_the_timeout():
    assert target(interval_ms=60_000).timeout == health.MAX_TIMEOUT_S


# ---------------------------------------------------------------- the schedule

def test_each_backend_on_its_own_fixed_beat():
    ts = [target(2, interval_ms=200), target(3, interval_ms=300), target(4, interval_ms=70)]
    ctrl, clock, prober, calls = controller(ts, lambda tg, now: (True, "ok"), jitter=True)
    t0 = clock.t
    run_for(ctrl, clock, 3.0)
    for t in ts:
        starts = [s for s, k in prober.started if k == t.key]
        assert 0 <= starts[0] - t0 < t.interval + 1e-6, "the first check is inside the first interval"
        gaps = np.diff(starts)
        assert gaps == pytest.approx([t.interval] * len(gaps), abs=0.0011), (t.key, gaps)
        assert len(starts) >= int(3.0 / t.interval)


def test_jitter_spreads_first_checks():
    ts = [Target("app", ip(f"10.1.{i // 250}.{i % 250 + 1}"), 80, hc(interval_ms=1000))
          for i in range(200)]
    ctrl, clock, prober, _ = controller(ts, lambda tg, now: (True, "ok"), jitter=True)
    t0 = clock.t
    run_for(ctrl, clock, 1.0, step=0.01)
    firsts = sorted({k: s - t0 for s, k in reversed(prober.started)}.values())
    assert len(firsts) == 200
    # spread over the interval: no tenth of it holds more than a quarter of the backends
    buckets = np.histogram(firsts, bins=10, range=(0, 1.0))[0]
    assert buckets.max() < 50, buckets


def test_missed_beats_are_skipped_not_made_up():
    t = target(interval_ms=100)
    ctrl, clock, prober, _ = controller([t], lambda tg, now: (True, "ok"))
    run_for(ctrl, clock, 0.25)
    n = len(prober.started)
    clock.t += 1.0                      # the loop stalls for ten beats
    ctrl.run_once(max_wait=0)
    ctrl.run_once(max_wait=0)
    assert len(prober.started) == n + 1, "one check after a stall, not ten"
    assert ctrl.late_max >= 0.9
    start = clock.t
    run_for(ctrl, clock, 0.35)
    later = [s for s, _ in prober.started if s > start]
    assert np.diff([start] + later) == pytest.approx([0.1] * len(later), abs=0.0011)


def test_changed_and_removed_targets():
    targets = [target(2, fall=1), target(3, fall=1)]
    ctrl, clock, prober, calls = controller(targets, lambda tg, now: (tg.address != ip("10.1.0.2"), "x"))
    ctrl.targets = lambda: list(targets)
    run_for(ctrl, clock, 0.1)
    assert [c[1:] for c in calls] == [(("app", ip("10.1.0.2")), False)]
    # a settings change keeps the state (still down, no new report)
    targets[0] = target(2, fall=1, interval_ms=100)
    ctrl.refresh()
    run_for(ctrl, clock, 0.3)
    assert len(calls) == 1
    starts = [s for s, k in prober.started if k == ("app", ip("10.1.0.2"))]
    assert np.diff(starts)[-1] == pytest.approx(0.1, abs=0.0011)
    # removed: forgotten; the down one is reported healthy (nobody checks it any more)
    del targets[:]
    ctrl.refresh()
    ctrl.run_once(max_wait=0)
    assert [c[1:] for c in calls[1:]] == [(("app", ip("10.1.0.2")), True)]
    n = len(prober.started)
    run_for(ctrl, clock, 1.0)
    assert len(prober.started) == n and ctrl.status()["targets"] == 0


def test_results_of_forgotten_targets_are_ignored():
    t = target(fall=1)
    ctrl, clock, prober, calls = controller([t], lambda tg, now: None)   # never answers
    ctrl.run_once(max_wait=0)
    ctrl.targets = lambda: []
    ctrl.refresh()
    clock.t += 0.5
    ctrl.run_once(max_wait=0)          # forgets it; its timeout comes in after
    ctrl.run_once(max_wait=0)
    assert calls == []


def test_a_failed_report_is_made_again_at_the_next_round():
    t = target(fall=1)
    ctrl, clock, prober, calls = controller([t], lambda tg, now: (False, "x"))
    fails = {"left": 2}

    def flaky(target_, healthy):
        if fails["left"]:
            fails["left"] -= 1
            raise RuntimeError("map update failed")
        calls.append((clock.t, target_.key, healthy))

    ctrl.on_change = flaky
    with pytest.raises(RuntimeError):
        ctrl.run_once(max_wait=0)
    clock.t += 0.001
    with pytest.raises(RuntimeError):
        ctrl.run_once(max_wait=0)
    clock.t += 0.001
    ctrl.run_once(max_wait=0)
    assert [c[1:] for c in calls] == [(t.key, False)]
    clock.t += 0.5
    ctrl.run_once(max_wait=0)
    assert len(calls) == 1, "delivered once, not again"


class SleepyProber(FakeProber):
    def poll(self, timeout):
        time.sleep(min(timeout, 0.005))
        return super().poll(timeout)


def test_reports_run_beside_the_checks_and_are_made_again_after_a_failure():
    ts = [target(2, fall=1, interval_ms=20), target(3, fall=2, interval_ms=20)]
    slow = threading.Event()
    calls, attempts = [], []

    def on_change(t, healthy):
        attempts.append(t.key)
        if len(attempts) <= 2:
            raise RuntimeError("the maps refused")
        slow.wait(0.3)       # a slow map update: the checks must keep their beat
        calls.append((t.key, healthy))

    prober = SleepyProber(time.monotonic, lambda tg, now: (False, "refused"))
    ctrl = HealthController(lambda: ts, on_change, prober=prober, jitter=False)
    ctrl.start()
    try:
        deadline = time.monotonic() + 3
        saw_error = False
        while time.monotonic() < deadline and len(calls) < 2:
            saw_error |= bool(ctrl.status()["error"])
            time.sleep(0.01)
        status = ctrl.status()
    finally:
        ctrl.stop()
    assert sorted(calls) == sorted([(ts[0].key, False), (ts[1].key, False)])
    assert saw_error and status["error"] is None and status["unreported"] == 0
    starts = [s for s, k in prober.started if k == ts[0].key]
    assert max(np.diff(starts)) < 0.1, "checks went on while a report took 300 ms"


def test_on_batch_gets_a_round_at_once():
    ts = [target(n, fall=1) for n in range(2, 12)]
    clock = Clock()
    batches = []
    ctrl = HealthController(lambda: ts, lambda t, h: pytest.fail("on_batch is given"),
                            clock=clock, prober=FakeProber(clock, lambda tg, now: (False, "x")),
                            jitter=False, on_batch=batches.append)
    ctrl.run_once(max_wait=0)
    assert len(batches) == 1 and len(batches[0]) == 10
    assert all(h is False for _, h in batches[0])


def test_targets_of_a_project():
    project = config.parse({
        "project": "p",
        "services": [
            {"name": "a", "vip": "10.0.0.10",
             "ports": [{"port": 53, "proto": "udp", "target_port": 5353},
                       {"port": 80, "proto": "tcp", "target_port": 8080},
                       {"port": 81, "proto": "tcp", "target_port": 8081}],
             "backends": [{"address": "10.1.0.2"}, {"address": "10.1.0.5", "weight": 0}],
             "health": {"kind": "http", "path": "/hz"}},
            {"name": "b", "vip": "10.0.0.11", "ports": [{"port": 53, "proto": "udp",
                                                          "target_port": 53}],
             "backends": [{"address": "10.1.0.3"}], "health": {"kind": "tcp"}},
            {"name": "c", "vip": "10.0.0.12", "ports": [{"port": 80, "proto": "tcp",
                                                          "target_port": 80}],
             "backends": [{"address": "10.1.0.4"}]},
        ]})
    ts = health.targets_of(project.services)
    assert [(t.service, str(t.address), t.port, t.health.kind, t.health.path) for t in ts] == [
        ("a", "10.1.0.2", 8080, "http", "/hz"), ("a", "10.1.0.5", 8080, "http", "/hz")]
    assert health.unchecked_of(project.services) == ["b"]


# ---------------------------------------------------------------- real sockets on loopback

@pytest.fixture
def listener():
    """A TCP server on 0.0.0.0 (reached at any 127.x.y.z) that accepts and drops."""
    srv = socket.create_server(("0.0.0.0", 0), backlog=4096)
    stop = threading.Event()

    def drain():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                pass

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    yield srv.getsockname()[1]
    stop.set()
    th.join()
    srv.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_one_thousand_targets_one_thread(listener):
    """1,000 backends checked every 300 ms by one thread (and one more that reports); the 500
    with nothing listening go down after `fall`, the others are never reported."""
    dead = closed_port()
    ts = [Target("s", ip(f"127.{1 + i // 250}.0.{i % 250 + 1}"), listener if i % 2 else dead,
                 hc(interval_ms=300, fall=2, rise=2)) for i in range(1000)]
    calls, lock = [], threading.Lock()

    def on_change(t, healthy):
        with lock:
            calls.append((time.monotonic(), t, healthy))

    before = threading.active_count()
    ctrl = HealthController(lambda: ts, on_change)
    t0 = time.monotonic()
    ctrl.start()
    try:
        assert threading.active_count() <= before + 2
        deadline = t0 + 5
        while time.monotonic() < deadline and len(calls) < 500:
            time.sleep(0.05)
        time.sleep(0.6)
        peak_threads = threading.active_count()
        status = ctrl.status()
    finally:
        ctrl.stop()
    downs = [c for c in calls if not c[2]]
    assert len(downs) == 500 and not [c for c in calls if c[2]]
    assert {c[1].port for c in downs} == {dead}
    # fall=2 at 300 ms: the first check within 300 ms (jitter), the second 300 ms later
    worst = max(c[0] for c in downs) - t0
    print(f"\n1,000 targets: 500 down after {worst * 1000:.0f} ms (bound 600 ms + slack), "
          f"{status['checks']} checks, worst start lateness {status['late_max_ms']} ms")
    assert worst < 0.6 + 0.5
    assert peak_threads <= before + 2
    assert status["targets"] == 1000 and len(status["down"]) == 500
    per_target = status["checks"] / 1000
    elapsed = time.monotonic() - t0
    assert per_target >= (elapsed - 0.3) / 0.3 - 1.5, (per_target, elapsed)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        codes = {"/ok": 200, "/moved": 302, "/missing": 404, "/broken": 500}
        if self.path == "/slow":
            time.sleep(1.0)
        self.send_response(codes.get(self.path, 200))
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"hi")

    def log_message(self, *args):
        pass


@pytest.fixture
def http_port():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *args: None   # /slow: the check has given up and reset
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _probe_once(t: Target, timeout: float = 2.0):
    prober = SocketProber()
    try:
        prober.start(t.key, t, t.timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = prober.poll(0.05)
            if got:
                return got[0][1:]
        raise AssertionError("no result")
    finally:
        prober.close()


def test_http_checks(http_port, listener):
    def http(path, port=http_port, interval_ms=500):
        return Target("s", ip("127.0.0.1"), port, hc("http", interval_ms=interval_ms, path=path))

    assert _probe_once(http("/ok")) == (True, "http 200")
    assert _probe_once(http("/moved")) == (True, "http 302")
    assert _probe_once(http("/missing")) == (False, "http 404")
    assert _probe_once(http("/broken")) == (False, "http 500")
    ok, what = _probe_once(http("/slow", interval_ms=200))
    assert not ok and what.startswith("timeout waiting for the answer"), what
    ok, what = _probe_once(http("/ok", port=closed_port()))
    assert not ok and "refused" in what, what
    ok, what = _probe_once(http("/ok", port=listener))     # accepts, then closes
    assert not ok, what
    tcp = Target("s", ip("127.0.0.1"), listener, hc("tcp"))
    assert _probe_once(tcp) == (True, "connected")


def test_judge_http():
    assert judge_http(b"HTTP/1.1 204 No Content\r\n") == (True, "http 204")
    assert judge_http(b"HTTP/1.0 301 Moved\r\nLocation: /\r\n") == (True, "http 301")
    assert judge_http(b"HTTP/2 200\r\n") == (True, "http 200")
    assert judge_http(b"HTTP/1.1 199 Early\r\n")[0] is False
    assert judge_http(b"HTTP/1.1 503 Busy\r\n") == (False, "http 503")
    assert judge_http(b"be1\n")[0] is False
    assert judge_http(b"") == (False, "closed without an answer")


# ---------------------------------------------------------------- ServiceTable.set_health

def fake_dataplane() -> FakeDataplane:
    return FakeDataplane(config.Datapath(maglev_size=251, max_services=8, max_backends=64))


def service(weights=(1, 1, 1), health=True, name="app"):
    return config.Service(
        name=name, vip=ip("10.0.0.10"),
        ports=(config.PortMap(80, "tcp", 8080),),
        backends=tuple(config.Backend(ip(f"10.1.0.{i + 2}"), w) for i, w in enumerate(weights)),
        health=hc() if health else None)


class View:
    """What the fake maps say about one service."""

    def __init__(self, dp, table, name="app"):
        inst = table.services[name]
        key = table._service_key(ip("10.0.0.10"), 80, "tcp")
        entry = dp.table("services")[key]
        self.ring_no = entry.ring
        ring = dp.read_ring(entry.ring)
        by_slot = {slot: str(a) for a, slot in inst.backends.items()}
        self.in_ring = {by_slot[s] for s in set(ring.tolist()) if s != NO_BACKEND}
        self.empty = bool((ring == NO_BACKEND).all())
        self.flags = {str(a): dp.table("backends")[slot].flags
                      for a, slot in inst.backends.items()}


B1, B2, B3 = (ip(f"10.1.0.{i}") for i in (2, 3, 4))


def test_unhealthy_backend_leaves_the_ring_through_the_spare_and_is_flagged_down():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(),))
    v0 = View(dp, table)
    assert v0.in_ring == {"10.1.0.2", "10.1.0.3", "10.1.0.4"}
    assert set(v0.flags.values()) == {BACKEND_UP}

    changes = table.set_health("app", B1, False)
    assert changes == ["~ backend app 10.1.0.2 unhealthy"]
    v1 = View(dp, table)
    assert v1.ring_no != v0.ring_no, "a new table goes to the spare ring"
    assert v1.in_ring == {"10.1.0.3", "10.1.0.4"}
    assert v1.flags == {"10.1.0.2": BACKEND_DOWN, "10.1.0.3": BACKEND_UP, "10.1.0.4": BACKEND_UP}
    assert table.set_health("app", B1, False) == [], "no change, nothing written"
    stats = {b["address"]: b["healthy"] for b in table.counters()[0]["backends"]}
    assert stats == {"10.1.0.2": False, "10.1.0.3": True, "10.1.0.4": True}

    # an apply (a weight changes) does not bring it back
    table.apply((service((2, 1, 1)),))
    v2 = View(dp, table)
    assert v2.in_ring == {"10.1.0.3", "10.1.0.4"} and v2.flags["10.1.0.2"] == BACKEND_DOWN

    assert table.set_health("app", B1, True) == ["~ backend app 10.1.0.2 healthy"]
    v3 = View(dp, table)
    assert v3.in_ring == {"10.1.0.2", "10.1.0.3", "10.1.0.4"}
    assert set(v3.flags.values()) == {BACKEND_UP}
    # Maglev: the same set of backends gives the same table as before it left
    fresh = ServiceTable(fake_dataplane())
    fresh.apply((service((2, 1, 1)),))
    assert np.array_equal(dp.read_ring(v3.ring_no), fresh.dp.read_ring(View(fresh.dp, fresh).ring_no))


def test_drained_backend_stays_drained():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service((0, 1, 1)),))
    assert View(dp, table).flags["10.1.0.2"] == 0
    table.set_health("app", B1, False)
    v = View(dp, table)
    assert v.flags["10.1.0.2"] == BACKEND_DOWN, "a dead draining backend's flows move too"
    assert v.in_ring == {"10.1.0.3", "10.1.0.4"}
    table.set_health("app", B1, True)
    v = View(dp, table)
    assert v.flags["10.1.0.2"] == 0 and v.in_ring == {"10.1.0.3", "10.1.0.4"}


def test_all_down_fails_open():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(),))
    table.set_health("app", B1, False)
    table.set_health("app", B2, False)
    assert View(dp, table).in_ring == {"10.1.0.4"}
    changes = table.set_health("app", B3, False)
    assert any("fail open" in c for c in changes), changes
    v = View(dp, table)
    assert v.in_ring == {"10.1.0.2", "10.1.0.3", "10.1.0.4"}
    assert set(v.flags.values()) == {BACKEND_UP}, "failing open: no flow is moved around"
    svc = table.counters()[0]
    assert svc["fail_open"] and not any(b["healthy"] for b in svc["backends"])
    changes = table.set_health("app", B2, True)
    assert any("fail open ends" in c for c in changes), changes
    v = View(dp, table)
    assert v.in_ring == {"10.1.0.3"}
    assert v.flags == {"10.1.0.2": BACKEND_DOWN, "10.1.0.3": BACKEND_UP, "10.1.0.4": BACKEND_DOWN}


def test_health_counts_only_where_the_service_has_checks():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(),))
    table.set_health("app", B1, False)
    table.apply((service(health=False),))            # checks removed: everything back
    v = View(dp, table)
    assert len(v.in_ring) == 3 and set(v.flags.values()) == {BACKEND_UP}
    assert all(b["healthy"] for b in table.counters()[0]["backends"])
    # reports for unknown services or backends are recorded, change nothing now
    writes = dp.ring_writes
    assert table.set_health("nope", B1, False) == []
    assert table.set_health("app", ip("10.9.9.9"), False) == []
    assert dp.ring_writes == writes


def test_removed_backend_record_until_forgotten():
    """The table keeps a down record until the controller says otherwise (it forgets a
    backend with on_change(True)), so a backend removed and added back between two
    refreshes of the controller is not back in rotation behind its back."""
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(),))
    table.set_health("app", B1, False)
    table.apply((service((1, 1)),))                # 10.1.0.4 removed; 10.1.0.2 still down
    table.apply((service(),))                      # and 10.1.0.4 back
    assert View(dp, table).in_ring == {"10.1.0.3", "10.1.0.4"}
    table.apply((config.Service("app", ip("10.0.0.10"), (config.PortMap(80, "tcp", 8080),),
                                (config.Backend(B2),), hc()),))
    table.apply((service(),))                      # 10.1.0.2 removed and back: still down
    assert View(dp, table).in_ring == {"10.1.0.3", "10.1.0.4"}
    table.set_health("app", B1, True)              # the controller forgot or saw it rise
    assert len(View(dp, table).in_ring) == 3


def test_many_reports_rebuild_each_ring_once():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(name="app"), service(name="web")))
    writes = dp.ring_writes
    changes = table.set_health_many([("app", B1, False), ("app", B2, False),
                                     ("web", B1, False)])
    assert len([c for c in changes if c.startswith("~ backend")]) == 3
    assert dp.ring_writes == writes + 2


def test_a_failed_map_update_is_not_taken():
    dp = fake_dataplane()
    table = ServiceTable(dp)
    table.apply((service(),))
    real = dp.write_ring

    def broken(ring, ids):
        raise RuntimeError("bpf: no memory")

    dp.write_ring = broken
    with pytest.raises(RuntimeError):
        table.set_health("app", B1, False)
    assert table.is_healthy("app", B1), "not recorded: the retry must redo it"
    dp.write_ring = real
    assert table.set_health("app", B1, False) == ["~ backend app 10.1.0.2 unhealthy"]
    assert View(dp, table).in_ring == {"10.1.0.3", "10.1.0.4"}


def test_for_node_wiring():
    """health.for_node: reports go to the node's table, map changes to its event log."""
    dp = fake_dataplane()
    table = ServiceTable(dp)
    svc = service()
    table.apply((svc,))
    events = []
    node = SimpleNamespace(project=SimpleNamespace(services=(svc,)), table=table,
                           events=SimpleNamespace(log=lambda kind, **f: events.append((kind, f))))
    ctrl = health.for_node(node)
    try:
        assert [t.key for t in ctrl.targets()] == [("app", B1), ("app", B2), ("app", B3)]
        ctrl.on_change(ctrl.targets()[0], False)
        ctrl.on_change(ctrl.targets()[0], False)     # no change: no event
        assert len(events) == 1
        kind, fields = events[0]
        assert kind == "backend" and fields["service"] == "app"
        assert fields["address"] == "10.1.0.2" and fields["healthy"] is False
        assert fields["changes"] == ["~ backend app 10.1.0.2 unhealthy"]
        assert fields["last"] == "no longer checked"   # this controller never checked it
        assert View(dp, table).in_ring == {"10.1.0.3", "10.1.0.4"}
        # the other two in one round: one event each, the service's fail open told once
        ctrl.on_batch([(t, False) for t in ctrl.targets()])
    finally:
        ctrl.prober.close()
    assert [(f["address"], f["healthy"]) for _, f in events[1:]] == [("10.1.0.3", False),
                                                                     ("10.1.0.4", False)]
    assert events[1][1]["changes"] == ["~ backend app 10.1.0.3 unhealthy"]
    assert events[2][1]["changes"][0] == "~ backend app 10.1.0.4 unhealthy"
    assert "fail open" in events[2][1]["changes"][1]
    assert len(View(dp, table).in_ring) == 3
