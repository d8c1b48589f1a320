"""Repair controller decisions (zfast.controllers.repair): pure logic driven by a fake clock.

A small world stands in for the core service: it holds each instance's InstanceState,
ticks every 0.25 s (time = a plain float), asks for a decision after each, and applies what
is decided as the core service would (a successor starts, a spare is parked or used, a
drain's revision is committed). No system access.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from zfast.controllers.repair import (
    BACKOFF_FIRST_S,
    BACKOFF_MAX_S,
    DRAIN_APPLY_S,
    DRAIN_WAIT_S,
    HEARTBEAT_MISSING_MS,
    HEARTBEAT_SETTLE_S,
    PERSIST_S,
    SPARE_RETRY_S,
    STABLE_S,
    STARVED_WAIT_S,
    STOPPED,
    Drained,
    DrainRouter,
    DropSpare,
    EndBoost,
    GrowStarved,
    InstanceState,
    MakeSpare,
    MarkStable,
    Observations,
    Repair,
    Replace,
    SoftStop,
    SpareState,
    StartSuccessor,
    Undrain,
)

TICK = 0.25
MAX_CPU = 1.0


def status(kind="balancer", role=None, links=2, revision=1, **extra) -> dict:
    st = {"role": role or ("active" if kind == "router" else "standby"), "revision": revision,
          "interfaces": [{"name": f"if{i}"} for i in range(links)],
          "controllers": {"activity": {"problems": []}}}
    if kind == "router":
        st["haproxy"] = {"alive": True}
    st.update(extra)
    return st


def healthy(name, kind="balancer", role=None, started=0.0, restarts=0, **kw) -> InstanceState:
    """An instance that answers without problems."""
    links = 2 if kind == "balancer" else 1
    st = status(kind, role, links)
    fields = dict(name=name, kind=kind, started=started, restarts=restarts, grace_s=15.0,
                  status=st, last_status=st, answered=True, links=links, cpu=0.5,
                  memory=64 << 20, memory_limit=256 << 20, haproxy_running=kind == "router")
    fields.update(kw)
    return InstanceState(**fields)


def exited(inst, code=1, words="") -> InstanceState:
    return replace(inst, alive=False, exit_code=code, last_words=words, status=None)


def silent(inst, error="timed out", throttled=0.0) -> InstanceState:
    return replace(inst, status=None, error=error, throttled=throttled)


class World:
    """The core service, as far as the controller can tell: instances, a spare, a clock."""

    def __init__(self, *instances, spare=True, resizing=False):
        self.instances = {i.name: i for i in instances}
        self.spare = SpareState("spare1", alive=True, ready=True) if spare else None
        self.resizing = resizing
        self.repair = Repair(MAX_CPU)
        self.t = 0.0
        self.log: list[tuple[float, object]] = []
        self.revision = 1
        self.successor = lambda name, started, restarts: healthy(
            name, self.instances[name].kind, role="standby" if self.instances[name].kind
            == "balancer" else None, started=started, restarts=restarts)

    def observations(self) -> Observations:
        return Observations(list(self.instances.values()), self.spare, self.resizing)

    def tick(self) -> list:
        actions = self.repair.decide(self.observations(), self.t)
        for a in actions:
            self.log.append((self.t, a))
            self.carry_out(a)
        self.t = round(self.t + TICK, 6)
        return actions

    def run(self, seconds: float) -> list:
        out = []
        for _ in range(round(seconds / TICK)):
            out += self.tick()
        return out

    def carry_out(self, a) -> None:
        if isinstance(a, StartSuccessor):
            if a.from_spare:
                assert self.spare is not None and self.spare.ready
                self.spare = None
            self.instances[a.instance] = self.successor(a.instance, self.t, a.restarts)
        elif isinstance(a, DrainRouter):
            self.revision += 1
            self.repair.drain_committed(a.instance, self.revision)
        elif isinstance(a, MakeSpare):
            self.spare = SpareState("spare2", alive=True, ready=True)
        elif isinstance(a, DropSpare):
            self.spare = None

    def set(self, name, **fields) -> None:
        self.instances[name] = replace(self.instances[name], **fields)

    def of(self, kind) -> list:
        return [(t, a) for t, a in self.log if isinstance(a, kind)]


def pair(**kw) -> World:
    return World(healthy("lb-a", role="active"), healthy("lb-b", role="standby"), **kw)


def test_constants_are_the_documented_ones():
    assert (PERSIST_S, STARVED_WAIT_S, STABLE_S) == (0.5, 2.0, 10.0)
    assert (BACKOFF_FIRST_S, BACKOFF_MAX_S, SPARE_RETRY_S) == (8.0, 60.0, 15.0)
    assert (HEARTBEAT_MISSING_MS, HEARTBEAT_SETTLE_S) == (1000, 10.0)
    assert (DRAIN_APPLY_S, DRAIN_WAIT_S) == (2.0, 5.0)


def test_a_healthy_pair_with_its_spare_needs_nothing():
    w = pair()
    assert w.run(30) == []
    h = w.repair.health_of("lb-a", 0.0)
    assert h.problems == [] and h.healthy_at == 0.0


# ---------------------------------------------------------------- problems


def problems(inst, others=(), now=100.0):
    return Repair.problems_of(inst, [inst, *others], now)


def test_exited_daemon_with_its_last_words():
    inst = healthy("lb-a")
    assert problems(exited(inst, 1, "zfast: error: no such interface")) == \
        ["daemon exited (1): zfast: error: no such interface"]
    assert problems(exited(inst, None)) == ["daemon exited (None)"]


def test_stopped_daemon():
    assert problems(replace(healthy("lb-a"), stopped=True, status=None)) == [STOPPED]


def test_a_silent_daemon_has_its_start_grace_until_it_first_answers():
    new = silent(healthy("lb-a", started=100.0, grace_s=15.0), "connection refused")
    new = replace(new, answered=False)
    assert problems(new, now=114.9) == []
    assert problems(new, now=115.1) == ["daemon does not answer: connection refused"]
    # once it has answered, silence is a fault at once
    assert problems(replace(new, answered=True), now=100.5) == \
        ["daemon does not answer: connection refused"]


def test_a_standby_whose_heartbeats_the_active_misses():
    active = healthy("lb-a", role="active")
    active.last_status = status(role="active", peer={"state": "dead", "last_heartbeat_ms": 1500.4})
    standby = healthy("lb-b", role="standby", started=0.0)
    assert problems(standby, [active], now=HEARTBEAT_SETTLE_S + 1) == \
        ["its heartbeats do not reach the active (1500 ms)"]
    # a new standby is still joining; a short gap is not missing; the active is not judged
    assert problems(standby, [active], now=HEARTBEAT_SETTLE_S - 1) == []
    active.last_status["peer"]["last_heartbeat_ms"] = HEARTBEAT_MISSING_MS
    assert problems(standby, [active], now=100.0) == []
    active.last_status["peer"] = {"state": "dead", "last_heartbeat_ms": 5000}
    assert problems(replace(active, status=active.last_status), [standby]) == []


def test_programs_detached_haproxy_gone_activity_and_memory():
    inst = healthy("lb-a")
    inst.status = status(links=1)
    assert problems(inst) == ["programs detached"]
    router = healthy("rt-a", kind="router")
    router.status = status("router", haproxy={"alive": False}, links=1)
    assert problems(router) == ["its HAProxy is not running"]
    inst = healthy("lb-a")
    inst.status["controllers"]["activity"]["problems"] = ["pub0: no carrier"]
    assert problems(inst) == ["pub0: no carrier"]
    inst = healthy("lb-a", memory=250 << 20, memory_limit=256 << 20)
    assert problems(inst) == ["memory at its limit (250 of 256 MiB)"]
    assert problems(healthy("lb-a", memory=240 << 20, memory_limit=256 << 20)) == []


# ---------------------------------------------------------------- when to replace


def test_a_gone_daemon_is_replaced_at_once_from_the_spare():
    w = pair()
    w.tick()
    w.set("lb-b", alive=False, exit_code=-9, status=None)
    t = w.t
    actions = w.tick()
    assert [type(a) for a in actions] == [Replace, StartSuccessor]
    rep, succ = actions
    assert (rep.instance, rep.problems, rep.restarts, rep.backoff_s, rep.planned) == \
        ("lb-b", ["daemon exited (-9)"], 1, 0, False)
    assert rep.lived_s == t and rep.healthy_s == t
    assert succ == StartSuccessor("lb-b", 1, planned=False, from_spare=True)
    assert w.repair.decision == {"time": t, "instance": "lb-b", "problems": ["daemon exited (-9)"],
                                 "action": "replace", "restarts": 1, "next_retry_in_s": 0}


def test_a_stopped_daemon_is_replaced_at_once():
    w = pair()
    w.set("lb-a", stopped=True, status=None)
    assert [type(a) for a in w.tick()] == [Replace, StartSuccessor]


def test_a_lesser_problem_must_last_persist_s():
    w = pair()
    w.set("lb-a", status=status(role="active", links=1))
    assert w.tick() == [] and w.tick() == []                  # 0 and 0.25 s
    actions = w.tick()                                        # 0.5 s
    assert [type(a) for a in actions] == [Replace, StartSuccessor]
    assert actions[0].problems == ["programs detached"]


def test_a_problem_that_clears_in_time_is_forgotten():
    w = pair()
    w.set("lb-a", status=status(role="active", links=1))
    w.run(0.5)
    w.set("lb-a", status=status(role="active"))
    assert w.tick() == []
    assert w.repair.health_of("lb-a", 0.0).problems == []
    # it comes back: the persistence counts again from then
    w.set("lb-a", status=status(role="active", links=1))
    assert w.run(0.5) == []
    assert [type(a) for a in w.tick()] == [Replace, StartSuccessor]


def test_the_last_working_balancer_is_not_removed_for_a_lesser_problem():
    w = pair()
    w.set("lb-a", status=status(role="active", links=1))
    w.set("lb-b", status=None, error="timed out")
    assert w.run(5) == []
    assert w.repair.health_of("lb-a", 0.0).problems == ["programs detached"]
    # the other well again: now it may go
    w.set("lb-b", status=status(role="standby"))
    assert [a.instance for a in w.run(1) if isinstance(a, Replace)] == ["lb-a"]


def test_a_gone_balancer_is_replaced_even_when_it_is_the_last():
    w = pair(spare=False)
    w.successor = lambda name, started, restarts: replace(
        healthy(name, started=started, restarts=restarts), answered=False, status=None,
        error="connection refused", grace_s=60.0)       # starting: it compiles
    w.set("lb-a", status=None, error="timed out")
    w.set("lb-b", alive=False, exit_code=1, status=None)
    actions = w.tick()
    assert [(type(a), a.instance) for a in actions if not isinstance(a, MakeSpare)] == \
        [(Replace, "lb-b"), (StartSuccessor, "lb-b")]
    # lb-a is still not replaced: lb-b's successor has not answered yet
    assert not [a for a in w.run(3) if isinstance(a, Replace)]


def test_routers_are_replaced_whatever_the_balancers_do():
    w = World(healthy("lb-a", role="active"), healthy("rt-a", kind="router"), spare=False)
    w.set("lb-a", status=None, error="timed out")
    w.set("rt-a", status=status("router", haproxy={"alive": False}, links=1))
    replaced = [a.instance for a in w.run(1) if isinstance(a, Replace)]
    assert replaced == ["rt-a"]


# ---------------------------------------------------------------- starved


def test_a_starved_daemon_grows_and_gets_its_time_to_answer():
    w = pair()
    w.set("lb-a", status=None, error="timed out", throttled=0.9, cpu=0.25)
    assert w.run(0.5) == []
    assert w.tick() == [GrowStarved("lb-a", 0.9)]            # at 0.5 s, after PERSIST_S
    grown_at = w.t - TICK
    w.set("lb-a", cpu=0.5)
    # STARVED_WAIT_S to answer before anything else is decided
    assert w.run(STARVED_WAIT_S - TICK) == []
    assert w.tick() == [GrowStarved("lb-a", 0.9)]            # still starved at 0.5: grows again
    assert w.t - TICK == grown_at + STARVED_WAIT_S


def test_a_starved_daemon_at_the_top_of_scale_cpu_is_replaced():
    w = pair()
    w.set("lb-a", status=None, error="timed out", throttled=0.9, cpu=MAX_CPU)
    actions = w.run(0.75)
    assert [type(a) for a in actions] == [Replace, StartSuccessor]


def test_a_silent_daemon_that_is_not_throttled_is_hung_not_starved():
    w = pair()
    w.set("lb-a", status=None, error="timed out", throttled=0.1, cpu=0.25)
    assert [type(a) for a in w.run(0.75)] == [Replace, StartSuccessor]


# ---------------------------------------------------------------- crash loops


def crashing(name, started, restarts):
    return exited(healthy(name, started=started, restarts=restarts), 1, "zfast: error: boom")


def test_a_successor_that_keeps_crashing_backs_off_8_16_32_60():
    w = pair(spare=False)
    w.successor = crashing
    w.set("lb-b", alive=False, exit_code=1, status=None)
    w.run(300)
    replaces = w.of(Replace)
    assert [a.backoff_s for _, a in replaces[:6]] == [0, 8, 16, 32, 60, 60]
    assert [a.restarts for _, a in replaces[:3]] == [1, 2, 3]
    times = [t for t, _ in replaces]
    gaps = [round(b - a, 2) for a, b in zip(times, times[1:])]
    assert gaps[:5] == [0.25, 8.0, 16.0, 32.0, 60.0]
    assert w.repair.crashes["lb-b"] >= 5
    assert not w.of(MakeSpare)                  # no spare while anything fails


def test_a_crash_is_failing_before_stable_s_healthy_however_long_it_lived():
    w = pair(spare=False)
    w.set("lb-b", restarts=1, started=0.0)
    w.run(STABLE_S - 1)                         # healthy for 9 s
    w.set("lb-b", alive=False, exit_code=1, status=None)
    w.run(1)
    assert [a.backoff_s for _, a in w.of(Replace)] == [BACKOFF_FIRST_S]
    # a long start (never healthy) then a failure is a crash too
    w = pair(spare=False)
    w.set("lb-b", restarts=1, answered=False, status=None, error="refused", grace_s=60.0)
    w.run(30)
    w.set("lb-b", alive=False, exit_code=1)
    w.run(1)
    assert [a.backoff_s for _, a in w.of(Replace)] == [BACKOFF_FIRST_S]


def test_healthy_for_stable_s_ends_the_crash_loop():
    w = pair(spare=False)
    w.successor = crashing
    w.set("lb-b", alive=False, exit_code=1, status=None)
    w.run(5)                        # replaced at 0 (no crash) and 0.25 (a crash): 8 s back-off
    assert w.repair.crashes["lb-b"] == 1
    w.successor = lambda name, started, restarts: healthy(name, started=started, restarts=restarts)
    w.run(20)                       # the crashed one replaced at 8.25 (crash 2), then well
    [(t_ok, _)] = [x for x in w.log if isinstance(x[1], StartSuccessor)][-1:]
    assert t_ok == 8.25
    [(t_stable, stable)] = w.of(MarkStable)
    assert stable == MarkStable("lb-b", after_crashes=2)
    assert t_stable == t_ok + TICK + STABLE_S     # healthy from its first answer
    assert w.repair.crashes["lb-b"] == 0 and "lb-b" not in w.repair.next_try
    # the next failure is repaired at once, without back-off
    w.set("lb-b", alive=False, exit_code=1, status=None)
    rep = [a for a in w.tick() if isinstance(a, Replace)]
    assert [(a.backoff_s, a.problems) for a in rep] == [(0, ["daemon exited (1)"])]


def test_the_first_failure_of_an_original_instance_is_no_crash():
    w = pair(spare=False)
    w.set("lb-a", alive=False, exit_code=1, status=None)          # restarts 0, never healthy
    w.instances["lb-a"].answered = False
    rep = [a for a in w.tick() if isinstance(a, Replace)]
    assert rep[0].backoff_s == 0 and rep[0].healthy_s is None


def test_a_planned_replacement_is_never_a_crash():
    w = pair(spare=False)
    w.successor = crashing
    w.set("lb-b", alive=False, exit_code=1, status=None)
    w.run(1)
    w.successor = lambda name, started, restarts: healthy(name, started=started, restarts=restarts)
    w.run(9)
    assert w.repair.crashes["lb-b"] > 0
    actions = w.repair.replace_planned(w.instances["lb-b"], ["flow table 65536 -> 262144"], w.t)
    rep, succ = actions
    assert (rep.planned, rep.backoff_s, rep.restarts) == (True, 0, w.instances["lb-b"].restarts + 1)
    assert succ.planned and w.repair.crashes["lb-b"] == 0
    assert w.repair.decision["action"] == "resize"


def test_a_successor_has_a_health_of_its_own():
    w = pair()
    w.run(1)
    assert w.repair.health_of("lb-b", 0.0).healthy_at == 0.0
    fresh = w.repair.health_of("lb-b", 5.0)                 # a successor started at 5 s
    assert (fresh.problems, fresh.healthy_at) == ([], None)
    w.set("lb-b", started=5.0, answered=False, status=None, error="refused")
    w.tick()
    assert w.repair.health_of("lb-b", 5.0).healthy_at is None   # not until it answers


# ---------------------------------------------------------------- the spare


def test_one_spare_is_parked_once_everything_is_well():
    w = pair(spare=False)
    assert w.tick() == [MakeSpare()]
    assert w.run(10) == []                                  # it has one now


def test_no_spare_while_anything_fails_or_has_not_answered_or_a_resize_runs():
    w = pair(spare=False)
    w.set("lb-a", status=status(role="active", links=1))
    w.set("lb-b", status=None, error="timed out")
    assert not w.of(MakeSpare) and not w.run(3)
    w = pair(spare=False)
    w.set("lb-b", answered=False, status=None, error="refused", started=0.0, grace_s=60.0)
    assert w.run(3) == []
    w = pair(spare=False, resizing=True)
    assert w.run(3) == []


def test_a_spare_serves_one_replacement_only():
    w = pair()
    w.set("lb-a", alive=False, exit_code=1, status=None)
    w.set("lb-b", alive=False, exit_code=1, status=None)
    succ = [a for a in w.tick() if isinstance(a, StartSuccessor)]
    assert [(a.instance, a.from_spare) for a in succ] == [("lb-a", True), ("lb-b", False)]


def test_a_spare_not_ready_yet_is_not_used():
    w = pair()
    w.spare = SpareState("spare1", alive=True, ready=False)
    w.set("lb-b", alive=False, exit_code=1, status=None)
    assert [a.from_spare for a in w.tick() if isinstance(a, StartSuccessor)] == [False]


def test_a_dead_spare_is_dropped_and_the_next_one_comes_later():
    w = pair()
    w.spare = SpareState("spare1", alive=False, ready=False)
    assert w.tick() == [DropSpare("spare1")]
    dropped_at = w.t - TICK
    w.run(SPARE_RETRY_S + 1)
    [(t, _)] = w.of(MakeSpare)
    assert t == dropped_at + SPARE_RETRY_S


def test_routers_never_start_from_the_spare():
    w = World(healthy("lb-a", role="active"), healthy("rt-a", kind="router"))
    w.set("rt-a", alive=False, exit_code=1, status=None)
    w.run(10)
    assert [a.from_spare for _, a in w.of(StartSuccessor)] == [False]
    assert w.spare is not None


# ---------------------------------------------------------------- start boost


def test_the_start_boost_ends_when_the_instance_answers():
    w = pair()
    w.set("lb-b", boosted=True, answered=False, status=None, error="refused")
    assert w.tick() == []
    w.set("lb-b", answered=True, status=status())
    assert w.tick() == [EndBoost("lb-b")]


# ---------------------------------------------------------------- router drain


def router_world(**kw) -> World:
    return World(healthy("lb-a", role="active"), healthy("lb-b", role="standby"),
                 healthy("rt-a", kind="router"), healthy("rt-b", kind="router"), **kw)


def balancers_at(w, revision):
    for name in ("lb-a", "lb-b"):
        w.set(name, status={**w.instances[name].status, "revision": revision})


def test_a_router_is_drained_step_by_step_then_replaced():
    w = router_world()
    w.set("rt-a", status=status("router", haproxy={"alive": False}, links=1))
    w.run(0.5)
    t0 = w.t
    assert [type(a) for a in w.tick()] == [Replace, DrainRouter]
    assert w.repair.drained == {"rt-a"} and w.repair.busy
    # weight 0 committed as revision 2; the balancers are still at 1
    assert w.run(1) == []
    balancers_at(w, 2)
    assert w.tick() == [SoftStop("rt-a")]
    applied = round(w.t - TICK - t0, 2)
    # HAProxy still finishing its responses
    assert w.run(1) == []
    w.set("rt-a", haproxy_running=False)
    actions = w.tick()
    assert actions == [Drained("rt-a", round(w.t - TICK - t0, 2), applied),
                       StartSuccessor("rt-a", 1, planned=False, from_spare=False)]
    assert not w.repair.busy
    # its successor answers and is well: back in rotation
    assert w.repair.drained == {"rt-a"}
    assert w.tick() == [Undrain(["rt-a"])]
    assert w.repair.drained == set()


def test_a_drain_does_not_wait_for_balancers_past_drain_apply_s():
    w = router_world()
    w.set("rt-a", alive=False, exit_code=1, status=None)
    w.tick()
    t0 = w.t - TICK
    w.run(DRAIN_APPLY_S - TICK)
    assert not w.of(SoftStop)
    w.tick()
    [(t, _)] = w.of(SoftStop)
    assert t == t0 + DRAIN_APPLY_S


def test_a_drain_gives_haproxy_drain_wait_s_at_most():
    w = router_world()
    w.set("rt-a", status=status("router", haproxy={"alive": False}, links=1))
    w.run(0.75)
    t0 = w.of(DrainRouter)[0][0]
    balancers_at(w, 2)
    w.run(10)
    [(t, drained)] = w.of(Drained)
    assert t == t0 + DRAIN_WAIT_S and drained.seconds == DRAIN_WAIT_S
    assert [x[0] for x in w.of(StartSuccessor)] == [t]


def test_a_drain_that_cannot_be_committed_replaces_the_router_without_it():
    w = router_world()
    w.set("rt-a", alive=False, exit_code=1, status=None)
    actions = w.repair.decide(w.observations(), 0.0)
    assert [type(a) for a in actions] == [Replace, DrainRouter]
    w.repair.drain_committed("rt-a", None)
    assert w.repair.decide(w.observations(), 0.25) == [
        StartSuccessor("rt-a", 1, planned=False, from_spare=False)]


def test_the_loop_keeps_repairing_others_while_a_router_drains():
    w = router_world()
    w.set("rt-a", alive=False, exit_code=1, status=None)
    w.tick()
    w.set("lb-b", alive=False, exit_code=1, status=None)
    actions = w.tick()
    assert [(type(a), a.instance) for a in actions] == [(Replace, "lb-b"), (StartSuccessor, "lb-b")]
    assert w.repair.busy


def test_a_healthy_router_drained_for_a_resize_stays_drained_until_replaced():
    w = router_world()
    w.run(1)
    actions = w.repair.replace_planned(w.instances["rt-b"], ["flow table 65536 -> 262144"], w.t)
    assert [type(a) for a in actions] == [Replace, DrainRouter]
    for a in actions:
        w.carry_out(a)
    w.t += TICK
    # healthy and answering, but on its way out: never back in rotation meanwhile
    out = w.run(1)
    assert not [a for a in out if isinstance(a, Undrain)] and w.repair.drained == {"rt-b"}
    assert not [a for a in out if isinstance(a, MakeSpare)]


def test_the_other_router_is_not_drained():
    w = router_world()
    w.set("rt-a", alive=False, exit_code=1, status=None)
    w.run(10)
    assert [a.instance for _, a in w.of(DrainRouter)] == ["rt-a"]
    assert w.repair.drained == set()


@pytest.mark.parametrize("kind", ["balancer", "router"])
def test_every_decision_is_recorded(kind):
    w = router_world()
    name = "lb-b" if kind == "balancer" else "rt-b"
    w.set(name, alive=False, exit_code=3, status=None)
    w.tick()
    assert w.repair.decision["instance"] == name
    assert w.repair.decision["problems"] == ["daemon exited (3)"]
