"""`zfast core up`: a project's core service on this host.

Two balancer instances (an active/standby pair) and the routers, each a network namespace
with its cgroup and daemon (runtime.py), plugged into the project's public and private
bridges, as the plan says (plan.py). One loop: every CHECK_EVERY_S it observes every
instance (observe.py), asks the repair controller (zfast/controllers/repair.py) and carries
out what it decides (launcher.py: successors, the spare); every SCALE_EVERY_S the scaling
controller resizes each one's CPU and memory as its load changes (resizer.py). No step
waits in the loop: a router's drain advances one step a tick. The certificates have a
thread of their own (zfast/routing/renewal.py), the API its own (routes.py).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import yaml

from zfast import config
from zfast.api import Server
from zfast.config.core import CoreRuntime
from zfast.controllers import scaling
from zfast.controllers.logger import LoggerController
from zfast.controllers.repair import (
    Action,
    Drained,
    DrainRouter,
    DropSpare,
    EndBoost,
    GrowStarved,
    MakeSpare,
    MarkStable,
    Observations,
    Repair,
    Replace,
    SoftStop,
    StartSuccessor,
    Undrain,
)
from zfast.core.cgroups import hierarchy_problem, parse_size
from zfast.core.launcher import Launcher, ensure_bridges
from zfast.core.lxd import LxdError, LxdRuntime
from zfast.core.observe import Observer
from zfast.core.plan import CoreError, Plan, parse_core
from zfast.core.resizer import Resizer
from zfast.core.routes import routes
from zfast.core.runtime import Instance, NetnsRuntime, Runtime
from zfast.ha.heartbeat import write_key
from zfast.node.revisions import config_diff, shared_part
from zfast.routing.renewal import Renewal
from zfast.store import open_store

log = logging.getLogger("zfast.core")

CHECK_EVERY_S = 0.25       # the repair controller's look at every instance
SCALE_EVERY_S = 1.0        # the scaling controller's sample

__all__ = ["CoreError", "CoreService"]     # CoreError: what `zfast core up` reports


def make_runtime(spec: CoreRuntime, prefix: str, state_dir: Path) -> Runtime:
    """The instances' runtime the project file's core.runtime names."""
    if spec.kind == "lxd":
        return LxdRuntime(prefix, spec.socket, spec.image, pool=spec.pool, core_dir=state_dir)
    return NetnsRuntime(prefix=prefix)


class CoreService:
    def __init__(self, project: config.Project, state_dir: Path, runtime: Runtime | None = None):
        core = parse_core(project)
        self.prefix = f"zfc-{project.project}"[:20]
        self.state_dir = Path(state_dir)
        self.runtime = runtime or make_runtime(project.core.runtime, self.prefix, self.state_dir)
        problem = hierarchy_problem() if isinstance(self.runtime, NetnsRuntime) else None
        if problem:                     # before anything is made: nothing to undo then
            raise CoreError(problem)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.events = LoggerController(self.state_dir, f"{project.project}-core")
        self.runtime.log = self.events.log
        bounds = scaling.bounds_from(core.scale, parse_size)
        self.plan = Plan(project, core, self.state_dir)
        self.launcher = Launcher(self.runtime, self.prefix, self.state_dir, self.events,
                                 max_cpu=bounds.cpu[1])
        self.observer = Observer(self.runtime)
        self.repair = Repair(max_cpu=bounds.cpu[1])
        self.resizer = Resizer(self.runtime, self.events, self.launcher, core,
                               configured=parse_core(project), bounds=bounds)
        self.observed = Observations([])   # the last tick's
        self.store = None
        self.renewal: Renewal | None = None    # with a routing section
        self._stop = threading.Event()
        self.api: Server | None = None

    @property
    def project(self) -> config.Project:
        return self.plan.project

    @property
    def instances(self) -> dict[str, Instance]:
        return self.launcher.instances

    def up(self) -> None:
        """Every instance started; on a failure, what was made is removed again."""
        try:
            self._up()
        except Exception as err:
            self.down()
            if isinstance(err, LxdError):
                raise CoreError(f"LXD: {err}") from None
            raise

    def _up(self) -> None:
        if not self.plan.key_file.exists():
            write_key(self.plan.key_file)
        for br in ensure_bridges((self.plan.core.public_bridge, self.plan.core.private_bridge)):
            self.events.log("repair", action="bridge created", bridge=br)
        self.launcher.open()
        self.store = open_store(self.plan.shared_raw(self.repair.drained)["store"], self.state_dir,
                                f"{self.project.project}-core")
        self._commit("zfast core up")
        for spec in self.plan.specs(self.repair.drained):
            self.launcher.launch(spec)
        if self.project.routing is not None:
            self.renewal = Renewal(self.store, self.project.project, self.events.log)
            self.renewal.configure(self.project.routing)
            self.renewal.start(self._stop)
        self.api = Server(self.state_dir, routes(self))
        self.api.start()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        next_scale = time.monotonic() + SCALE_EVERY_S
        try:
            while not self._stop.wait(CHECK_EVERY_S):
                try:
                    self.repair_tick()
                    if time.monotonic() >= next_scale:
                        next_scale = time.monotonic() + SCALE_EVERY_S
                        self.scale_tick()
                except Exception as err:     # a controller bug must not leave instances behind
                    log.exception("core controllers")
                    self.events.log("error", controller="core", error=repr(err))
        finally:
            self.down()

    def down(self) -> None:
        if self.api:
            self.api.stop()
            self.api = None
        self._stop.set()
        self.launcher.close()

    # ---- the shared project file ----------------------------------------------------

    def _commit(self, who: str, changes: list[str] | None = None) -> int:
        """The shared file as a store revision (balancers and routers follow the store)."""
        raw = shared_part(self.plan.shared_raw(self.repair.drained))
        latest = self.store.latest(self.project.project)
        theirs = shared_part(yaml.safe_load(latest.config) or {}) if latest else {}
        if latest is not None and theirs == raw:
            return latest.rev
        rev = self.store.commit(self.project.project, yaml.safe_dump(raw, sort_keys=False), who,
                                changes or config_diff(theirs, raw), "core")
        return rev.rev

    def apply(self, project: config.Project, who: str) -> int:
        """A new project file (its core section unchanged) as a store revision; the old one
        stays when the store refuses it."""
        old, self.plan.project = self.plan.project, project
        try:
            rev = self._commit(who)
        except Exception:
            self.plan.project = old
            raise
        if self.renewal is not None:
            self.renewal.configure(project.routing)     # records it: never raises
        return rev

    # ---- the controllers ------------------------------------------------------------

    def repair_tick(self) -> None:
        self.observed = self.observer.observe(self.launcher, self.resizer.resizing is not None)
        now = time.time()
        for action in self.repair.decide(self.observed, now):
            self._carry_out(action, now)

    def scale_tick(self) -> None:
        self.runtime.housekeeping()
        if not self.repair.busy:
            self.launcher.move_misplaced_spare()
        now = time.time()
        planned = self.resizer.tick(now, self.observer, self._well, replacing=self.repair.busy)
        if planned is not None:
            name, reason = planned
            inst = next(o for o in self.observed.instances if o.name == name)
            for action in self.repair.replace_planned(inst, [reason], now):
                self._carry_out(action, now)

    def _well(self, name: str) -> bool:
        return not self.repair.health_of(name, self.instances[name].started).problems

    def _carry_out(self, action: Action, now: float) -> None:
        match action:
            case EndBoost(name):
                self.launcher.end_boost(name)
            case MarkStable(name, after_crashes):
                self.events.log("repair", instance=name, action="stable", after_crashes=after_crashes)
            case GrowStarved(name, throttled):
                self.resizer.grow_starved(name, throttled, now)
            case Replace():
                self._log_replace(action)
            case DrainRouter(name):
                self._drain(name)
            case SoftStop(name):
                self.launcher.soft_stop(name)
            case Drained(name, seconds, applied_s):
                self.events.log("repair", instance=name, action="drained", seconds=seconds,
                                weight_0_applied_s=applied_s)
            case StartSuccessor(name, restarts, planned, from_spare):
                spec = self.plan.successor_spec(self.instances[name], self.repair.drained, planned)
                self.observer.forget(name)
                self.resizer.forget(name)
                self.launcher.start_successor(name, spec, restarts, from_spare)
            case Undrain(names):
                self._commit("zfast core (repair)", [f"router {n} back in rotation" for n in names])
            case MakeSpare():
                self.launcher.park_spare(self.plan.spare_spec(self.repair.drained))
            case DropSpare(name):
                self.events.log("error", instance=name, error="spare exited")
                self.launcher.drop_spare()

    def _log_replace(self, a: Replace) -> None:
        # what the instance cost over its life as this instance (a crash loop's cost is the
        # sum of these; a spare's compile, done before it was needed, is not part of it)
        cpu_s = round(self.launcher.cpu_s(self.instances[a.instance]), 3)
        self.events.log("repair", instance=a.instance, action="replace", problems=a.problems,
                        restarts=a.restarts, backoff_s=a.backoff_s, cpu_s=cpu_s,
                        lived_s=a.lived_s, healthy_s=a.healthy_s)

    def _drain(self, name: str) -> None:
        """The router's weight 0 as a revision (the repair controller waits for every
        balancer to apply it)."""
        try:
            rev = self._commit("zfast core (repair)", [f"router {name} drained"])
        except Exception as err:
            self.events.log("error", instance=name, error=f"cannot drain: {err}")
            rev = None
        self.repair.drain_committed(name, rev)
