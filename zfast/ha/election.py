"""Who is active: a small state machine, driven by heartbeats and a clock only.

Rules (docs/ha.md explains them):
  * A node starts in `init` and listens for one dead interval (heartbeats that
    arrived before it started listening do not count).  If it hears an
    active peer it becomes standby (no preemption: a returning node never takes
    over from a healthy active one).  If it hears a peer that is not active, the
    higher (priority, name) becomes active.  If it hears nothing, it becomes
    active.
  * A standby becomes active when no heartbeat of the peer arrived on any link
    for the dead interval, or when the active peer reports itself unhealthy
    while this node is healthy.
  * An active node steps down when it is unhealthy and the peer is a healthy
    standby, or when it hears another active node that wins the tie: a healthy
    node over an unhealthy one, then higher priority, then the name.  So two
    actives last at most until each has heard the other once: one heartbeat
    interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zfast.ha.heartbeat import Heartbeat

INIT, STANDBY, ACTIVE = "init", "standby", "active"


@dataclass
class Transition:
    old: str
    new: str
    reason: str


@dataclass
class Election:
    me: str
    priority: int
    dead_interval: float
    started: float
    role: str = INIT
    peer: Heartbeat | None = None
    peer_seen: float | None = None
    healthy: bool = True
    history: list[Transition] = field(default_factory=list)
    init_s: float | None = None     # this init period's length (None: the dead interval)

    def _rank(self, node: str, priority: int) -> tuple:
        return (priority, node)

    def _become(self, role: str, reason: str) -> Transition | None:
        if role == self.role:
            return None
        t = Transition(self.role, role, reason)
        self.role = role
        if role != INIT:
            self.init_s = None      # a later init period is one dead interval again
        self.history.append(t)
        return t

    def init_period(self) -> float:
        return max(self.dead_interval, self.init_s or 0.0)

    def restart_after_freeze(self, now: float, hold: float, reason: str) -> Transition | None:
        """Back to init after this node was frozen: the peer has most likely taken over,
        and its heartbeats may be slow to reach a node that is catching up; so this init
        period lasts `hold` (not one dead interval) before silence means the peer is gone."""
        self.started, self.init_s = now, hold
        return self._become(INIT, reason)

    def peer_alive(self, now: float) -> bool:
        return self.peer_seen is not None and now - self.peer_seen < self.dead_interval

    def on_heartbeat(self, hb: Heartbeat, now: float) -> Transition | None:
        self.peer, self.peer_seen = hb, now
        return self.decide(now)

    def tick(self, now: float, healthy: bool) -> Transition | None:
        self.healthy = healthy
        return self.decide(now)

    def decide(self, now: float) -> Transition | None:
        peer = self.peer if self.peer_alive(now) else None
        if self.role == INIT and peer is not None and self.peer_seen < self.started:
            # Heard before this node started listening (read late, after a freeze): the
            # peer's role then is no evidence of its role now.
            peer = None
        me_first = peer is None or self._rank(self.me, self.priority) > self._rank(peer.node, peer.priority)
        if self.role == INIT:
            if peer is not None and peer.role == ACTIVE:
                return self._become(STANDBY, f"{peer.node} is active")
            if peer is not None:
                return self._become(ACTIVE if me_first else STANDBY,
                                    f"both starting; {'we' if me_first else peer.node} rank higher")
            if now - self.started >= self.init_period():
                return self._become(ACTIVE, "no peer heard")
            return None
        if self.role == STANDBY:
            if peer is None:
                return self._become(ACTIVE, "peer silent for the dead interval"
                                    + (f" (last heard {now - self.peer_seen:.2f} s ago)"
                                       if self.peer_seen is not None else ""))
            if peer.role != ACTIVE and me_first and self.healthy:
                return self._become(ACTIVE, f"{peer.node} is {peer.role}; we rank higher")
            if peer.role == ACTIVE and not peer.healthy and self.healthy:
                return self._become(ACTIVE, f"{peer.node} is unhealthy: {', '.join(peer.problems)}")
            if peer.role == STANDBY and not peer.healthy and self.healthy:
                return self._become(ACTIVE, f"{peer.node} is an unhealthy standby")
            return None
        # ACTIVE
        if peer is None:
            return None
        if peer.role == ACTIVE:
            # Health first: an unhealthy active that outranks the healthy one (which took
            # over because this one went unhealthy) must yield, not the healthy one.
            if peer.healthy and not self.healthy:
                return self._become(STANDBY, f"{peer.node} is active too and healthy; we are not")
            if peer.healthy == self.healthy and not me_first:
                return self._become(STANDBY, f"{peer.node} is active too and ranks higher")
        if not self.healthy and peer.healthy and peer.role == STANDBY:
            return self._become(STANDBY, f"unhealthy; {peer.node} is a healthy standby")
        return None
