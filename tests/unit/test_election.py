"""zfast.ha.election.Election driven with a fake clock through every rule of its docstring:
init (alone, with an active peer, both starting), standby (silent peer, unhealthy active),
active (unhealthy steps down, two actives), no preemption. No root, no network."""

from __future__ import annotations

import pytest

from zfast.ha.election import ACTIVE, INIT, STANDBY, Election
from zfast.ha.heartbeat import Heartbeat

HB = 0.0625               # heartbeat interval of the fake pair (exact in binary: the
                          # clock arithmetic below is exact)
DEAD = 3 * HB             # the dead interval


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


class Peer:
    """The other node as its heartbeats show it."""

    def __init__(self, name: str = "b", priority: int = 100):
        self.name, self.priority, self.seq = name, priority, 0

    def hb(self, role: str, healthy: bool = True, problems=(), priority: int | None = None) -> Heartbeat:
        self.seq += 1
        return Heartbeat(node=self.name, boot="boot-" + self.name, seq=self.seq, time=0.0,
                         role=role, priority=self.priority if priority is None else priority,
                         healthy=healthy, problems=list(problems or ([] if healthy else ["xdp"])))


def election(clock: Clock, me: str = "a", priority: int = 200) -> Election:
    return Election(me, priority, DEAD, clock())


def run(e: Election, clock: Clock, seconds: float, healthy: bool = True,
        peer: Peer | None = None, peer_role: str | None = None, peer_healthy: bool = True):
    """Tick every heartbeat for `seconds` (healthy or not); the peer (if given) sends one
    heartbeat per tick."""
    out = []
    end = clock.t + seconds
    while clock.t < end - 1e-9:
        clock.advance(HB)
        t = e.tick(clock(), healthy)      # the activity controller's view first
        if t:
            out.append(t)
        if peer is not None:
            t = e.on_heartbeat(peer.hb(peer_role, peer_healthy), clock())
            if t:
                out.append(t)
    return out


def active_pair(clock: Clock, peer: Peer, me: str = "a", priority: int = 200) -> Election:
    """An election that became active alone, then heard the peer come up as standby."""
    e = election(clock, me, priority)
    run(e, clock, DEAD + HB)
    assert e.role == ACTIVE
    run(e, clock, 2 * HB, peer=peer, peer_role=STANDBY)
    assert e.role == ACTIVE
    return e


def standby_pair(clock: Clock, peer: Peer, me: str = "a", priority: int = 200) -> Election:
    """An election that started next to an active peer: standby."""
    e = election(clock, me, priority)
    run(e, clock, 2 * HB, peer=peer, peer_role=ACTIVE)
    assert e.role == STANDBY
    return e


# ---------------------------------------------------------------- init

def test_alone_becomes_active_after_the_dead_interval_not_before():
    clock = Clock()
    e = election(clock)
    start = clock()
    assert e.tick(clock(), True) is None and e.role == INIT
    clock.advance(DEAD - 0.001)
    assert e.tick(clock(), True) is None and e.role == INIT
    clock.t = start + DEAD
    t = e.tick(clock(), True)
    assert t is not None and (t.old, t.new) == (INIT, ACTIVE)
    assert "no peer" in t.reason
    assert e.history == [t]


def test_starting_next_to_an_active_peer_becomes_standby_at_once():
    clock = Clock()
    e = election(clock, priority=250)          # ranks higher: still no preemption
    clock.advance(HB)
    t = e.on_heartbeat(Peer("b", 100).hb(ACTIVE), clock())
    assert (t.old, t.new) == (INIT, STANDBY)
    run(e, clock, 1.0, peer=Peer("b", 100), peer_role=ACTIVE)
    assert e.role == STANDBY


@pytest.mark.parametrize("mine,theirs,me_wins", [
    ((200, "a"), (100, "b"), True),     # priority decides
    ((100, "a"), (200, "b"), False),
    ((100, "b"), (100, "a"), True),     # equal priorities: the name decides
    ((100, "a"), (100, "b"), False),
])
def test_both_starting_the_higher_priority_then_name_wins(mine, theirs, me_wins):
    clock = Clock()
    e = election(clock, me=mine[1], priority=mine[0])
    clock.advance(HB)
    t = e.on_heartbeat(Peer(theirs[1], theirs[0]).hb(INIT), clock())
    assert t.new == (ACTIVE if me_wins else STANDBY)
    assert "both starting" in t.reason


def test_both_starting_from_both_sides_makes_exactly_one_active():
    clock = Clock()
    a, b = election(clock, "a", 100), election(clock, "b", 100)
    pa, pb = Peer("a", 100), Peer("b", 100)
    for _ in range(10):
        clock.advance(HB)
        ra, rb = a.role, b.role
        a.on_heartbeat(pb.hb(rb), clock())
        b.on_heartbeat(pa.hb(ra), clock())
        a.tick(clock(), True)
        b.tick(clock(), True)
    assert (a.role, b.role) == (STANDBY, ACTIVE)   # same priority: "b" > "a"


def test_init_ignores_a_heartbeat_heard_before_it_started_listening():
    """A heartbeat read late (queued while the daemon was frozen) is no news of now."""
    clock = Clock()
    e = election(clock)
    e.on_heartbeat(Peer("b", 100).hb(STANDBY), clock() - 0.01)
    assert e.role == INIT
    clock.advance(HB)
    t = e.on_heartbeat(Peer("b", 100).hb(ACTIVE), clock())
    assert (t.old, t.new) == (INIT, STANDBY)


# ---------------------------------------------------------------- standby

def test_standby_takes_over_when_the_peer_is_silent_for_the_dead_interval():
    clock = Clock()
    peer = Peer("b", 100)
    e = standby_pair(clock, peer, "a", 200)
    last = clock()
    clock.t = last + DEAD - 0.001
    assert e.tick(clock(), True) is None and e.role == STANDBY
    clock.t = last + DEAD
    t = e.tick(clock(), True)
    assert (t.old, t.new) == (STANDBY, ACTIVE) and "silent" in t.reason


def test_standby_stays_while_any_heartbeat_arrives():
    clock = Clock()
    peer = Peer("b", 100)
    e = standby_pair(clock, peer)
    for _ in range(40):                   # one heartbeat every 2 intervals: still alive
        clock.advance(2 * HB)
        e.on_heartbeat(peer.hb(ACTIVE), clock())
        assert e.tick(clock(), True) is None
    assert e.role == STANDBY


def test_standby_takes_over_from_an_unhealthy_active():
    clock = Clock()
    peer = Peer("b", 100)
    e = standby_pair(clock, peer)
    clock.advance(HB)
    t = e.on_heartbeat(peer.hb(ACTIVE, healthy=False, problems=["zfast is not attached to pub0"]),
                       clock())
    assert (t.old, t.new) == (STANDBY, ACTIVE)
    assert "unhealthy" in t.reason and "pub0" in t.reason


def test_unhealthy_standby_does_not_take_over_from_an_unhealthy_active():
    clock = Clock()
    peer = Peer("b", 100)
    e = standby_pair(clock, peer)
    assert run(e, clock, 1.0, healthy=False, peer=peer, peer_role=ACTIVE, peer_healthy=False) == []
    assert e.role == STANDBY


def test_standby_takes_over_from_an_unhealthy_standby():
    clock = Clock()
    peer = Peer("b", 250)                 # ranks higher, but reports itself broken
    e = standby_pair(clock, Peer("b", 250), "a", 100)
    clock.advance(HB)
    t = e.on_heartbeat(peer.hb(STANDBY, healthy=False), clock())
    assert (t.old, t.new) == (STANDBY, ACTIVE)


def test_higher_ranked_standby_takes_over_when_the_peer_stops_being_active():
    clock = Clock()
    peer = Peer("b", 100)
    e = standby_pair(clock, peer, "a", 200)
    clock.advance(HB)
    t = e.on_heartbeat(peer.hb(STANDBY), clock())
    assert (t.old, t.new) == (STANDBY, ACTIVE) and "rank higher" in t.reason


# ---------------------------------------------------------------- active

def test_unhealthy_active_steps_down_for_a_healthy_standby():
    clock = Clock()
    peer = Peer("b", 100)
    e = active_pair(clock, peer)
    clock.advance(HB)
    t = e.tick(clock(), healthy=False)
    assert (t.old, t.new) == (ACTIVE, STANDBY) and "unhealthy" in t.reason


def test_unhealthy_active_stays_when_the_standby_is_unhealthy_too_or_gone():
    clock = Clock()
    peer = Peer("b", 100)
    e = active_pair(clock, peer)
    assert e.on_heartbeat(peer.hb(STANDBY, healthy=False), clock()) is None
    assert run(e, clock, 1.0, healthy=False, peer=peer, peer_role=STANDBY, peer_healthy=False) == []
    assert run(e, clock, 1.0, healthy=False) == []            # the peer is silent: stay
    assert e.role == ACTIVE


def test_two_actives_the_lower_rank_steps_down_the_higher_stays():
    clock = Clock()
    high = active_pair(clock, Peer("b", 100), "a", 200)
    low = active_pair(clock, Peer("a", 200), "b", 100)
    clock.advance(HB)
    assert high.on_heartbeat(Peer("b", 100).hb(ACTIVE), clock()) is None
    t = low.on_heartbeat(Peer("a", 200).hb(ACTIVE), clock())
    assert (t.old, t.new) == (ACTIVE, STANDBY) and "ranks higher" in t.reason
    assert high.role == ACTIVE


def test_two_actives_resolve_within_one_heartbeat_from_both_sides():
    """Both active (a broken path healed): after each heard the other once, one is left."""
    clock = Clock()
    a = active_pair(clock, Peer("b", 100), "a", 100)
    b = active_pair(clock, Peer("a", 100), "b", 100)
    pa, pb = Peer("a", 100), Peer("b", 100)
    pa.seq = pb.seq = 100
    clock.advance(HB)
    ra, rb = a.role, b.role
    a.on_heartbeat(pb.hb(rb), clock())
    b.on_heartbeat(pa.hb(ra), clock())
    assert sorted([a.role, b.role]) == [ACTIVE, STANDBY]
    assert b.role == ACTIVE                     # equal priority: the name
    run(a, clock, 1.0, peer=pb, peer_role=ACTIVE)
    assert a.role == STANDBY


def test_two_actives_an_unhealthy_one_yields_to_a_healthy_one_whatever_the_rank():
    """The healthy node took over because the higher-ranked one went unhealthy: the
    unhealthy one must step down and the healthy one stay (no flapping)."""
    clock = Clock()
    high, low = election(clock, "a", 200), election(clock, "b", 100)
    run(high, clock, DEAD + HB)
    run(low, clock, 0)
    low.tick(clock(), True)
    assert (high.role, low.role) == (ACTIVE, ACTIVE)
    clock.advance(HB)
    assert high.tick(clock(), healthy=False) is None      # no peer heard: nobody to yield to
    assert low.on_heartbeat(Peer("a", 200).hb(ACTIVE, healthy=False), clock()) is None
    assert low.role == ACTIVE
    t = high.on_heartbeat(Peer("b", 100).hb(ACTIVE), clock())
    assert t is not None and (t.old, t.new) == (ACTIVE, STANDBY)
    assert "healthy" in t.reason
    # and both unhealthy: the rank decides again
    clock.advance(HB)
    t = low.tick(clock(), healthy=False)
    assert t is not None and (t.old, t.new) == (ACTIVE, STANDBY) and "ranks higher" in t.reason


def test_active_stays_while_the_peer_is_a_healthy_standby_or_starting():
    clock = Clock()
    peer = Peer("b", 250)                    # ranks higher: still no preemption
    e = active_pair(clock, peer, "a", 100)
    assert run(e, clock, 1.0, peer=peer, peer_role=STANDBY) == []
    assert run(e, clock, 1.0, peer=peer, peer_role=INIT) == []
    assert e.role == ACTIVE


# ---------------------------------------------------------------- no preemption

def test_no_preemption_by_a_returning_higher_priority_node():
    """a (priority 200) was active and died; b took over. a comes back: standby, and b
    stays active, for as long as b is healthy."""
    clock = Clock()
    b_runs = standby_pair(clock, Peer("a", 200), "b", 100)
    run(b_runs, clock, DEAD + HB)              # a died: silence
    assert b_runs.role == ACTIVE
    a_returns = election(clock, "a", 200)
    pa, pb = Peer("a", 200), Peer("b", 100)
    pa.seq = 1000                              # a's new boot numbers from scratch (a new boot id)
    for _ in range(40):
        clock.advance(HB)
        ra, rb = a_returns.role, b_runs.role
        a_returns.on_heartbeat(pb.hb(rb), clock())
        b_runs.on_heartbeat(pa.hb(ra), clock())
        a_returns.tick(clock(), True)
        b_runs.tick(clock(), True)
        assert b_runs.role == ACTIVE
    assert a_returns.role == STANDBY
    assert [(t.old, t.new) for t in a_returns.history] == [(INIT, STANDBY)]
    # ... until b fails: then a takes over again
    clock.advance(HB)
    t = a_returns.on_heartbeat(pb.hb(ACTIVE, healthy=False), clock())
    assert (t.old, t.new) == (STANDBY, ACTIVE)


def test_peer_alive_is_the_dead_interval_since_the_last_heartbeat():
    clock = Clock()
    e = election(clock)
    assert not e.peer_alive(clock())
    e.on_heartbeat(Peer().hb(STANDBY), clock())
    assert e.peer_alive(clock.advance(DEAD - 0.001))
    assert not e.peer_alive(clock.advance(0.001))


# ---------------------------------------------------------------- after a freeze

def test_after_a_freeze_init_waits_the_hold_to_hear_the_peer_before_claiming_active():
    # A frozen active (SIGSTOP) resumes: the peer took over, but under load its heartbeats
    # can take longer than one dead interval to reach the node catching up. Silence for a
    # dead interval must not make it active again (a second failover): it waits the hold.
    clock, peer = Clock(), Peer()
    e = active_pair(clock, peer)
    t = e.restart_after_freeze(clock.advance(1.0), hold=8 * DEAD, reason="frozen for 1.00 s")
    assert (t.old, t.new) == (ACTIVE, INIT) and e.init_period() == 8 * DEAD
    assert run(e, clock, 4 * DEAD) == [] and e.role == INIT
    [t] = run(e, clock, HB, peer=peer, peer_role=ACTIVE)
    assert (t.old, t.new) == (INIT, STANDBY)
    # the next init period (a restart) is one dead interval again
    assert e.init_period() == DEAD


def test_after_a_freeze_with_the_peer_gone_for_good_it_becomes_active_after_the_hold():
    clock, peer = Clock(), Peer()
    e = active_pair(clock, peer)
    e.restart_after_freeze(clock.advance(1.0), hold=8 * DEAD, reason="frozen")
    assert run(e, clock, 8 * DEAD - HB) == []
    [t] = run(e, clock, HB)
    assert (t.old, t.new) == (INIT, ACTIVE) and "no peer" in t.reason
