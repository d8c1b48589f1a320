"""One balancer node: the data plane on its interfaces, filled from the project file.

``Node.start()`` checks everything it can before it touches the kernel
(interfaces exist, the program loads), attaches to every interface or to none,
and serves the control API.  ``Node.apply()`` reconciles a new project file
with the maps; a file that fails validation changes nothing. ``down()`` removes
everything a node made.

Its parts: checks.py (what is checked first), revisions.py (project files as store
revisions), routes.py (the control API); in zfast/dataplane/, adoption.py (a previous
daemon's pinned maps), links.py, egresswatch.py and sweeper.py (its periodic chores).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
from pathlib import Path

import yaml

from zfast import config
from zfast.api import Server
from zfast.controllers.logger import LoggerController
from zfast.dataplane import adoption
from zfast.dataplane.egresswatch import EgressWatch
from zfast.dataplane.links import LinkWatch, refresh_tx_ports
from zfast.dataplane.loader import DatapathError, Loaded
from zfast.dataplane.neighbours import NeighbourKeeper
from zfast.dataplane.nexthops import NextHopWatch
from zfast.dataplane.sweeper import FlowSweeper
from zfast.ha.heartbeat import KeyError_
from zfast.node.checks import (
    NodeError,
    check_ha_key,
    check_interfaces,
    check_local,
    check_node_section,
)
from zfast.node.prestart import AlreadyRunning, take_node_lock
from zfast.node.revisions import (
    config_diff,
    dump_yaml,
    local_part,
    node_project,
    shared_of,
    shared_part,
)
from zfast.node.routes import routes
from zfast.paths import pin_dir
from zfast.reconcile.firewall import FirewallTable
from zfast.reconcile.services import ServiceTable
from zfast.store import Revision, Store, StoreError, open_store

# The health and statistics controllers, Prometheus and the pair are imported where they
# are first needed, after the attach (PLC0415 marks them): a start that fails its checks
# (a crash loop's), or a node without a pair or Prometheus, never pays for them.

log = logging.getLogger("zfast.node")

TX_PORTS_REFRESH_S = 2.0  # interfaces that appear later become redirect targets


class Node:
    def __init__(self, project: config.Project, source: str = "zfast up",
                 preloaded: Loaded | None = None, prestart=None):
        check_node_section(project)
        self.project = project
        self.name = project.node.name
        self.state_dir = Path(project.node.state_dir)
        self.dp: Loaded | None = None
        self.table: ServiceTable | None = None
        self.fw: FirewallTable | None = None
        self.telemetry = project.raw.get("telemetry") or {}
        # the logger controller: every event fsynced, rotated, forwarded to syslog if asked
        self.events = LoggerController(self.state_dir, self.name, syslog=self.telemetry.get("syslog"))
        self.statistics = None
        self.prometheus = None
        self.health = None     # zfast.controllers.health.HealthController, from start()
        self.api: Server | None = None
        self.started = time.time()
        self._lock_file = None
        self._stop = threading.Event()
        self._apply_lock = threading.Lock()
        self.revision = 0              # the store's revision the maps hold
        self.source = source
        self.local_raw = local_part(project.raw)
        self.store: Store | None = None
        self._watch = None
        self.pair = None  # zfast.ha.pair.Pair when the file has an `ha` section
        self.nexthops = None
        self.pin = pin_dir(self.name)
        self.adopted = False
        # A program compiled ahead by a parked spare (zfast/core/spare.py): start takes it
        # instead of compiling (seconds of BCC) when its pinned maps are fresh and of our layout.
        self.preloaded = preloaded
        # zfast/node/prestart.py: the lock taken, and a fresh start's data plane loading, by `zfast up`
        self.prestart = prestart
        names = [itf.name for itf in project.node.interfaces]
        self.egress = EgressWatch(names, on_event=self.events.log)   # while XDP redirects
        self.links: LinkWatch | None = None    # what the pair's activity controller observes
        self.keep_dataplane = False  # SIGUSR1: exit leaving the data plane forwarding
        self._sweeper: FlowSweeper | None = None   # the idle-flow sweeps' process

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> list[str]:
        node = self.project.node
        check_interfaces(node)
        check_ha_key(self.project)
        self._take_lock()
        try:
            # The store first: a file it cannot take (e.g. etcd away and the file is not its
            # latest revision) fails here, before a map of an adopted data plane changes.
            latest = self._open_store()
            self._open_datapath()
            changes = self._reconcile(self.project)
            self._save_installed()
            refresh_tx_ports(self.dp)
            self.nexthops = NextHopWatch(self.dp)
            self.nexthops.start()
            try:
                for itf in node.interfaces:
                    att = self.dp.attach(itf.name, itf.mode or node.mode)
                    self.events.log("attach", interface=att.ifname, hook=att.hook, mode=att.mode,
                                    prog_id=att.prog_id, why=att.why)
            except DatapathError:
                self.dp.detach_all()  # all interfaces or none
                raise
            self._start_telemetry()     # after the attach: the counters are cumulative
            self.egress.check(self.dp)
            self._watch = self.store.watch(self.project.project, self._on_revision,
                                           after=latest.rev)
            self._start_pair()
            from zfast.controllers import health  # noqa: PLC0415 -- see the top
            self.health = health.for_node(self)
            self.health.start()
            self.events.log("apply", revision=self.revision, changes=changes, start=True,
                            adopted=self.adopted)
            self.api = Server(self.state_dir, routes(self))
            self.api.start()
        except Exception:
            # nothing half-made is left behind (an adopted data plane keeps forwarding)
            self._teardown(remove_dataplane=not self.adopted)
            raise
        return changes

    def _start_telemetry(self) -> None:
        """The statistics controller (a sample a second into stats.sqlite) and, when the
        file asks, the Prometheus endpoint."""
        from zfast.controllers.statistics import (  # noqa: PLC0415 -- see the top
            StatisticsController,
            count_entries,
        )
        flows_fd = self.dp.table("flows").map_fd
        self.statistics = StatisticsController(
            self.stats, self.state_dir, resources={self.name: "/proc/self"},
            map_fill=lambda: {"flows": count_entries(flows_fd)},
            on_error=lambda m: self.events.log("error", controller="statistics", error=m))
        self.statistics.start()
        logging.getLogger("zfast").addHandler(self.events.handler())
        if self.telemetry.get("prometheus"):
            from zfast.telemetry.prometheus import start_prometheus  # noqa: PLC0415 -- see the top
            try:
                # the counters as they are at the scrape, as `zfast stats` reads them (the
                # statistics controller's last sample is up to a tick old, and frozen while its
                # ticks fail); that sample adds only what stats() lacks: flows, instances, maps
                self.prometheus = start_prometheus(
                    self.telemetry["prometheus"], stats=self.stats, status=self.status,
                    extra=self.statistics.latest)
            except OSError as err:
                raise NodeError(f"telemetry.prometheus {self.telemetry['prometheus']}: {err}") from None

    def _start_pair(self) -> None:
        if self.project.ha is None:
            return
        from zfast.ha.pair import Pair  # noqa: PLC0415 -- see the top
        try:
            self.pair = Pair(self, self.project.ha)
            self.pair.start()
        except (KeyError_, OSError) as err:
            self.pair = None
            raise NodeError(str(err)) from None

    def _open_store(self) -> Revision:
        """The file given to `up` becomes a revision when its shared part differs from the
        store's latest; then (start() opens the watch) the node follows the store, an apply
        on the peer included. A daemon that restarts onto its own running data plane
        (pinned maps of the same layout) keeps the store's latest revision instead: a
        crash and a restart with an older file must not undo an apply."""
        try:
            self.store = open_store(self.project.raw.get("store"), self.state_dir, self.name)
            latest = self.store.latest(self.project.project)
            mine = shared_part(self.project.raw)
            theirs = shared_of(latest.config) if latest else {}
            restarting = adoption.adoptable(self.pin, self.state_dir, self.project.datapath)
            if latest is not None and theirs != mine and restarting:
                project = node_project(theirs, self.local_raw, f"store revision {latest.rev}")
                check_local(self.project, project)
                self.project = project
            elif latest is None or theirs != mine:
                latest = self.store.commit(self.project.project, yaml.safe_dump(self.project.raw),
                                           "zfast up", config_diff(theirs, mine), self.source)
        except StoreError as err:
            raise NodeError(f"store: {err}") from None
        except config.ConfigError as err:
            raise NodeError(f"the store's revision {latest.rev} is not valid here: {err}") from None
        self.revision = latest.rev
        return latest

    def _open_datapath(self) -> None:
        """The program on a previous daemon's maps, or on fresh ones (zfast/dataplane/adoption.py);
        the tables of what is in them."""
        pre, self.preloaded = self.preloaded, None
        if pre is None and self.prestart is not None:
            pre = self.prestart.take()      # None unless it began a fresh start's load
        node = self.project.node
        opened = adoption.open_dataplane(
            self.project.datapath, self.pin, self.state_dir,
            ((itf.name, itf.mode or node.mode) for itf in node.interfaces), pre)
        self.dp, self.adopted = opened.dp, opened.adopted
        self.table = ServiceTable(self.dp)
        self.fw = FirewallTable(self.dp)
        if opened.resized:
            self.events.log("datapath", change="maps resized", **opened.resized)
        if opened.installed:
            self.table.restore(opened.installed["services"])
            self.fw.restore(opened.installed["firewall"])
        self.links = LinkWatch(self.dp, [itf.name for itf in node.interfaces])
        self.neighbours = NeighbourKeeper([itf.name for itf in node.interfaces])
        self.neighbours.ask_by_broadcast()
        self._sweeper = FlowSweeper(self.dp, self.pin)

    def _save_installed(self) -> None:
        adoption.save_installed(self.state_dir, self.pin, self.table.export(), self.fw.export(),
                                [i.name for i in self.project.node.interfaces])

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (detach, remove the pinned maps) or SIGUSR1 (exit
        leaving the data plane forwarding, for an upgrade: the next daemon adopts it)."""
        def keep(*_):
            self.keep_dataplane = True
            self._stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGUSR1, keep)
        next_sweep = time.monotonic()
        while not self._stop.wait(TX_PORTS_REFRESH_S):
            # A failing chore (a map update refused for a moment, e.g. ENOMEM at the memory
            # limit) is an error event and is tried again next time: the node serves on.
            self._chore("interfaces", lambda: refresh_tx_ports(self.dp))
            self._chore("egress ports", lambda: self.egress.check(self.dp))
            self._chore("neighbours", self.neighbours.sweep)   # STALE ones probed again
            if self.pair:
                self._chore("interface MACs", self.pair.holder.refresh_macs)
            idle_s = self.project.datapath.flow_idle_s
            if idle_s and time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + idle_s / 2
                self._chore("flow sweep", self._sweep_idle_flows)
        self.stop()

    def _chore(self, what: str, job) -> None:
        try:
            job()
        except Exception as err:
            log.exception("%s", what)
            self.events.log("error", controller=what, error=repr(err))

    def _sweep_idle_flows(self) -> None:
        """Idle flows leave the table (zfast/dataplane/flowage.py). Not on a standby: its entries
        are the active's, replicated, and see no packet until it takes over."""
        if self.pair and self.pair.role == "standby":
            return
        done = self._sweeper.sweep()
        if "error" in done:
            self.events.log("error", controller="flow sweep", error=done["error"])
        elif done["deleted"]:
            log.info("idle flow sweep: %s", done)

    def stop(self) -> None:
        self._teardown(remove_dataplane=not self.keep_dataplane)

    def _teardown(self, remove_dataplane: bool) -> None:
        """Stop what the node runs; with remove_dataplane also release the VIPs, detach
        the program and remove the pinned maps (else the data plane keeps forwarding)."""
        if self._sweeper is not None:
            self._sweeper.stop()
        if self.health:
            self.health.stop()     # first: no map update after this
            self.health = None
        if self.api:
            self.api.stop()
            self.api = None
        if self.prometheus:
            self.prometheus.close()
            self.prometheus = None
        if self.statistics:
            self.statistics.stop()
            self.statistics = None
        if self.pair and remove_dataplane:
            self.pair.stop()
        for part in (self.nexthops, self._watch):
            if part:
                part.stop()
        if self.store:
            self.store.close()
        if self.dp and remove_dataplane:
            adoption.remove_dataplane(self.dp, self.pin, self.state_dir)
        self._release_lock()
        self.events.close()

    def _take_lock(self) -> None:
        if self.prestart is not None:
            self._lock_file = self.prestart.lock_file
            return
        try:
            self._lock_file = take_node_lock(self.state_dir, self.name)
        except AlreadyRunning as err:
            raise NodeError(str(err)) from None

    def _release_lock(self) -> None:
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None

    # ---- apply ----------------------------------------------------------------

    def apply(self, project: config.Project, who: str = "api", source: str = "<api>",
              text: str | None = None) -> list[str]:
        """Commit a valid project to the store (text: the file as sent, stored as it is),
        then reconcile the maps with it. Nothing changes when the store cannot take it
        (the pair must not diverge)."""
        check_local(self.project, project)
        with self._apply_lock:
            problems = self.table.check_capacity(project.services) + self.fw.check_capacity(project)
            if problems:
                raise NodeError("; ".join(problems))
            try:
                rev = self.store.commit(project.project, text or dump_yaml(project.raw), who,
                                        config_diff(shared_part(self.project.raw),
                                                    shared_part(project.raw)), source)
            except StoreError as err:
                raise NodeError(f"the store cannot take the change, nothing changed: {err}") from None
            return self._install(project, rev.rev)

    def _install(self, project: config.Project, rev: int) -> list[str]:
        """Reconcile the maps with a project the store holds as revision rev (lock held)."""
        changes = self._reconcile(project)
        self._save_installed()
        self.project = project
        self.revision = rev
        if self.health:
            self.health.refresh()  # the backends to check may have changed
        self.events.log("apply", revision=rev, changes=changes)
        for line in changes:
            if "firewall" in line or "public port" in line:
                self.events.log("firewall", change=line, revision=rev)
        return changes

    def _on_revision(self, rev: Revision) -> None:
        """A revision committed anywhere (the peer, a rollback): converge to it."""
        with self._apply_lock:
            if rev.rev <= self.revision:
                return
            try:
                project = node_project(shared_of(rev.config), self.local_raw,
                                       f"store revision {rev.rev}")
                check_local(self.project, project)
                self._install(project, rev.rev)
            except (config.ConfigError, NodeError, DatapathError, yaml.YAMLError) as err:
                self.events.log("error", revision=rev.rev, error=f"cannot apply revision: {err}")

    def _reconcile(self, project: config.Project) -> list[str]:
        """Desired state into the maps, in an order that never drops a live flow: firewall
        slots and rules first, then the services entries that point at them, then what
        is no longer wanted."""
        problems = self.table.check_capacity(project.services) + self.fw.check_capacity(project)
        if problems:
            raise NodeError("; ".join(problems))
        changes = self.fw.apply(project)
        changes += self.table.apply(project.services, project.public_ports,
                                    self.fw.slot_map(project))
        self.fw.release(project)
        return changes

    # ---- read -----------------------------------------------------------------

    def status(self) -> dict:
        return {
            "node": self.name,
            "project": self.project.project,
            "role": self.pair.role if self.pair else "solo",
            "pid": os.getpid(),
            "revision": self.revision,
            "started": self.started,
            "interfaces": [{"name": a.ifname, "hook": a.hook, "mode": a.mode, "prog_id": a.prog_id,
                            "why": a.why, **self.egress.status(a.ifname)}
                           for a in (self.dp.attached.values() if self.dp else [])],
            "adopted": self.adopted,
            # how this start got its program: "hit" (the program cache, no compile), "miss"
            # (compiled, then cached), "off" (compiled, no cache)
            "program": ({"cache": self.dp.cache, "seconds": round(self.dp.cache_s, 3),
                         "hooks_loaded": self.dp.loaded_hooks} if self.dp else None),
            "store": self.store.health() if self.store else None,
            "pin_dir": str(self.pin),
            "peer": self.pair.status() if self.pair else None,
            "controllers": {
                **({"activity": {"healthy": not self.pair.activity.problems,
                                 "problems": self.pair.activity.problems}} if self.pair else {}),
                "statistics": self.statistics.status() if self.statistics else None,
                "health": self.health.status() if self.health else None,
                "logger": self.events.status(),
            },
        }

    def stats(self) -> dict:
        counters = self.dp.reason_counters()
        return {
            "node": self.name,
            "time": time.time(),
            "services": self.table.counters(),
            "public_ports": self.fw.counters(),
            "drops": {name: p for name, (p, _) in counters.items() if name.startswith("drop_")},
            # what the kernel dropped after us: forwarded by zfast, received by nobody
            "kernel_drops": self.egress.kernel_drops(),
            "verdicts": {name: {"packets": p, "bytes": b} for name, (p, b) in counters.items()},
        }


def down(state_dir: Path, timeout: float = 20.0) -> list[str]:
    """Remove everything a node made: stop its daemon if it runs (SIGTERM: it detaches and
    unpins), else detach what a dead daemon left attached and remove its pinned maps."""
    done = []
    lock = state_dir / "node.lock"
    if lock.exists():
        with open(lock) as f:
            # The daemon holds the lock while it lives; it is released when it exits.
            def locked() -> bool:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
                return False

            if locked():
                pid = int((lock.read_text().split() or ["0"])[0])
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + timeout
                while locked():
                    if time.time() > deadline:
                        raise NodeError(f"daemon {pid} did not stop within {timeout:.0f} s")
                    time.sleep(0.1)
                done.append(f"stopped daemon {pid}")
    done += adoption.remove_left_behind(state_dir)
    (state_dir / "api.sock").unlink(missing_ok=True)
    return done
