"""The repair controller's decisions: which instances of the core service are abnormal,
and what replaces them.

Pure logic (no process, no API call, no clock of its own), so a unit test drives it in
milliseconds: zfast/core/observe.py turns what the core service sees of each instance
into an ``InstanceState``, ``Repair.decide(observations, now)`` returns the actions, and
zfast/core/service.py carries them out in order.

The rules (docs/operations.md, "Repair"):
- problems: a daemon gone (exited) or stopped (SIGSTOP) is replaced at once; one that does
  not answer (after its start grace, when it never answered), lost its programs, reports
  activity problems, sits at its memory limit, (a standby) whose heartbeats the active has
  not heard for a second, or (a router) whose HAProxy is gone, once the problem lasted
  ``PERSIST_S``.
- starved: a silent daemon whose quota ran out in most periods gets more CPU (the scaling
  controller's decision) and ``STARVED_WAIT_S`` to answer, not a successor.
- the last working balancer is never removed for a lesser problem than gone/stopped.
- crash loops: a successor that fails before ``STABLE_S`` healthy (or before it ever was)
  is a crash; the next try waits 8, 16, 32, 60 s. ``STABLE_S`` healthy ends the loop.
- the spare: a successor balancer is the parked spare when it is ready; one spare is kept
  while every instance is well (none while anything fails: a crash loop stays cheap), and
  none while the flow table is being resized (it would be compiled for the old size).
- routers are drained before they go, one step a tick (``RouterDrain``): weight 0 in a
  store revision, every balancer applies it, HAProxy soft-stops, then the successor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zfast.controllers.scaling import starved

PERSIST_S = 0.5            # a problem (other than a gone daemon) must last this long
STARVED_WAIT_S = 2.0       # after a starved daemon's quota grew: its time to answer again
HEARTBEAT_MISSING_MS = 1000  # a standby the active has not heard from for this long is abnormal
HEARTBEAT_SETTLE_S = 10.0  # ... once it has run this long (a new standby is still joining)
STABLE_S = 10.0            # failing before this long healthy (or never healthy) is a crash
BACKOFF_FIRST_S = 8.0      # a start costs ~0.35 s of CPU (Python, imports): one try in 8 s
BACKOFF_MAX_S = 60.0       # is under 5 % of a CPU, and it only gets rarer
SPARE_RETRY_S = BACKOFF_MAX_S / 4   # a parked spare that died: the next one this much later
DRAIN_APPLY_S = 2.0        # a drained router's weight 0: how long every balancer may take
DRAIN_WAIT_S = 5.0         # the whole drain (HAProxy's soft stop included) at most

STOPPED = "daemon stopped (SIGSTOP): it does nothing until continued"
NOT_ANSWERING = "daemon does not answer"


# ---- what the controller is told ------------------------------------------------------


@dataclass
class InstanceState:
    """One instance as the core service sees it this tick."""
    name: str
    kind: str                       # balancer | router
    started: float                  # when this instance (not its predecessors) started
    restarts: int
    grace_s: float                  # how long it may take to answer first (its start)
    alive: bool = True              # its daemon process runs
    exit_code: int | None = None    # when it does not
    last_words: str = ""            # the last line its daemon printed (why it exited)
    stopped: bool = False           # stopped by a signal (state T: SIGSTOP, SIGTSTP)
    status: dict | None = None      # its answer to GET /status this tick (None: none)
    error: str = ""                 # why it did not answer
    last_status: dict | None = None  # its last answer (this tick's or an older one)
    answered: bool = False          # it has answered since it started
    links: int = 0                  # interfaces it must have its programs on
    memory: int = 0                 # bytes its cgroup uses
    memory_limit: int = 0
    cpu: float = 0.0                # its CPU quota
    throttled: float = 0.0          # share of CFS periods throttled since the last look
    boosted: bool = False           # still starting with more CPU than its own
    haproxy_running: bool = False   # (a router) its HAProxy master still runs


@dataclass
class SpareState:
    name: str
    alive: bool                     # its parked daemon runs
    ready: bool                     # ... and has loaded the program: it can take a place


@dataclass
class Observations:
    instances: list[InstanceState]
    spare: SpareState | None = None
    resizing: bool = False          # a rolling flow-table resize is under way


# ---- what it decides ------------------------------------------------------------------


@dataclass
class EndBoost:
    """The instance answered: back to its own CPU quota."""
    instance: str


@dataclass
class MarkStable:
    """Healthy for STABLE_S after crashes: the crash loop is over (an event)."""
    instance: str
    after_crashes: int


@dataclass
class GrowStarved:
    """Starved, not hung: more CPU now (the scaling controller's starved rule)."""
    instance: str
    throttled: float


@dataclass
class Replace:
    """The instance goes (the decision, for the record and the event); its successor
    starts with StartSuccessor, at once or (a router) once drained."""
    instance: str
    problems: list[str]
    restarts: int                   # the successor's
    backoff_s: float                # before the next try, should the successor fail too
    planned: bool                   # a resize, not a fault
    lived_s: float
    healthy_s: float | None


@dataclass
class DrainRouter:
    """Commit the router's weight 0 (it is in ``Repair.drained``); report the revision
    with ``Repair.drain_committed``."""
    instance: str


@dataclass
class SoftStop:
    """Every balancer has the weight 0 (or it took too long): HAProxy's soft stop."""
    instance: str


@dataclass
class Drained:
    """The router is out of the rotation (an event)."""
    instance: str
    seconds: float
    weight_0_applied_s: float


@dataclass
class StartSuccessor:
    """Remove the instance and start its successor (the parked spare when from_spare)."""
    instance: str
    restarts: int
    planned: bool
    from_spare: bool


@dataclass
class Undrain:
    """These routers are back and well: weight 1 again (they left ``Repair.drained``)."""
    instances: list[str]


@dataclass
class MakeSpare:
    """Park a new spare balancer."""


@dataclass
class DropSpare:
    """The parked spare's daemon died: remove what is left of it."""
    name: str


Action = (EndBoost | MarkStable | GrowStarved | Replace | DrainRouter | SoftStop | Drained
          | StartSuccessor | Undrain | MakeSpare | DropSpare)


# ---- its state ------------------------------------------------------------------------


@dataclass
class Health:
    """One instance's health, for as long as it is that instance (``started``)."""
    started: float
    problems: list[str] = field(default_factory=list)
    since: float = 0.0                  # when the current problems (or their absence) began
    healthy_at: float | None = None     # first answer without problems (None: never yet)


# A router's drain, one step a tick (the tick keeps repairing and scaling the others).
COMMIT, APPLY, STOPPING = "commit", "apply", "stopping"


@dataclass
class RouterDrain:
    successor: StartSuccessor
    since: float
    step: str = COMMIT              # commit -> apply -> stopping -> (the successor)
    revision: int | None = None     # the revision with its weight 0 (None: not committed)
    applied_s: float | None = None


class Repair:
    """Every instance's health, crash history and back-off; the routers out of rotation."""

    def __init__(self, max_cpu: float):
        self.max_cpu = max_cpu          # the top of scale.cpu (the starved rule stops there)
        self.health: dict[str, Health] = {}
        self.crashes: dict[str, int] = {}       # crashes in a row (back-off exponent)
        self.next_try: dict[str, float] = {}
        self.spare_next_try = 0.0
        self.drained: set[str] = set()          # routers at weight 0 (in the shared file)
        self.drains: dict[str, RouterDrain] = {}
        self.decision: dict | None = None       # the last replacement, for core status
        self._spare_free = False                # a ready spare nobody took yet this tick
        self._gone: set[str] = set()            # replaced this tick

    def health_of(self, name: str, started: float) -> Health:
        """The health of the instance that started at ``started`` (a successor's is new)."""
        h = self.health.get(name)
        return h if h is not None and h.started == started else Health(started)

    @property
    def busy(self) -> bool:
        """A replacement is under way (a router draining)."""
        return bool(self.drains)

    # ---- problems ---------------------------------------------------------------------

    @staticmethod
    def problems_of(inst: InstanceState, others: list[InstanceState], now: float) -> list[str]:
        """What is wrong with an instance now (empty: healthy, or still starting)."""
        if not inst.alive:
            return [f"daemon exited ({inst.exit_code})"
                    + (f": {inst.last_words}" if inst.last_words else "")]
        if inst.stopped:
            return [STOPPED]
        st = inst.status
        if st is None:
            if not inst.answered and now - inst.started < inst.grace_s:
                return []       # still starting (compiling the program takes seconds)
            return [f"{NOT_ANSWERING}: {inst.error}"]
        problems = []
        if inst.kind == "balancer" and st.get("role") == "standby":
            # heartbeat missing: its daemon answers, but the active has not heard it for a
            # while (the active is the one to trust: it keeps the VIPs and the flows)
            for other in others:
                ost = other.last_status or {}
                peer = ost.get("peer") or {}
                if (other.name != inst.name and ost.get("role") == "active"
                        and peer.get("state") == "dead"
                        and (peer.get("last_heartbeat_ms") or 0) > HEARTBEAT_MISSING_MS
                        and now - inst.started > HEARTBEAT_SETTLE_S):
                    problems.append(f"its heartbeats do not reach the active "
                                    f"({peer['last_heartbeat_ms']:.0f} ms)")
        if len(st.get("interfaces", [])) < inst.links:
            problems.append("programs detached")
        if inst.kind == "router" and not (st.get("haproxy") or {}).get("alive"):
            problems.append("its HAProxy is not running")
        activity = (st.get("controllers") or {}).get("activity") or {}
        problems += activity.get("problems", [])
        if inst.memory_limit and inst.memory > 0.95 * inst.memory_limit:
            problems.append(f"memory at its limit ({inst.memory >> 20} of "
                            f"{inst.memory_limit >> 20} MiB)")
        return problems

    # ---- decisions --------------------------------------------------------------------

    def decide(self, obs: Observations, now: float) -> list[Action]:
        """This tick's actions, in the order to carry them out."""
        actions: list[Action] = []
        self._gone = set()
        self._spare_free = bool(obs.spare and obs.spare.alive and obs.spare.ready)
        for inst in obs.instances:
            if inst.boosted and inst.answered:
                actions.append(EndBoost(inst.name))
            if inst.name in self.drains:
                actions += self._drain_step(inst.name, obs, now)
            else:
                actions += self._repair(inst, obs, now)
        actions += self._undrain(obs)
        actions += self._spare(obs, now)
        return actions

    def _repair(self, inst: InstanceState, obs: Observations, now: float) -> list[Action]:
        problems = self.problems_of(inst, obs.instances, now)
        h = self.health.get(inst.name)
        if h is None or h.started != inst.started:
            h = self.health[inst.name] = Health(inst.started, since=now)
        if not problems:
            h.problems, h.since = [], now
            if h.healthy_at is None and inst.answered:
                h.healthy_at = now
            if (self.crashes.get(inst.name) and h.healthy_at is not None
                    and now - h.healthy_at >= STABLE_S):
                # the crash loop is over: a later failure is repaired at once, not after
                # what is left of the last back-off
                stable = MarkStable(inst.name, self.crashes[inst.name])
                self.crashes[inst.name] = 0
                self.next_try.pop(inst.name, None)
                return [stable]
            return []
        if not h.problems:
            h.since = now
        h.problems = problems
        # A gone or stopped daemon is replaced at once (neither comes back by itself);
        # other problems must last a moment.
        gone = not inst.alive or inst.stopped
        if not gone and now - h.since < PERSIST_S:
            return []
        if (not gone and all(p.startswith(NOT_ANSWERING) for p in problems)
                and starved(inst.cpu, inst.throttled, self.max_cpu)):
            # a successor with the same quota would starve the same way
            h.since = now + STARVED_WAIT_S - PERSIST_S
            return [GrowStarved(inst.name, inst.throttled)]
        if now < self.next_try.get(inst.name, 0):
            return []
        if not gone and inst.kind == "balancer" and not self._others_well(inst.name, obs):
            return []   # never take down the last working balancer for a lesser problem
        return self._replace(inst, problems, now, planned=False)

    def _others_well(self, name: str, obs: Observations) -> bool:
        """Whether another balancer is up and answering (then this one may be replaced)."""
        return any(o.name != name and o.kind == "balancer" and o.answered and o.alive
                   and o.name not in self._gone
                   and not self.health_of(o.name, o.started).problems
                   for o in obs.instances)

    def replace_planned(self, inst: InstanceState, problems: list[str], now: float) -> list[Action]:
        """A replacement the scaling controller wants (a flow-table resize): no crash."""
        return self._replace(inst, problems, now, planned=True)

    def _replace(self, inst: InstanceState, problems: list[str], now: float,
                 planned: bool) -> list[Action]:
        """The successor: the parked spare when one is ready (no compile: seconds sooner),
        else a new instance. A successor that dies within STABLE_S of being healthy (or
        before it ever was) makes the next try wait (8, 16, 32, 60 s). How long it lived
        does not count: a start that took long (a compile on a busy machine) and then
        served is no crash loop."""
        name = inst.name
        healthy_at = self.health_of(name, inst.started).healthy_at
        crashed = (not planned and inst.restarts > 0
                   and (healthy_at is None or now - healthy_at < STABLE_S))
        self.crashes[name] = self.crashes.get(name, 0) + 1 if crashed else 0
        restarts = inst.restarts + 1
        backoff = (min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.crashes[name] - 1))
                   if crashed else 0)
        self.next_try[name] = now + backoff
        self.decision = {"time": now, "instance": name, "problems": problems,
                         "action": "resize" if planned else "replace",
                         "restarts": restarts, "next_retry_in_s": backoff}
        replace = Replace(name, problems, restarts, backoff, planned,
                          lived_s=round(now - inst.started, 2),
                          healthy_s=round(now - healthy_at, 2) if healthy_at is not None else None)
        # the spare even after a crash: it costs no compile, and none is made while
        # anything fails, so a crash loop uses it once at most
        from_spare = inst.kind == "balancer" and self._spare_free
        successor = StartSuccessor(name, restarts, planned, from_spare)
        if inst.kind == "router":
            self.drained.add(name)
            self.drains[name] = RouterDrain(successor, since=now)
            return [replace, DrainRouter(name)]
        self._spare_free = self._spare_free and not from_spare
        self._gone.add(name)
        return [replace, successor]

    # ---- routers out of and back into rotation ---------------------------------------

    def drain_committed(self, name: str, revision: int | None) -> None:
        """The revision that gives the router weight 0 (None: the commit failed, the
        router goes without a drain)."""
        d = self.drains.get(name)
        if d is not None:
            d.revision, d.step = revision, APPLY

    def _drain_step(self, name: str, obs: Observations, now: float) -> list[Action]:
        """Before a router goes: the balancers stop sending it new connections (weight 0,
        a store revision they apply in ~0.1 s), then its HAProxy soft-stops: it closes its
        listeners and each keep-alive connection after its current response, so clients
        reconnect (to the other router) instead of seeing an error."""
        d = self.drains[name]
        if d.step == COMMIT:
            return []                   # drain_committed not called yet
        if d.step == APPLY:
            if d.revision is None:
                return self._drained(name, None, now)
            # Every balancer that answers must have it (not just one: the standby may apply
            # it first while the active still sends new connections to a router about to
            # stop listening, which clients see as refused connections).
            revs = [o.status["revision"] for o in obs.instances
                    if o.kind == "balancer" and o.status and "revision" in o.status]
            if not (revs and min(revs) >= d.revision) and now - d.since < DRAIN_APPLY_S:
                return []
            d.applied_s, d.step = round(now - d.since, 2), STOPPING
            return [SoftStop(name)]
        router = next((o for o in obs.instances if o.name == name), None)
        if router is not None and router.haproxy_running and now - d.since < DRAIN_WAIT_S:
            return []
        return self._drained(name, Drained(name, round(now - d.since, 2), d.applied_s), now)

    def _drained(self, name: str, event: Drained | None, now: float) -> list[Action]:
        d = self.drains.pop(name)
        self._gone.add(name)
        return ([event] if event else []) + [d.successor]

    def _undrain(self, obs: Observations) -> list[Action]:
        back = sorted(o.name for o in obs.instances
                      if o.name in self.drained and o.name not in self.drains
                      and o.name not in self._gone and o.answered
                      and not self.health_of(o.name, o.started).problems)
        if not back:
            return []
        self.drained -= set(back)
        return [Undrain(back)]

    # ---- the spare --------------------------------------------------------------------

    def _spare(self, obs: Observations, now: float) -> list[Action]:
        """Keep one parked spare while the pair is well (none while an instance is failing:
        a crash loop must stay cheap)."""
        sp = obs.spare
        if sp is not None:
            if not sp.alive:            # the parked daemon died: make another later
                self.spare_next_try = now + SPARE_RETRY_S
                return [DropSpare(sp.name)]
            return []
        if now < self.spare_next_try or obs.resizing or self._gone or self.drains:
            return []
        if any(self.health_of(o.name, o.started).problems or not o.answered
               for o in obs.instances):
            return []
        return [MakeSpare()]
