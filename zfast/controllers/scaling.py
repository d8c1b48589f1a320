"""The scaling controller's decisions: vertical sizes of an instance from its measured load.

Pure logic (no cgroup, no map, no clock of its own), so a unit test drives it in
milliseconds; zfast/core/resizer.py feeds it one sample a second per instance and carries
out what it decides (cgroup limits at once; a flow-table size by a rolling replacement).

Three resources, each with its own rule, all with hysteresis (grow above a high mark, shrink
only well below a low one), min/max bounds from ``core.balancer.scale`` and a cooldown:
- cpu: the instance's CPU use over its quota (p90 of the window), or throttled periods;
  grow x2 above 80 % (or 20 % of periods throttled); shrink /2 when p90 stays under 30 %.
- memory: used over limit; grow x2 above 80 %; shrink /2 under 30 % if what is used would
  still be under 60 % of the new limit.
- flow_table: entries over capacity (an LRU table sits near 100 % when too small: it
  evicts); grow x4 above 85 %; shrink /4 when the fill would stay under 50 % after it.
A resource grows after ``GROW_SETTLE_S`` of full-window evidence; it shrinks only after
``cooldown_s`` without any change of it, on a window entirely below the low mark. A CPU
quota also remembers why it grew: it goes back to a quota found too small only when
the load is under half of its peak then (without that, a bursty daemon at 0.25 CPU is
throttled, grows to 0.5, looks idle there and shrinks again, every cooldown). Every
decision carries the numbers that drove it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from zfast.dataplane.reasons import defines

WINDOW = 10                 # samples (one a second) a decision looks at
GROW_SETTLE_S = 5.0         # after a change, wait this long before growing the same resource again
CPU_HIGH, CPU_LOW, THROTTLED_HIGH = 0.80, 0.30, 0.20
MEM_HIGH, MEM_LOW, MEM_TARGET = 0.80, 0.30, 0.60
FLOWS_HIGH, FLOWS_AFTER_SHRINK = 0.85, 0.50
CPU_STEP = 0.05             # CPU quotas are multiples of this


@dataclass
class Bounds:
    cpu: tuple[float, float] = (0.25, 2.0)
    memory: tuple[int, int] = (128 << 20, 1 << 30)
    flow_table: tuple[int, int] = (defines()["ZF_FLOW_TABLE"], 1 << 20)  # from the C default size
    cooldown_s: float = 60.0


@dataclass
class Sample:
    time: float
    cpu: float              # CPUs used over the last interval
    throttled: float        # share of CFS periods throttled (0..1), 0 when unknown
    memory: int             # bytes used
    flows: int              # flow-table entries
    pps: float = 0.0        # packets a second through the instance (for the record)


@dataclass
class Sizes:
    cpu: float
    memory: int
    flow_table: int


@dataclass
class Decision:
    resource: str           # cpu | memory | flow_table
    old: float
    new: float
    reason: str
    numbers: dict = field(default_factory=dict)

    def as_event(self, instance: str) -> dict:
        return {"instance": instance, "resource": self.resource, "old": self.old,
                "new": self.new, "reason": self.reason, **self.numbers}


def _round_cpu(value: float) -> float:
    return round(math.ceil(value / CPU_STEP - 1e-9) * CPU_STEP, 2)


STARVED = 0.5               # throttled in over half its periods while not answering: starved


def starved(cpu: float, throttled: float, max_cpu: float) -> bool:
    """Whether a daemon that does not answer at quota ``cpu`` is starved, not hung: its
    quota ran out in most periods (a stopped process is never throttled) and may grow."""
    return throttled > STARVED and cpu < max_cpu


class Scaler:
    """One instance's load history and last changes."""

    def __init__(self, bounds: Bounds):
        self.bounds = bounds
        self.samples: deque[Sample] = deque(maxlen=WINDOW)
        self.changed: dict[str, float] = {}     # resource -> time of its last change
        self.first: float | None = None         # the first sample's time (the instance's start)
        self.too_small: dict[float, float] = {}  # CPU quota it grew from -> CPUs used then

    def add(self, sample: Sample) -> None:
        if self.first is None:
            self.first = sample.time
        self.samples.append(sample)

    def _window(self, attr: str) -> np.ndarray:
        return np.array([getattr(s, attr) for s in self.samples], dtype=float)

    def _may_grow(self, resource: str, now: float) -> bool:
        return len(self.samples) == WINDOW and now - self.changed.get(resource, -1e18) >= GROW_SETTLE_S

    def _may_shrink(self, resource: str, now: float) -> bool:
        last = self.changed.get(resource, self.first if self.first is not None else now)
        return len(self.samples) == WINDOW and now - last >= self.bounds.cooldown_s

    def decide(self, sizes: Sizes, now: float, flows: bool = True) -> list[Decision]:
        """What to change now (possibly nothing); records the changes it returns.
        ``flows``: decide the flow table too (the pair's is decided on its active)."""
        if not self.samples:
            return []
        out = [d for d in (self._cpu(sizes, now), self._memory(sizes, now),
                           self._flows(sizes, now) if flows else None) if d is not None]
        for d in out:
            self.changed[d.resource] = now
        return out

    def grow_starved(self, cpu: float, throttled: float, now: float) -> Decision | None:
        """A daemon that does not answer while its quota runs out in most periods is
        starved, not hung (a stopped process is never throttled): its quota grows now,
        without a full window. A successor with the same quota would starve as well."""
        hi = self.bounds.cpu[1]
        if not starved(cpu, throttled, hi):
            return None
        self.changed["cpu"] = now
        self.too_small[cpu] = cpu         # starved: it would have used all of it and more
        return Decision("cpu", cpu, min(hi, _round_cpu(cpu * 2)),
                        f"starved: throttled in {throttled:.0%} of its periods while it "
                        f"does not answer", {"throttled": round(throttled, 3)})

    def _cpu(self, sizes: Sizes, now: float) -> Decision | None:
        lo, hi = self.bounds.cpu
        use = self._window("cpu") / max(sizes.cpu, 1e-6)
        # throttling measured under an older quota says nothing of this one
        since = self.changed.get("cpu", -1e18)
        throttled = np.array([s.throttled for s in self.samples if s.time > since] or [0.0])
        p50, p90 = (float(x) for x in np.percentile(use, [50, 90]))
        numbers = {"cpu_use_p50": round(p50, 3), "cpu_use_p90": round(p90, 3),
                   "throttled_p90": round(float(np.percentile(throttled, 90)), 3),
                   "samples": len(use)}
        if self._may_grow("cpu", now) and sizes.cpu < hi and (
                p90 > CPU_HIGH or numbers["throttled_p90"] > THROTTLED_HIGH):
            new = min(hi, _round_cpu(sizes.cpu * 2))
            reason = (f"p90 use {p90:.0%} of the quota" if p90 > CPU_HIGH else
                      f"throttled in {numbers['throttled_p90']:.0%} of its periods (p90)")
            # the load that ran it out, at its peak (the window's p90 is mostly the idle
            # samples before a load that just began)
            self.too_small[sizes.cpu] = float(use.max()) * sizes.cpu
            return Decision("cpu", sizes.cpu, new, reason, numbers)
        if self._may_shrink("cpu", now) and sizes.cpu > lo and float(use.max()) < CPU_LOW:
            new = max(lo, _round_cpu(sizes.cpu / 2))
            used_max = float(use.max()) * sizes.cpu
            if any(new <= quota and used_max >= load / 2 for quota, load in self.too_small.items()):
                return None     # the load that found `new` (or more) too small is not gone
            if new < sizes.cpu:
                return Decision("cpu", sizes.cpu, new,
                                f"use under {CPU_LOW:.0%} of the quota for the whole window", numbers)
        return None

    def _memory(self, sizes: Sizes, now: float) -> Decision | None:
        lo, hi = self.bounds.memory
        used = self._window("memory")
        share = used / max(sizes.memory, 1)
        numbers = {"memory_used_max": int(used.max()), "memory_share_max": round(float(share.max()), 3)}
        if self._may_grow("memory", now) and sizes.memory < hi and float(np.median(share)) > MEM_HIGH:
            new = min(hi, sizes.memory * 2)
            return Decision("memory", sizes.memory, new,
                            f"median use {float(np.median(share)):.0%} of the limit", numbers)
        new = max(lo, sizes.memory // 2)
        if (self._may_shrink("memory", now) and new < sizes.memory and float(share.max()) < MEM_LOW
                and float(used.max()) < MEM_TARGET * new):
            return Decision("memory", sizes.memory, new,
                            f"use under {MEM_LOW:.0%} of the limit for the whole window", numbers)
        return None

    def _flows(self, sizes: Sizes, now: float) -> Decision | None:
        lo, hi = self.bounds.flow_table
        flows = self._window("flows")
        fill = flows / max(sizes.flow_table, 1)
        pps = self._window("pps")
        numbers = {"flows_p50": int(np.percentile(flows, 50)), "flows_max": int(flows.max()),
                   "fill_p50": round(float(np.percentile(fill, 50)), 3),
                   "pps_p50": round(float(np.percentile(pps, 50)), 1)}
        if self._may_grow("flow_table", now) and sizes.flow_table < hi and float(np.percentile(fill, 50)) > FLOWS_HIGH:
            new = min(hi, sizes.flow_table * 4)
            return Decision("flow_table", sizes.flow_table, new,
                            f"flow table {numbers['fill_p50']:.0%} full", numbers)
        new = max(lo, sizes.flow_table // 4)
        if (self._may_shrink("flow_table", now) and new < sizes.flow_table
                and float(flows.max()) < FLOWS_AFTER_SHRINK * new):
            return Decision("flow_table", sizes.flow_table, new,
                            f"{int(flows.max())} entries at most: under {FLOWS_AFTER_SHRINK:.0%} "
                            f"of {new}", numbers)
        return None


def bounds_from(scale: dict, parse_size) -> Bounds:
    """``core.balancer.scale`` -> Bounds (defaults for what it leaves out)."""
    b = Bounds()
    if "cpu" in scale:
        b.cpu = (float(scale["cpu"][0]), float(scale["cpu"][1]))
    if "memory" in scale:
        b.memory = (parse_size(scale["memory"][0]), parse_size(scale["memory"][1]))
    if "flow_table" in scale:
        b.flow_table = (int(scale["flow_table"][0]), int(scale["flow_table"][1]))
    if "cooldown_s" in scale:
        b.cooldown_s = float(scale["cooldown_s"])
    return b
