"""One balancer node: the data plane on its interfaces, filled from the project file.

``Node.start()`` checks everything it can before it touches the kernel
(interfaces exist, the program loads), attaches to every interface or to none,
and serves the control API.  ``Node.apply()`` reconciles a new project file
with the maps; a file that fails validation changes nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import yaml

from zfast import config
from zfast.dataplane import egress
from zfast.api import Server
from zfast.dataplane.loader import DatapathError, Loaded, hooks_for, ifindex
from zfast.dataplane import pins
from zfast.reconcile.firewall import FirewallTable, explain, listener
from zfast.paths import BPFFS, pin_dir
from zfast.node.prestart import AlreadyRunning, take_node_lock
from zfast.dataplane.reasons import reasons
from zfast.reconcile.services import ServiceTable
from zfast.store import Revision, Store, StoreError, open_store

log = logging.getLogger("zfast.node")

TX_PORTS_REFRESH_S = 2.0  # interfaces that appear later become redirect targets
EGRESS_RECHECK_S = 10.0   # egress ports' NAPI checked again (GRO may be turned off by hand)
# Sections that are each node's own: the store shares everything else between nodes.
# datapath too: its sizes are compiled into each node's program, and the two nodes of a
# pair differ in them while the core service resizes one after the other.
LOCAL_SECTIONS = ("node", "ha", "store", "datapath")


def _dump_yaml(raw: dict) -> str:
    # libyaml's emitter when there is one: the pure-Python one takes seconds on a file
    # with 100,000 firewall rules (and `zfast apply` of those must stay under 5 s)
    return yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


def shared_part(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in LOCAL_SECTIONS}


LIST_DETAIL = 20  # longer lists (e.g. 100k firewall CIDRs) are summed up in one line


def config_diff(old: object, new: object, path: str = "") -> list[str]:
    """What changed between two project files, one line per changed field."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"- {sub}")
            elif key not in old:
                out.append(f"+ {sub}: {json.dumps(new[key], default=str)[:80]}")
            else:
                out += config_diff(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and old != new and (
            len(old) > LIST_DETAIL or len(new) > LIST_DETAIL):
        try:
            added, removed = len(set(map(str, new)) - set(map(str, old))), \
                len(set(map(str, old)) - set(map(str, new)))
        except TypeError:
            added = removed = -1
        return [f"~ {path}: {len(old)} -> {len(new)} items ({added} added, {removed} removed)"]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_diff(a, b, f"{path}[{i}]")
        return out
    if old != new:
        return [f"~ {path}: {json.dumps(old, default=str)[:40]} -> {json.dumps(new, default=str)[:40]}"]
    return []


class NodeError(Exception):
    """The node cannot start or cannot take this change; one line says why."""


def check_interfaces(node: config.Node) -> None:
    missing = []
    for itf in node.interfaces:
        try:
            ifindex(itf.name)
        except DatapathError:
            missing.append(itf.name)
    if missing:
        raise NodeError("no such interface: " + ", ".join(missing))


class Node:
    def __init__(self, project: config.Project, source: str = "zfast up",
                 preloaded: Loaded | None = None, prestart=None):
        if project.node is None:
            raise NodeError("the project file has no node section (name, interfaces)")
        self.project = project
        self.name = project.node.name
        self.state_dir = Path(project.node.state_dir)
        self.dp: Loaded | None = None
        self.table: ServiceTable | None = None
        self.fw: FirewallTable | None = None
        from zfast.controllers.logger import LoggerController
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
        self.local_raw = {k: v for k, v in project.raw.items() if k in LOCAL_SECTIONS}
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
        self.egress: dict[str, egress.TargetCheck] = {}   # per port, while XDP redirects
        self._egress_seen: tuple = ()
        self._egress_next = 0.0
        self._xmit_errors: dict[str, int] = {}
        self.keep_dataplane = False  # SIGUSR1: exit leaving the data plane forwarding
        self._sweeper = None         # the idle-flow sweep's process (zfast/dataplane/flowage.py)

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> list[str]:
        node = self.project.node
        check_interfaces(node)
        if self.project.ha is not None:
            from zfast.ha.heartbeat import KeyError_, load_key
            try:
                load_key(self.project.ha.key_file)  # a bad key fails before anything is made
            except KeyError_ as err:
                raise NodeError(str(err)) from None
        self._take_lock()
        try:
            # The store first: a file it cannot take (e.g. etcd away and the file is not its
            # latest revision) fails here, before a map of an adopted data plane changes.
            latest = self._open_store()
            self._open_datapath()
            changes = self._reconcile(self.project)
            self._save_installed()
            self._refresh_tx_ports()
            from zfast.dataplane.nexthops import NextHopWatch
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
            self._check_egress()
            self._watch = self.store.watch(self.project.project, self._on_revision,
                                           after=latest.rev)
            self._start_pair()
            from zfast.controllers import health
            self.health = health.for_node(self)
            self.health.start()
            self.events.log("apply", revision=self.revision, changes=changes, start=True,
                            adopted=self.adopted)
            self.api = Server(self.state_dir, self.routes())
            self.api.start()
        except Exception:
            # nothing half-made is left behind (an adopted data plane keeps forwarding)
            self._teardown(remove_dataplane=not self.adopted)
            raise
        return changes

    def _start_telemetry(self) -> None:
        """The statistics controller (a sample a second into stats.sqlite) and, when the
        file asks, the Prometheus endpoint."""
        from zfast.controllers.statistics import StatisticsController, count_entries
        flows_fd = self.dp.table("flows").map_fd
        self.statistics = StatisticsController(
            self.stats, self.state_dir, resources={self.name: "/proc/self"},
            map_fill=lambda: {"flows": count_entries(flows_fd)},
            on_error=lambda m: self.events.log("error", controller="statistics", error=m))
        self.statistics.start()
        logging.getLogger("zfast").addHandler(self.events.handler())
        if self.telemetry.get("prometheus"):
            from zfast.telemetry.prometheus import start_prometheus
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
        from zfast.ha.heartbeat import KeyError_
        from zfast.ha.pair import Pair
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
            theirs = shared_part(yaml.safe_load(latest.config) or {}) if latest else {}
            restarting = (pins.has_pins(self.pin) and pins.read_json(self.state_dir / pins.LAYOUT)
                          == pins.layout(self.project.datapath))
            if latest is not None and theirs != mine and restarting:
                raw = dict(theirs)
                raw.update(self.local_raw)
                self.project = config.parse(raw, source=f"store revision {latest.rev}")
                self._check_local(self.project)
            elif latest is None or theirs != mine:
                latest = self.store.commit(self.project.project, yaml.safe_dump(self.project.raw),
                                           "zfast up", config_diff(theirs, mine), self.source)
        except StoreError as err:
            raise NodeError(f"store: {err}") from None
        except config.ConfigError as err:
            raise NodeError(f"the store's revision {latest.rev} is not valid here: {err}") from None
        self.revision = latest.rev
        return latest

    def routes(self) -> dict:
        """The control API (docs/openapi.yaml describes each endpoint)."""
        from zfast.controllers import statistics
        return {
            **statistics.api_routes(self.statistics),
            ("GET", "/status"): lambda _: (200, self.status()),
            ("GET", "/stats"): lambda _: (200, self.stats()),
            ("POST", "/apply"): self._api_apply,
            ("GET", "/fw"): lambda _: (200, self.fw_list()),
            ("POST", "/fw"): self._api_fw_change,
            ("POST", "/fw/test"): self._api_fw_test,
            ("GET", "/history"): lambda _: (200, self.history()),
            ("POST", "/rollback"): self._api_rollback,
        }

    def _open_datapath(self) -> None:
        """Load the program against pinned maps: a previous daemon's, when their layout
        is ours (its flows live on), else fresh ones (flows copied when only sizes differ)."""
        want = pins.layout(self.project.datapath)
        have = pins.read_json(self.state_dir / pins.LAYOUT)
        old = None
        pre, self.preloaded = self.preloaded, None
        if pre is None and self.prestart is not None:
            pre = self.prestart.take()      # None unless it began a fresh start's load
        if pre is not None and not (pre.pin == self.pin and pins.layout(pre.sizes) == want):
            pre.detach_all()
            pre = None
        # (a parked spare's program comes with fresh maps, just renamed here: nothing to adopt)
        if pre is None and pins.has_pins(self.pin):
            if have == want:
                self.adopted = True
            else:
                old = pins.set_aside(self.pin)
        node = self.project.node
        # the kernel verifies the programs while the maps are filled (they need no program)
        self.dp = pre or Loaded(self.project.datapath, pin=self.pin, hooks=hooks_for(
            (itf.name, itf.mode or node.mode) for itf in node.interfaces), background=True)
        self.table = ServiceTable(self.dp)
        self.fw = FirewallTable(self.dp)
        if old is not None:
            copied = 0
            if have and have.get("structs") == want["structs"]:
                copied = pins.copy_map(old / "flows", self.dp.table("flows"))
            pins.remove_pins(old)
            self.events.log("datapath", change="maps resized", flows_copied=copied,
                            old=have, new=want)
        installed = pins.read_json(self.state_dir / pins.INSTALLED) if self.adopted else None
        if installed:
            self.table.restore(installed["services"])
            self.fw.restore(installed["firewall"])
        pins.write_json(self.state_dir / pins.LAYOUT, want)

    def _sweep_idle_flows(self) -> None:
        """Idle flows leave the table (zfast/dataplane/flowage.py). Not on a standby: its entries
        are the active's, replicated, and see no packet until it takes over."""
        if self.pair and self.pair.role == "standby":
            return
        import json
        import subprocess
        import sys

        from zfast.dataplane.flowage import layout_of
        try:
            p = self._sweeper
            if p is None or p.poll() is not None:
                p = self._sweeper = subprocess.Popen(
                    [sys.executable, "-m", "zfast.dataplane.flowage",
                     json.dumps(layout_of(self.dp.table("flows"))), str(self.pin / "flows")],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdin.write("sweep\n")
            p.stdin.flush()
            done = json.loads(p.stdout.readline() or '{"error": "the sweeper exited"}')
        except (OSError, ValueError) as err:
            done = {"error": str(err)}
        if "error" in done:
            self.events.log("error", controller="flow sweep", error=done["error"])
            return
        if done["deleted"]:
            log.info("idle flow sweep: %s", done)

    def _save_installed(self) -> None:
        pins.write_json(self.state_dir / pins.INSTALLED, {
            "services": self.table.export(), "firewall": self.fw.export(),
            "interfaces": [i.name for i in self.project.node.interfaces],
            "pin_dir": str(self.pin)})

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
            self._chore("interfaces", self._refresh_tx_ports)
            self._chore("egress ports", self._check_egress)
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

    def stop(self) -> None:
        self._teardown(remove_dataplane=not self.keep_dataplane)

    def _teardown(self, remove_dataplane: bool) -> None:
        """Stop what the node runs; with remove_dataplane also release the VIPs, detach
        the program and remove the pinned maps (else the data plane keeps forwarding)."""
        if self._sweeper is not None and self._sweeper.poll() is None:
            self._sweeper.kill()
            self._sweeper.wait()
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
            self.dp.detach_all()
            pins.remove_pins(self.pin)
            for name in (pins.INSTALLED, pins.LAYOUT):
                (self.state_dir / name).unlink(missing_ok=True)
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

    def _refresh_tx_ports(self) -> None:
        self.dp.set_tx_ports([idx for idx, _ in socket.if_nameindex()])

    def _check_egress(self) -> None:
        """While an XDP program redirects, every port must take its frames (zfast.dataplane.egress):
        checked when links change, when the kernel loses XDP frames at a port (the symptom
        of a peer that lost its NAPI) and every EGRESS_RECHECK_S. The loss rising is an
        event; so is what zfast did about a port (GRO turned on at the peer every time;
        the kernel's forwarding when that starts)."""
        rising = False
        for name, drops in self.kernel_drops().items():
            lost, before = egress.xdp_lost(drops), self._xmit_errors.get(name)
            if before is not None and lost > before:
                rising = True
                self.events.log("kernel_drops", interface=name, xdp_lost=lost - before, **drops)
            self._xmit_errors[name] = lost
        ports = tuple(socket.if_nameindex())
        xdp = any(a.hook == "xdp" for a in self.dp.attached.values())
        if xdp and (rising or ports != self._egress_seen or time.monotonic() >= self._egress_next):
            self._egress_seen, self._egress_next = ports, time.monotonic() + EGRESS_RECHECK_S
            for idx, name in ports:
                check = egress.check_xdp_target(name)
                self.dp.set_tx_kernel(idx, not check.xdp_ok)
                before = self.egress.get(name)
                if check.action == "gro_on_peer" or (check.action and (
                        before is None or before.action != check.action)):
                    self.events.log("egress", interface=name, action=check.action,
                                    detail=check.detail)
                self.egress[name] = check

    def kernel_drops(self) -> dict[str, dict[str, int]]:
        """What the kernel dropped after the program, per interface of the node (zfast.dataplane.egress)."""
        return {itf.name: egress.kernel_drops(itf.name) for itf in self.project.node.interfaces}

    # ---- apply ----------------------------------------------------------------

    def _check_local(self, project: config.Project) -> None:
        if project.node is None or project.node.name != self.name:
            raise NodeError(f"the file is for node {project.node.name if project.node else None!r}, "
                            f"this node is {self.name!r}")
        if project.project != self.project.project:
            raise NodeError(f"the file is for project {project.project!r}, this node serves "
                            f"{self.project.project!r}")
        if project.datapath != self.project.datapath:
            raise NodeError("datapath sizes differ from the running node's; restart it to resize")
        if project.ha != self.project.ha:
            raise NodeError("the ha section differs from the running node's; restart it to change it")
        if project.node.interfaces != self.project.node.interfaces or project.node.mode != self.project.node.mode:
            raise NodeError("interfaces differ from the running node's; restart it to change them")

    def apply(self, project: config.Project, who: str = "api", source: str = "<api>",
              text: str | None = None) -> list[str]:
        """Commit a valid project to the store (text: the file as sent, stored as it is),
        then reconcile the maps with it. Nothing changes when the store cannot take it
        (the pair must not diverge)."""
        self._check_local(project)
        with self._apply_lock:
            problems = self.table.check_capacity(project.services) + self.fw.check_capacity(project)
            if problems:
                raise NodeError("; ".join(problems))
            try:
                rev = self.store.commit(project.project, text or _dump_yaml(project.raw), who,
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
                raw = shared_part(yaml.safe_load(rev.config) or {})
                raw.update(self.local_raw)
                project = config.parse(raw, source=f"store revision {rev.rev}")
                self._check_local(project)
                self._install(project, rev.rev)
            except (config.ConfigError, NodeError, DatapathError, yaml.YAMLError) as err:
                self.events.log("error", revision=rev.rev, error=f"cannot apply revision: {err}")

    def history(self) -> list[dict]:
        return [{"rev": r.rev, "who": r.who, "time": r.time, "source": r.source,
                 "changes": r.changes, "applied": r.rev == self.revision}
                for r in self.store.history(self.project.project)]

    def _api_rollback(self, body: dict | None):
        rev = (body or {}).get("rev")
        if not isinstance(rev, int):
            return 400, {"error": "rollback needs {\"rev\": N}"}
        try:
            old = self.store.get(self.project.project, rev)
        except KeyError:
            return 404, {"error": f"no revision {rev} (see zfast history)"}
        except StoreError as err:
            return 503, {"error": str(err)}
        raw = shared_part(yaml.safe_load(old.config) or {})
        raw.update(self.local_raw)
        try:
            project = config.parse(raw, source=f"revision {rev}")
            changes = self.apply(project, (body or {}).get("who", "api"), f"rollback to {rev}")
        except config.ConfigError as err:
            return 400, {"error": f"revision {rev} is not valid here", "problems": err.problems}
        except (NodeError, DatapathError) as err:
            return 409, {"error": str(err)}
        return 200, {"revision": self.revision, "changes": changes}

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

    # ---- firewall edits (zfast fw): the same state as apply ---------------------

    def _find_port(self, body: dict) -> tuple[int, config.PublicPort]:
        matches = [(i, pp) for i, pp in enumerate(self.project.public_ports)
                   if pp.port == body.get("port")
                   and body.get("proto") in (None, pp.proto)
                   and body.get("address") in (None, str(pp.address))]
        if not matches:
            raise NodeError(f"no public port {body.get('port')} "
                            f"(have: {', '.join(str(pp.port) for pp in self.project.public_ports) or 'none'})")
        if len(matches) > 1:
            raise NodeError(f"public port {body.get('port')} is ambiguous: give --proto or --address")
        return matches[0]

    def fw_list(self) -> dict:
        ports = []
        for pp in self.project.public_ports:
            fw = pp.firewall
            ports.append({"port": pp.port, "proto": pp.proto, "address": str(pp.address),
                          "service": pp.service, "policy": fw.policy,
                          "allow": [str(n) for n in fw.allow], "deny": [str(n) for n in fw.deny],
                          "limit": ({"new_per_s": fw.limit.new_per_s, "burst": fw.limit.burst}
                                    if fw.limit else None)})
        return {"project_deny": [str(n) for n in self.project.project_deny], "ports": ports,
                "rules": self.fw.rule_counters(), "counters": self.fw.counters()}

    def _api_fw_change(self, body: dict | None):
        body = body or {}
        op, cidr = body.get("op"), body.get("cidr")
        if op not in ("allow", "deny", "remove") or not isinstance(cidr, str):
            return 400, {"error": "fw needs {op: allow|deny|remove, port, cidr}"}
        try:
            i, _ = self._find_port(body)
        except NodeError as err:
            return 404, {"error": str(err)}
        raw = json.loads(json.dumps(self.project.raw, default=str))
        fw = raw["public_ports"][i].setdefault("firewall", {})
        lists = {k: [c for c in fw.get(k, []) if c != cidr] for k in ("allow", "deny")}
        if op == "remove" and all(cidr not in fw.get(k, []) for k in ("allow", "deny")):
            return 404, {"error": f"{cidr} is in neither list of port {body.get('port')}"}
        if op != "remove":
            lists[op].append(cidr)
        fw.update(lists)
        try:
            project = config.parse(raw, source="zfast fw")
            changes = self.apply(project, body.get("who", "api"),
                                 f"zfast fw {op} {body.get('port')} {cidr}")
        except config.ConfigError as err:
            return 400, {"error": f"{len(err.problems)} problem(s)", "problems": err.problems}
        except (NodeError, DatapathError) as err:
            return 409, {"error": str(err)}
        return 200, {"revision": self.revision, "changes": changes}

    def _api_fw_test(self, body: dict | None):
        body = body or {}
        try:
            _, pp = self._find_port(body)
            result = explain(self.project, str(body.get("src")), pp)
        except NodeError as err:
            return 404, {"error": str(err)}
        except ValueError:
            return 400, {"error": f"{body.get('src')!r} is not an IP address"}
        return 200, {"port": pp.port, "proto": pp.proto, "address": str(pp.address),
                     "src": body.get("src"), **result}

    def _api_apply(self, body: dict | None):
        text = (body or {}).get("config")
        if not isinstance(text, str):
            return 400, {"error": "apply needs {\"config\": \"<YAML text>\"}"}
        try:
            source = (body or {}).get("source", "<api>")
            project = config.loads(text, source=source)
            changes = self.apply(project, (body or {}).get("who", "api"), source, text)
        except config.ConfigError as err:
            return 400, {"error": f"{len(err.problems)} problem(s) in the file", "problems": err.problems}
        except yaml.YAMLError as err:
            return 400, {"error": f"not YAML: {err}"}
        except (NodeError, DatapathError) as err:
            return 409, {"error": str(err)}
        return 200, {"revision": self.revision, "changes": changes}

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
                            "why": a.why,
                            **({"egress": self.egress[a.ifname].detail} if a.ifname in self.egress
                               and self.egress[a.ifname].action else {})}
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
            "kernel_drops": self.kernel_drops(),
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
    installed = pins.read_json(state_dir / pins.INSTALLED)
    if installed:
        from zfast.dataplane.loader import detach_interface
        for ifname in installed.get("interfaces", []):
            try:
                detach_interface(ifname)
                done.append(f"detached {ifname}")
            except DatapathError:
                pass  # gone with its namespace
        pin = Path(installed.get("pin_dir", ""))
        if pin.is_dir() and pin.parent == BPFFS:
            pins.remove_pins(pin)
            done.append(f"removed {pin}")
    for name in (pins.INSTALLED, pins.LAYOUT, "api.sock"):
        (state_dir / name).unlink(missing_ok=True)
    return done


def reason_descriptions() -> dict[str, str]:
    return {r.name: r.description for r in reasons()}
