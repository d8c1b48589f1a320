"""The scaling controller in the core service: one load sample a second per instance into
its Scaler (zfast/controllers/scaling.py), and what it decides carried out.

CPU and memory change live (the cgroup's files). A flow table cannot grow in place (a BPF
map's size is fixed): the pair is resized by replacing one instance at a time with one
of the new size. The standby goes first; once it is back and in sync, the active is
replaced: the resized standby takes over (the failover every test already shows
hitless) and the old active returns as a standby of the new size.
"""

from __future__ import annotations

import os
from typing import Callable

from zfast.api import ApiError, Client
from zfast.controllers import scaling
from zfast.controllers.logger import LoggerController
from zfast.controllers.statistics import count_entries
from zfast.core.launcher import Launcher
from zfast.core.observe import API_TIMEOUT_S, Observer
from zfast.core.plan import CoreSpec
from zfast.core.runtime import Instance, Runtime
from zfast.dataplane.bpflib import lib  # not bcc: the core daemon never loads LLVM
from zfast.paths import pin_dir

FLOW_ENTRY_BYTES = 1536   # memory a flow-table entry costs an instance at its peak (scaling)
RESIZE_SETTLE_S = 3.0     # between two replacements of a resize: the full flow dump


class Resizer:
    def __init__(self, runtime: Runtime, events: LoggerController, launcher: Launcher,
                 core: CoreSpec, configured: CoreSpec, bounds: scaling.Bounds):
        """core: the sizes in use (a resize changes them); configured: the file's."""
        self.runtime = runtime
        self.events = events
        self.launcher = launcher
        self.core = core
        self.configured = configured
        self.bounds = bounds
        self.scalers: dict[str, scaling.Scaler] = {}
        self._last_usage: dict[str, tuple] = {}
        self.resizing: dict | None = None      # a rolling flow-table resize under way
        self.decision: dict | None = None      # the last one, for core status

    def forget(self, name: str) -> None:
        """The instance is replaced: its successor's load starts anew."""
        self.scalers.pop(name, None)
        self._last_usage.pop(name, None)

    def _scaler(self, name: str) -> scaling.Scaler:
        return self.scalers.setdefault(name, scaling.Scaler(self.bounds))

    def _sample(self, name: str, inst: Instance, well: bool, now: float) -> scaling.Sample | None:
        """One second of an instance's load: CPU (and throttling) from its cgroup, flow
        entries from its pinned flow table, packets from its counters."""
        try:
            cpu_ns = inst.cgroup.cpu_ns()
            periods, throttled = inst.cgroup.throttling()
            memory, _ = inst.cgroup.memory()
        except (OSError, ValueError):
            return None
        last = self._last_usage.get(name)
        packets = last[4] if last else 0     # a daemon that does not answer: no new packets
        if well:
            try:
                st = Client(inst.spec.state_dir, timeout=API_TIMEOUT_S).get("/stats")
                packets = sum(v["packets"] for v in st.get("verdicts", {}).values())
            except ApiError:
                pass
        flows = 0
        path = pin_dir((inst.spec.config.get("node") or {}).get("name", "-")) / "flows"
        try:
            if inst.spec.kind != "balancer":
                raise FileNotFoundError(path)   # routers have no flow table
            fd = lib.bpf_obj_get(str(path).encode())
            if fd >= 0:
                try:
                    flows = count_entries(fd)[0]
                finally:
                    os.close(fd)
        except OSError:
            pass
        self._last_usage[name] = (now, cpu_ns, periods, throttled, packets)
        if last is None or last[1] > cpu_ns:
            return None
        dt = max(now - last[0], 1e-3)
        return scaling.Sample(
            time=now, cpu=(cpu_ns - last[1]) / 1e9 / dt,
            throttled=(throttled - last[3]) / max(periods - last[2], 1), memory=memory,
            flows=flows, pps=max(packets - last[4], 0) / dt)

    def tick(self, now: float, observer: Observer, well: Callable[[str], bool],
             replacing: bool) -> tuple[str, str] | None:
        """Sample, decide, resize. Returns the instance a flow-table resize replaces next
        and why (the caller replaces it: a planned replacement), or None; none while a
        replacement is under way (``replacing``: a router draining)."""
        roles = {}
        for name, inst in list(self.launcher.instances.items()):
            # A daemon starved by its quota may not answer in time: it is still sampled
            # (from its cgroup), so that its quota can grow before the repair gives up on it.
            if inst.pid is None or name not in observer.answered:
                continue
            is_well = well(name)
            sample = self._sample(name, inst, is_well, now)
            if sample is None:
                continue
            if is_well:   # the repair controller asked it this very loop
                roles[name] = observer.role(name)
            scaler = self._scaler(name)
            scaler.add(sample)
            sizes = scaling.Sizes(inst.spec.cpu, inst.spec.memory, self.core.flow_table)
            on_active = (is_well and inst.spec.kind == "balancer" and roles[name] == "active"
                         and self.resizing is None)
            for d in scaler.decide(sizes, now, flows=on_active):
                self._carry_out(name, inst, d, now)
        if replacing:
            return None
        return self._resize_step(roles, observer, well, now)

    def grow_starved(self, name: str, throttled: float, now: float) -> None:
        """More CPU for a starved daemon (the repair controller's call)."""
        inst = self.launcher.instances[name]
        d = self._scaler(name).grow_starved(inst.spec.cpu, throttled, now)
        if d is not None:
            self._carry_out(name, inst, d, now)

    def _carry_out(self, name: str, inst: Instance, d: scaling.Decision, now: float) -> None:
        self.decision = {"time": now, **d.as_event(name)}
        self.events.log("scale", **d.as_event(name))
        if d.resource == "cpu":
            self.runtime.resize(inst, float(d.new), inst.spec.memory)
        elif d.resource == "memory":
            self.runtime.resize(inst, inst.spec.cpu, int(d.new))
        elif d.resource == "flow_table":
            self._start_resize(int(d.new), now)

    def _start_resize(self, size: int, now: float) -> None:
        old = self.core.flow_table
        self.core.flow_table = size
        # A bigger table counts against the memory limit (memcg): raise it. Not only the
        # map (~150 B an entry): the daemon's passes over the whole table (idle sweep, full
        # sync dumps) peak at ~1.2 KiB an entry. Measured (cgroup v1, 30k new flows/s):
        # ~190 MiB at 65536 entries, peaks of 460 MiB at 262144; the old estimate here
        # (128 MiB + 400 B an entry: 228 MiB) left 256 MiB instances OOM-killed in a loop.
        base = self.configured          # the configured memory for the configured table
        need = base.memory + max(0, size - base.flow_table) * FLOW_ENTRY_BYTES
        if need > self.core.memory:
            self.core.memory = min(max(self.bounds.memory[1], self.core.memory), need)
        self.launcher.drop_spare()        # compiled for the old size
        self.resizing = {"from": old, "to": size, "step": "standby", "since": now}

    def _resize_step(self, roles: dict, observer: Observer, well: Callable[[str], bool],
                     now: float) -> tuple[str, str] | None:
        r = self.resizing
        if r is None:
            return None
        instances = self.launcher.instances

        def sized(name):
            return instances[name].spec.config.get("datapath", {}).get("flow_table") == r["to"]
        ready = [n for n in instances if n in observer.answered and well(n)]
        if len(ready) < len(instances) or len(roles) < len(instances):
            return None                      # wait until the pair is whole again
        if now - r.get("step_at", 0) < RESIZE_SETTLE_S:
            return None                      # let the new standby take the full flow dump
        pending = [n for n in instances if not sized(n)]
        if not pending:
            self.events.log("scale", resource="flow_table", action="resized", old=r["from"],
                            new=r["to"], seconds=round(now - r["since"], 1))
            self.resizing = None
            return None
        standby = [n for n in pending if roles.get(n) == "standby"]
        r["step_at"] = now
        return (standby or pending)[0], f"flow table {r['from']} -> {r['to']}"
