"""`zfast core up`: a project's core service on this host.

Two balancer instances (an active/standby pair), each a network namespace
with its cgroup and daemon (runtime.py), plugged into the project's public and
private bridges; the repair controller replaces whichever misbehaves, and the
scaling controller resizes each one's CPU and memory as its load changes.

Addresses follow the spec: an instance takes the next free addresses counting
down from the top of each subnet (below the private gateway); the VIPs
(services' vip, public ports' address, the private gateway) belong to the pair
and move to its active instance.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from zfast import config
from zfast.api import ApiError, Client, Server
from zfast.controllers import scaling
from zfast.core.cgroups import Cgroup, hierarchy_problem, parse_size
from zfast.core.runtime import (Instance, InstanceSpec, Link, NetnsRuntime, Runtime, pin_bridge_mac,
                                write_atomically)
from zfast.core.spare import PARKED
from zfast.controllers.logger import LoggerController

log = logging.getLogger("zfast.core")

CHECK_EVERY_S = 0.25       # the repair controller's look at every instance
SCALE_EVERY_S = 1.0        # the scaling controller's sample
API_TIMEOUT_S = 0.5        # a daemon that does not answer its status in this is not well
PERSIST_S = 0.5            # a problem (other than a gone daemon) must last this long
STARVED_WAIT_S = 2.0       # after a starved daemon's quota grew: its time to answer again
START_GRACE_S = 60.0       # a new daemon may take this long to answer first (BCC compiles)
CACHED_GRACE_S = 15.0      # ... or this long when its program is in the program cache
WARM_TIMEOUT_S = 600.0     # the core's own compile of the balancers' program (8 s here)
SPARE_GRACE_S = 10.0       # a parked spare has compiled already: it answers within a second
HEARTBEAT_MISSING_MS = 1000  # a standby the active has not heard from for this long is abnormal
STABLE_S = 10.0            # failing before this long healthy (or never healthy) is a crash
BACKOFF_FIRST_S = 8.0      # a start costs ~0.35 s of CPU (Python, imports): one try in 8 s
BACKOFF_MAX_S = 60.0       # is under 5 % of a CPU, and it only gets rarer
FLOW_ENTRY_BYTES = 1536   # memory a flow-table entry costs an instance at its peak (scaling)


STOPPED = "daemon stopped (SIGSTOP): it does nothing until continued"


def _stopped(pid: int | None) -> bool:
    """Whether the process is stopped by a signal (state T: SIGSTOP, SIGTSTP). Not a
    traced stop (t: a debugger attached on purpose), and not a busy or starved one."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


class CoreError(Exception):
    pass


@dataclass
class CoreSpec:
    """The core section as the service runs it: the scaling controller changes its
    flow_table and memory as it goes (zfast.config.Core is the file's, frozen)."""
    public_bridge: str
    public_subnet: ipaddress.IPv4Network
    public_subnet6: ipaddress.IPv6Network | None
    private_bridge: str
    private_subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    cpu: float
    memory: int
    flow_table: int
    scale: dict                   # the bounds the file gives (scaling.bounds_from)
    routers: int                  # HTTP balancers (0 unless the file has a routing section)
    router_cpu: float
    router_memory: int


def parse_core(project: config.Project) -> CoreSpec:
    """The project's core section, checked by zfast.config (Project.core)."""
    core = project.core
    if core is None:
        raise CoreError("the project file has no core section (core: {public, private, balancer})")
    balancer, routers = core.balancer, core.routers
    return CoreSpec(
        public_bridge=core.public.bridge, public_subnet=core.public.subnet,
        public_subnet6=core.public.subnet6, private_bridge=core.private.bridge,
        private_subnet=core.private.subnet, gateway=core.private.gateway,
        cpu=balancer.cpu, memory=balancer.memory, flow_table=balancer.flow_table,
        scale=balancer.scale.given(),
        routers=routers.count if project.routing is not None else 0,
        router_cpu=routers.cpu, router_memory=routers.memory)


def _top_down(subnet, skip, count: int) -> list:
    """The next `count` addresses from the top of subnet, below (and not) those in skip."""
    out, addr = [], subnet.broadcast_address - 1
    while len(out) < count and addr > subnet.network_address:
        if addr not in skip:
            out.append(addr)
        addr -= 1
    return out


@dataclass
class Health:
    problems: list[str] = field(default_factory=list)
    since: float = 0.0
    healthy_at: float | None = None     # first answer without problems (None: never yet)


class CoreService:
    def __init__(self, project: config.Project, state_dir: Path, runtime: Runtime | None = None):
        self.project = project
        self.core = parse_core(project)
        problem = hierarchy_problem()   # before anything is made: nothing to undo then
        if problem:
            raise CoreError(problem)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"zfc-{project.project}"[:20]
        self.runtime = runtime or NetnsRuntime(prefix=self.prefix)
        self.events = LoggerController(self.state_dir, f"{project.project}-core")
        self.instances: dict[str, Instance] = {}
        self.spare: Instance | None = None      # a parked daemon, compiled ahead (spare.py)
        self._spare_seq = 0
        # The core's own cgroup: every instance's group sits under it, so its cpuacct
        # counts the whole core service, failed starts included.
        self.cgroup = Cgroup(self.prefix)
        self.bounds = scaling.bounds_from(self.core.scale, parse_size)
        self.scalers: dict[str, scaling.Scaler] = {}
        self._last_usage: dict[str, tuple] = {}
        self._throttle_seen: dict[str, tuple[int, int]] = {}   # (periods, throttled) last look
        self._resizing: dict | None = None      # a rolling flow-table resize under way
        self.health: dict[str, Health] = {}
        self.next_try: dict[str, float] = {}
        self.crashes: dict[str, int] = {}       # crashes in a row (back-off exponent)
        self.answered: set[str] = set()   # instances whose daemon has answered since (re)start
        self.boosted: set[str] = set()    # cold starts with more CPU until they answer
        self.drained: set[str] = set()    # routers out of the balancers' rotation (repair)
        self._statuses: dict[str, dict] = {}  # each daemon's last answer
        self.grace: dict[str, float] = {}     # how long each may take to answer first
        self.store = None
        self.certs = None                  # zfast.routing.certs.CertManager with a routing section
        self._certs_acme = None
        self._certs_due = threading.Event()
        self.decisions = {"repair": None, "scaling": None}
        self._stop = threading.Event()
        self.api: Server | None = None
        self.key_file = self.state_dir / "ha.key"

    # ---- plan ---------------------------------------------------------------------

    def vips(self) -> list:
        out = [s.vip for s in self.project.services] + [p.address for p in self.project.public_ports]
        if self.project.routing is not None:
            out += list(self.project.routing.addresses)
        out.append(self.core.gateway)
        return list(dict.fromkeys(out))

    def router_names(self) -> list[str]:
        return [f"rt-{chr(ord('a') + i)}" for i in range(self.core.routers)]

    def shared_raw(self) -> dict:
        """The project file every instance shares (what the store's revisions hold): the
        operator's, without core/node/ha, with the routers behind the routing addresses
        (drained ones at weight 0)."""
        raw = {k: copy.deepcopy(v) for k, v in self.project.raw.items() if k not in ("core", "node", "ha")}
        raw["store"] = {"kind": "sqlite", "path": str(self.state_dir / "store.sqlite")}
        dp = dict(raw.get("datapath") or {})
        dp["flow_table"] = self.core.flow_table
        raw["datapath"] = dp
        if self.core.routers:
            priv = self._private_addresses()
            raw["routing"] = dict(raw["routing"])
            raw["routing"]["routers"] = [
                {"address": str(priv[2 + i]), "weight": 0 if name in self.drained else 1}
                for i, name in enumerate(self.router_names())]
        return raw

    def _private_addresses(self) -> list:
        c = self.core
        return _top_down(c.private_subnet, {c.gateway, *self.vips()}, 2 + c.routers)

    def specs(self) -> list[InstanceSpec]:
        c = self.core
        pub4 = _top_down(c.public_subnet, set(self.vips()), 2)
        priv4 = self._private_addresses()
        pub6 = _top_down(c.public_subnet6, set(self.vips()), 2) if c.public_subnet6 else [None, None]
        names = ["lb-a", "lb-b"]
        specs = []
        for i, name in enumerate(names):
            j = 1 - i
            raw = self.shared_raw()
            state_dir = self.state_dir / name
            raw["node"] = {"name": f"{self.project.project}-{name}", "state_dir": str(state_dir),
                           "mode": "auto",
                           "interfaces": [{"name": "pub0", "role": "public"},
                                          {"name": "priv0", "role": "private"}]}
            raw["ha"] = {"peer": str(priv4[j]), "bind": str(priv4[i]), "priority": 200 - 100 * i,
                         "key_file": str(self.key_file), "heartbeat_ms": 50, "dead_intervals": 4,
                         "vips": [str(v) for v in self.vips()],
                         "links": [{"bind": str(pub4[i]), "peer": str(pub4[j])}]}
            pub_addrs = [f"{pub4[i]}/{c.public_subnet.prefixlen}"]
            if pub6[i] is not None:
                pub_addrs.append(f"{pub6[i]}/{c.public_subnet6.prefixlen}")
            specs.append(InstanceSpec(
                name=name, kind="balancer", cpu=c.cpu, memory=c.memory, state_dir=state_dir,
                links=[Link(c.public_bridge, "pub0", pub_addrs),
                       Link(c.private_bridge, "priv0", [f"{priv4[i]}/{c.private_subnet.prefixlen}"])],
                config=raw))
        for i, name in enumerate(self.router_names()):
            # A router is reached through the balancers (the routing addresses' 80/443) and
            # answers through them: its default route is the private gateway, a VIP.
            state_dir = self.state_dir / name
            raw = self.shared_raw()
            raw["router"] = {"name": f"{self.project.project}-{name}", "state_dir": str(state_dir),
                             "binds": ["0.0.0.0"], "http_port": 80, "https_port": 443}
            specs.append(InstanceSpec(
                name=name, kind="router", cpu=c.router_cpu, memory=c.router_memory,
                state_dir=state_dir, routes=[("default", str(c.gateway))],
                links=[Link(c.private_bridge, "priv0",
                            [f"{priv4[2 + i]}/{c.private_subnet.prefixlen}"])],
                config=raw))
        return specs

    # ---- life cycle ---------------------------------------------------------------

    def spec_of(self, name: str) -> InstanceSpec:
        return next(s for s in self.specs() if s.name == name)

    def spare_spec(self) -> InstanceSpec:
        """A spare: lb-a's links without addresses, its file under its own node name."""
        self._spare_seq += 1
        name = f"spare{self._spare_seq}"
        base = self.specs()[0]
        raw = copy.deepcopy(base.config)
        raw["node"]["name"] = f"{self.project.project}-{name}"
        raw["node"]["state_dir"] = str(self.state_dir / name)
        return InstanceSpec(name=name, kind="spare", cpu=base.cpu, memory=base.memory,
                            state_dir=self.state_dir / name,
                            links=[Link(l.bridge, l.ifname, []) for l in base.links], config=raw)

    def ensure_bridges(self) -> list[str]:
        import subprocess
        made = []
        for br in (self.core.public_bridge, self.core.private_bridge):
            if subprocess.run(["ip", "link", "show", br], capture_output=True).returncode != 0:
                subprocess.run(["ip", "link", "add", br, "type", "bridge"], check=True)
                made.append(br)
            subprocess.run(["ip", "link", "set", br, "up"], check=True)
            pin_bridge_mac(br)   # plugging instances in must not change the host's MAC
        return made

    def up(self) -> None:
        from zfast.ha.heartbeat import write_key
        if not self.key_file.exists():
            write_key(self.key_file)
        for br in self.ensure_bridges():
            self.events.log("repair", action="bridge created", bridge=br)
        self.cgroup.create()
        if not self.cgroup.v2:      # v2 keeps processes out of inner groups
            self.cgroup.add(os.getpid())
        from zfast.store import open_store
        self.store = open_store(self.shared_raw()["store"], self.state_dir,
                                f"{self.project.project}-core")
        self._commit("zfast core up")
        for spec in self.specs():
            self._launch(spec)
        if self.project.routing is not None:
            self._start_certs()
        self.api = Server(self.state_dir, {
            ("GET", "/status"): lambda _: (200, self.status()),
            ("GET", "/certs"): lambda _: (200, self.certs_list()),
            ("GET", "/stats"): lambda _: (200, self.stats()),
            ("POST", "/certs/renew"): self._api_renew,
            ("POST", "/apply"): self._api_apply,
        })
        self.api.start()

    # ---- the shared project file ---------------------------------------------------------

    def _commit(self, who: str, changes: list[str] | None = None) -> int:
        """The shared file as a store revision (balancers and routers follow the store)."""
        from zfast.node.daemon import config_diff, shared_part
        raw = shared_part(self.shared_raw())
        latest = self.store.latest(self.project.project)
        theirs = shared_part(yaml.safe_load(latest.config) or {}) if latest else {}
        if latest is not None and theirs == raw:
            return latest.rev
        rev = self.store.commit(self.project.project, yaml.safe_dump(raw, sort_keys=False), who,
                                changes or config_diff(theirs, raw), "core")
        return rev.rev

    def _api_apply(self, body: dict | None):
        """`zfast core apply`: a new project file for the whole core service (services,
        ports, firewall, domains); the core section itself must not change."""
        try:
            raw = yaml.safe_load((body or {}).get("config", ""))
            project = config.parse(raw, source=(body or {}).get("source", "<api>"))
        except (config.ConfigError, yaml.YAMLError) as err:
            problems = getattr(err, "problems", [str(err)])
            return 400, {"error": "the file is not valid", "problems": problems}
        if project.project != self.project.project:
            return 409, {"error": f"the file is for project {project.project!r}, this core "
                                  f"serves {self.project.project!r}"}
        if (raw or {}).get("core") != self.project.raw.get("core"):
            return 409, {"error": "the core section differs: restart the core service to change it"}
        if (project.routing is None) != (self.project.routing is None):
            return 409, {"error": "adding or removing the routing section needs a restart"}
        old = self.project
        self.project = project
        try:
            rev = self._commit((body or {}).get("who", "zfast core apply"))
        except Exception as err:
            self.project = old
            return 503, {"error": f"store: {err}"}
        if self.certs is not None:
            self._certs_due.set()
        self.events.log("apply", revision=rev, source=(body or {}).get("source"))
        return 200, {"revision": rev}

    # ---- certificates (the routing service) -------------------------------------------------

    def _acme_spec(self) -> dict | None:
        acme = self.project.routing.acme if self.project.routing else None
        return ({"directory": acme.directory, "email": acme.email, "ca_bundle": acme.ca_bundle}
                if acme else None)

    def _cert_manager(self):
        """The manager for today's routing.acme (an apply may change it)."""
        from zfast.routing.certs import CertManager
        spec = self._acme_spec()
        if self.certs is None or self._certs_acme != spec:
            self.certs = CertManager(self.store, self.project.project, spec,
                                     log_event=lambda kind, **f: self.events.log(kind, **f))
            self._certs_acme = spec
        return self.certs

    def _start_certs(self) -> None:
        self._cert_manager().ensure(self._domains())
        threading.Thread(target=self._certs_loop, name="zfast-core-certs", daemon=True).start()

    def _domains(self) -> list[tuple[str, str]]:
        return [(d.host, d.tls) for d in self.project.routing.domains] if self.project.routing else []

    def _certs_loop(self) -> None:
        """Self-signed at once for every host, ACME behind it, renewals when due."""
        while not self._stop.is_set():
            try:
                manager = self._cert_manager()
                manager.ensure(self._domains())
                manager.tick()
            except Exception as err:        # tick never raises; ensure on a bad store might
                self.events.log("error", controller="certs", error=str(err))
            self._certs_due.wait(1.0)
            self._certs_due.clear()

    def stats(self) -> dict:
        """Every instance's own counters: a balancer's services, backends and verdicts; a
        router's requests and bytes per upstream and server."""
        out = {}
        for name, inst in list(self.instances.items()):
            try:
                out[name] = {"kind": inst.spec.kind,
                             **Client(inst.spec.state_dir, timeout=API_TIMEOUT_S * 2).get("/stats")}
            except ApiError as err:
                out[name] = {"kind": inst.spec.kind, "error": str(err)}
        return {"project": self.project.project, "instances": out}

    def certs_list(self) -> list[dict]:
        return [c.public() for c in self.certs.certs()] if self.certs else []

    def _api_renew(self, body: dict | None):
        from zfast.routing.certs import CertError
        host = (body or {}).get("host")
        if self.certs is None:
            return 404, {"error": "this project has no routing service"}
        try:
            host = config.parse_host(host)
        except (ValueError, TypeError) as err:
            return 400, {"error": f"{host!r}: {err}"}
        if host not in {h for h, _ in self._domains()}:
            return 404, {"error": f"{host} is not one of routing.domains"}
        try:
            return 200, self.certs.renew(host).public()
        except CertError as err:
            return 502, {"error": str(err)}

    def _launch(self, spec: InstanceSpec, restarts: int = 0) -> Instance:
        self._warm(spec)
        inst = self.runtime.create(spec, group=self.prefix)
        inst.restarts = restarts
        self.runtime.start(inst)
        boost = self._boost_start(inst)
        self.instances[spec.name] = inst
        self.answered.discard(spec.name)
        self.grace[spec.name] = self._start_grace(spec)
        self.health[spec.name] = Health(since=time.time())
        self.events.log("repair", instance=spec.name, action="started", pid=inst.pid,
                        restarts=restarts, start_cpu=boost or spec.cpu)
        return inst

    def _boost_start(self, inst: Instance) -> float | None:
        """A start (imports, the kernel's verifier, the maps filled, the flow dump: ~1.5 s
        of CPU) may use the top of scale.cpu until the daemon first answers, then its own
        quota: the CPU it costs is the same, spent sooner (a standby back in half the
        time). The boost it got, or None."""
        boost = self.bounds.cpu[1] if self.bounds.cpu[1] > inst.spec.cpu else None
        if boost:
            self.runtime.boost(inst, boost)
            self.boosted.add(inst.spec.name)
        else:
            self.runtime.boost(inst, None)      # its own size (a spare's was another)
        return boost

    def _start_grace(self, spec: InstanceSpec) -> float:
        """How long a new instance may take to answer first: a compile takes seconds of
        CPU (more under a small quota), a start from the program cache one or two."""
        return CACHED_GRACE_S if self._cached(spec) else START_GRACE_S

    @staticmethod
    def _cached(spec: InstanceSpec) -> bool:
        """Whether a balancer's start finds its program in the program cache."""
        if spec.kind != "balancer":
            return False
        try:
            from zfast import config
            from zfast.dataplane.loader import is_cached
            from zfast.paths import pin_dir
            project = config.parse(spec.config, f"<{spec.name}>")
            return is_cached(project.datapath, pin_dir(project.node.name))
        except Exception:        # a file the daemon will refuse: its own error says why
            return False

    def _warm(self, spec: InstanceSpec) -> None:
        """Compile a balancer's program into the cache here, outside every instance, when
        it is not there: LLVM alone needs more memory (~180 MiB) than a small balancer
        has, and every instance (pair, spare, successors) then starts from the cache. A
        failure leaves the compile to the instance, as before (its error says why)."""
        if spec.kind != "balancer" or self._cached(spec):
            return
        import subprocess
        import sys
        path = self.state_dir / "warm.yaml"
        path.write_text(yaml.safe_dump(spec.config, sort_keys=False))
        out = subprocess.run([sys.executable, "-m", "zfast.cli", "cache", "warm", "-c", str(path),
                              "--json"], capture_output=True, text=True, timeout=WARM_TIMEOUT_S)
        if out.returncode == 0:
            self.events.log("cache", action="compiled", instance=spec.name, **json.loads(out.stdout))
        else:
            self.events.log("error", what="program cache warm-up", instance=spec.name,
                            error=(out.stderr.strip().splitlines() or ["?"])[-1])

    def _end_boost(self, name: str, inst: Instance) -> None:
        self.boosted.discard(name)
        self.runtime.boost(inst, None)
        self.events.log("repair", instance=name, action="answered", cpu=inst.spec.cpu,
                        start_s=round(time.time() - inst.started, 2),
                        start_cpu_s=round(self._cpu_s(inst), 2))

    def _cpu_s(self, inst: Instance) -> float:
        """CPU seconds the instance used as this instance (not a spare's compile before)."""
        return max(0, self.runtime.usage(inst)["cpu_ns"] - inst.cpu_ns_before) / 1e9

    def run(self) -> None:
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        next_scale = time.monotonic() + SCALE_EVERY_S
        try:
            while not self._stop.wait(CHECK_EVERY_S):
                try:
                    self.repair_tick()
                    self.spare_tick()
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
        if self.spare is not None:
            self.runtime.destroy(self.spare)
            self.spare = None
        for inst in list(self.instances.values()):
            self.runtime.stop(inst)
            self.runtime.destroy(inst)
        self.instances.clear()
        if not self.cgroup.v2:
            (self.cgroup.root / "cpu" / "cgroup.procs").write_text(str(os.getpid()))
            (self.cgroup.root / "cpuacct" / "cgroup.procs").write_text(str(os.getpid()))
            (self.cgroup.root / "memory" / "cgroup.procs").write_text(str(os.getpid()))
        self.cgroup.destroy()

    # ---- repair controller --------------------------------------------------------

    def problems_of(self, inst: Instance) -> list[str]:
        """What is wrong with an instance now (empty: healthy)."""
        if inst.proc is None or inst.proc.poll() is not None:
            code = inst.proc.returncode if inst.proc else None
            why = self.runtime.last_words(inst)
            return [f"daemon exited ({code})" + (f": {why}" if why else "")]
        if _stopped(inst.pid):
            return [STOPPED]
        try:
            st = Client(inst.spec.state_dir, timeout=API_TIMEOUT_S).get("/status")
            self.answered.add(inst.spec.name)
            self._statuses[inst.spec.name] = st
        except ApiError as err:
            if (inst.spec.name not in self.answered
                    and time.time() - inst.started < self.grace.get(inst.spec.name, START_GRACE_S)):
                return []  # still starting (compiling the program takes seconds)
            return [f"daemon does not answer: {err}"]
        problems = []
        if inst.spec.kind == "balancer" and st.get("role") == "standby":
            # heartbeat missing: its daemon answers, but the active has not heard it for a
            # while (the active is the one to trust: it keeps the VIPs and the flows)
            for other, ost in self._statuses.items():
                peer = (ost or {}).get("peer") or {}
                if (other != inst.spec.name and ost.get("role") == "active"
                        and peer.get("state") == "dead"
                        and (peer.get("last_heartbeat_ms") or 0) > HEARTBEAT_MISSING_MS
                        and time.time() - inst.started > 10):
                    problems.append(f"its heartbeats do not reach the active "
                                    f"({peer['last_heartbeat_ms']:.0f} ms)")
        if len(st.get("interfaces", [])) < len(inst.spec.links):
            problems.append("programs detached")
        if inst.spec.kind == "router" and not (st.get("haproxy") or {}).get("alive"):
            problems.append("its HAProxy is not running")
        activity = (st.get("controllers") or {}).get("activity") or {}
        problems += activity.get("problems", [])
        use = self.runtime.usage(inst)
        if use["memory_limit"] and use["memory"] > 0.95 * use["memory_limit"]:
            problems.append(f"memory at its limit ({use['memory'] >> 20} of "
                            f"{use['memory_limit'] >> 20} MiB)")
        return problems

    def repair_tick(self) -> None:
        now = time.time()
        for name, inst in list(self.instances.items()):
            problems = self.problems_of(inst)
            if name in self.boosted and name in self.answered:
                self._end_boost(name, inst)
            throttled = self._throttled_share(name, inst)
            h = self.health[name]
            if not problems:
                h.problems, h.since = [], now
                if h.healthy_at is None and name in self.answered:
                    h.healthy_at = now
                if self.crashes.get(name) and h.healthy_at and now - h.healthy_at >= STABLE_S:
                    # the crash loop is over: a later failure is repaired at once, not
                    # after what is left of the last back-off
                    self.events.log("repair", instance=name, action="stable",
                                    after_crashes=self.crashes[name])
                    self.crashes[name] = 0
                    self.next_try.pop(name, None)
                continue
            if not h.problems:
                h.since = now
            h.problems = problems
            # A gone or stopped daemon is replaced at once (neither comes back by itself);
            # other problems must last a moment.
            gone = inst.proc is None or inst.proc.poll() is not None or problems == [STOPPED]
            if not gone and now - h.since < PERSIST_S:
                continue
            if not gone and self._grow_if_starved(name, inst, problems, throttled, now):
                h.since = now + STARVED_WAIT_S - PERSIST_S
                continue
            if now < self.next_try.get(name, 0):
                continue
            if not gone and inst.spec.kind == "balancer" and not self._others_well(name):
                continue    # never take down the last working balancer for a lesser problem
            self.replace(name, problems)
        self._undrain_ready_routers()

    def _throttled_share(self, name: str, inst: Instance) -> float:
        """Share of CFS periods since the last look in which its quota ran out."""
        try:
            periods, throttled = inst.cgroup.throttling()
        except (OSError, ValueError):
            return 0.0
        before = self._throttle_seen.get(name, (periods, throttled))
        self._throttle_seen[name] = (periods, throttled)
        return (throttled - before[1]) / max(periods - before[0], 1)

    def _grow_if_starved(self, name: str, inst: Instance, problems: list[str],
                         throttled: float, now: float) -> bool:
        """A silent daemon whose quota ran out in most periods since the last look gets
        more CPU instead of a successor (which would starve the same way)."""
        if not all(p.startswith("daemon does not answer") for p in problems):
            return False
        d = self.scalers.setdefault(name, scaling.Scaler(self.bounds)).grow_starved(
            inst.spec.cpu, throttled, now)
        if d is not None:
            self._carry_out(name, inst, d)
        return d is not None

    def _others_well(self, name: str) -> bool:
        """Whether another balancer is up and answering (then this one may be replaced)."""
        return any(n != name and i.spec.kind == "balancer" and n in self.answered
                   and not self.health[n].problems and i.pid
                   for n, i in self.instances.items())

    def replace(self, name: str, problems: list[str], spec: InstanceSpec | None = None,
                planned: bool = False) -> None:
        """Remove an instance and start its successor: the parked spare when one is ready
        (no compile: seconds sooner), else a new instance. A successor that dies within
        STABLE_S of being healthy (or before it ever was) makes the next try wait (8, 16,
        32, 60 s). How long it lived does not count: a start that took long (a compile on
        a busy machine) and then served is no crash loop."""
        now = time.time()
        inst = self.instances[name]
        if spec is None and inst.spec.kind == "balancer":
            # today's sizes (a flow-table resize may be under way), this one's CPU and memory
            spec = replace(self.spec_of(name), cpu=inst.spec.cpu,
                           memory=max(inst.spec.memory, self.core.memory))
        spec = spec or inst.spec
        healthy_at = self.health[name].healthy_at
        crashed = (not planned and inst.restarts > 0
                   and (healthy_at is None or now - healthy_at < STABLE_S))
        self.crashes[name] = self.crashes.get(name, 0) + 1 if crashed else 0
        restarts = inst.restarts + 1
        backoff = (min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.crashes[name] - 1))
                   if crashed else 0)
        self.decisions["repair"] = {"time": now, "instance": name, "problems": problems,
                                    "action": "resize" if planned else "replace",
                                    "restarts": restarts,
                                    "next_retry_in_s": backoff}
        # what the instance cost over its life as this instance (a crash loop's cost is the
        # sum of these; a spare's compile, done before it was needed, is not part of it)
        cpu_s = round(self._cpu_s(inst), 3)
        self.events.log("repair", instance=name, action="replace", problems=problems,
                        restarts=restarts, backoff_s=backoff, cpu_s=cpu_s,
                        lived_s=round(now - inst.started, 2),
                        healthy_s=round(now - healthy_at, 2) if healthy_at else None)
        macs = self.runtime.macs(inst)
        if inst.spec.kind == "router":
            self._drain_router(name, inst)
        self.runtime.destroy(inst)
        self.boosted.discard(name)
        self.scalers.pop(name, None)
        self._throttle_seen.pop(name, None)
        self._last_usage.pop(name, None)
        self._statuses.pop(name, None)
        self.next_try[name] = now + backoff
        try:
            # the spare even after a crash: it costs no compile, and none is made while
            # anything fails, so a crash loop uses it once at most
            if spec.kind == "balancer" and self._spare_ready():
                self._activate_spare(spec, restarts, macs)
            else:
                self._launch(spec, restarts)
        except Exception as err:
            self.events.log("error", instance=name, error=f"cannot recreate: {err}")

    # ---- routers out of and back into rotation ------------------------------------------

    def _drain_router(self, name: str, inst: Instance, wait_s: float = 5.0) -> None:
        """Before a router goes: the balancers stop sending it new connections (weight 0,
        a store revision they apply in ~0.1 s), then its HAProxy soft-stops: it closes its
        listeners and each keep-alive connection after its current response, so clients
        reconnect (to the other router) instead of seeing an error."""
        t0 = time.monotonic()
        self.drained.add(name)
        try:
            rev = self._commit("zfast core (repair)", [f"router {name} drained"])
        except Exception as err:
            self.events.log("error", instance=name, error=f"cannot drain: {err}")
            return
        # Every balancer that answers must have it (not just one: the standby may apply it
        # first while the active still sends new connections to a router about to stop
        # listening, which clients see as refused connections).
        balancers = [i for i in self.instances.values() if i.spec.kind == "balancer"]
        while time.monotonic() - t0 < 2.0:
            revs = []
            for other in balancers:
                try:
                    revs.append(Client(other.spec.state_dir, timeout=0.3).get("/status")["revision"])
                except (ApiError, KeyError):
                    pass
            if revs and min(revs) >= rev:
                break
            time.sleep(0.05)
        applied_s = round(time.monotonic() - t0, 2)
        pidfile = inst.spec.state_dir / "haproxy" / "haproxy.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGUSR1)           # HAProxy's soft stop
            while time.monotonic() - t0 < wait_s:
                os.kill(pid, 0)
                time.sleep(0.05)
        except (OSError, ValueError, IndexError):
            pass                                    # gone: nothing more to wait for
        self.events.log("repair", instance=name, action="drained",
                        seconds=round(time.monotonic() - t0, 2), weight_0_applied_s=applied_s)

    def _undrain_ready_routers(self) -> None:
        back = [n for n in self.drained if n in self.answered and n in self.instances
                and not self.health[n].problems]
        if back:
            self.drained -= set(back)
            self._commit("zfast core (repair)", [f"router {n} back in rotation" for n in back])

    # ---- the spare --------------------------------------------------------------------

    def _spare_ready(self) -> bool:
        sp = self.spare
        return bool(sp and sp.pid and (sp.spec.state_dir / PARKED).exists())

    def _activate_spare(self, spec: InstanceSpec, restarts: int, macs: dict) -> Instance:
        """The spare becomes instance spec.name: its addresses, then its file (the parked
        daemon waits for that file)."""
        sp, self.spare = self.spare, None
        raw = copy.deepcopy(spec.config)
        raw["node"]["state_dir"] = str(sp.spec.state_dir)
        new = replace(spec, state_dir=sp.spec.state_dir, config=raw)
        self.runtime.assign(sp, new.links, macs)
        inst = Instance(new, sp.netns, sp.cgroup, sp.proc, started=time.time(),
                        restarts=restarts, host_ifnames=sp.host_ifnames,
                        cpu_ns_before=self.runtime.usage(sp)["cpu_ns"])
        # the rest of its start (the maps filled, the attach, the flow dump) with the top
        # of scale.cpu, as a new instance's; its own size once it answers (_end_boost)
        self._boost_start(inst)
        write_atomically(inst.config_path, yaml.safe_dump(raw, sort_keys=False))
        self.instances[spec.name] = inst
        self.answered.discard(spec.name)
        self.grace[spec.name] = SPARE_GRACE_S
        self.health[spec.name] = Health(since=time.time())
        self.events.log("repair", instance=spec.name, action="started from the spare",
                        spare=sp.spec.name, pid=inst.pid, restarts=restarts)
        return inst

    def spare_tick(self) -> None:
        """Keep one parked spare while the pair is well (none while an instance is failing:
        a crash loop must stay cheap)."""
        if self.spare is not None:
            if self.spare.pid is None:       # the parked daemon died: make another later
                self.events.log("error", instance=self.spare.spec.name, error="spare exited")
                self.runtime.destroy(self.spare)
                self.spare = None
                self.next_try["spare"] = time.time() + BACKOFF_MAX_S / 4
            return
        if time.time() < self.next_try.get("spare", 0) or self._resizing:
            return
        if any(h.problems for h in self.health.values()) or len(self.answered) < len(self.instances):
            return
        spec = self.spare_spec()
        self._warm(spec)
        inst = self.runtime.create(spec, group=self.prefix)
        self.runtime.start(inst, park=spec.config)
        self.spare = inst

    # ---- status ---------------------------------------------------------------------

    def status(self) -> dict:
        out = []
        for name, inst in self.instances.items():
            role = None
            try:
                role = Client(inst.spec.state_dir, timeout=0.5).get("/status").get("role")
                self.answered.add(name)     # it has answered: from now on silence is a fault
            except ApiError:
                pass
            out.append({
                "name": name, "kind": inst.spec.kind, "role": role, "pid": inst.pid,
                "netns": inst.netns,
                "addresses": [a for link in inst.spec.links for a in link.addresses],
                "cpu": inst.spec.cpu, "memory": inst.spec.memory,
                "flow_table": inst.spec.config.get("datapath", {}).get("flow_table"),
                "healthy": not self.health[name].problems, "problems": self.health[name].problems,
                "restarts": inst.restarts, "started": inst.started,
                "healthy_since": self.health[name].healthy_at,
                "boosted": name in self.boosted,    # starting with more CPU than "cpu"
            })
        return {"project": self.project.project, "instances": out,
                "spare": self.spare.spec.name if self.spare else None,
                "spare_ready": self._spare_ready(),
                "resizing": self._resizing,
                "drained": sorted(self.drained),
                "controllers": {"repair": self.decisions["repair"] or {},
                                "scaling": self.decisions["scaling"] or {}}}

    # ---- scaling controller ----------------------------------------------------------

    def _sample(self, name: str, inst: Instance, now: float) -> scaling.Sample | None:
        """One second of an instance's load: CPU (and throttling) from its cgroup, flow
        entries from its pinned flow table, packets from its counters."""
        from zfast.controllers.statistics import count_entries
        from zfast.paths import pin_dir
        try:
            cpu_ns = inst.cgroup.cpu_ns()
            periods, throttled = inst.cgroup.throttling()
            memory, _ = inst.cgroup.memory()
        except (OSError, ValueError):
            return None
        last = self._last_usage.get(name)
        packets = last[4] if last else 0     # a daemon that does not answer: no new packets
        if not self.health[name].problems:
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
            from zfast.dataplane.bpflib import lib   # not bcc: the core daemon never loads LLVM
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

    def scale_tick(self) -> None:
        now = time.time()
        roles = {}
        for name, inst in list(self.instances.items()):
            # A daemon starved by its quota may not answer in time: it is still sampled
            # (from its cgroup), so that its quota can grow before the repair gives up on it.
            if inst.pid is None or name not in self.answered:
                continue
            sample = self._sample(name, inst, now)
            if sample is None:
                continue
            well = not self.health[name].problems
            if well:   # the repair controller asked it this very loop
                roles[name] = self._statuses.get(name, {}).get("role")
            scaler = self.scalers.setdefault(name, scaling.Scaler(self.bounds))
            scaler.add(sample)
            sizes = scaling.Sizes(inst.spec.cpu, inst.spec.memory, self.core.flow_table)
            on_active = (well and inst.spec.kind == "balancer" and roles[name] == "active"
                         and self._resizing is None)
            for d in scaler.decide(sizes, now, flows=on_active):
                self._carry_out(name, inst, d)
        self._resize_step(roles)

    def _carry_out(self, name: str, inst: Instance, d: scaling.Decision) -> None:
        self.decisions["scaling"] = {"time": time.time(), **d.as_event(name)}
        self.events.log("scale", **d.as_event(name))
        if d.resource == "cpu":
            self.runtime.resize(inst, float(d.new), inst.spec.memory)
        elif d.resource == "memory":
            self.runtime.resize(inst, inst.spec.cpu, int(d.new))
        elif d.resource == "flow_table":
            self._start_resize(int(d.new))

    # A flow table cannot grow in place (a BPF map's size is fixed): the pair is resized
    # by replacing one instance at a time with one of the new size. The standby goes
    # first; once it is back and in sync, the active is replaced: the resized standby
    # takes over (the failover every test already shows hitless) and the old active
    # returns as a standby of the new size.

    def _start_resize(self, size: int) -> None:
        old = self.core.flow_table
        self.core.flow_table = size
        # A bigger table counts against the memory limit (memcg): raise it. Not only the
        # map (~150 B an entry): the daemon's passes over the whole table (idle sweep, full
        # sync dumps) peak at ~1.2 KiB an entry. Measured (cgroup v1, 30k new flows/s):
        # ~190 MiB at 65536 entries, peaks of 460 MiB at 262144; the old estimate here
        # (128 MiB + 400 B an entry: 228 MiB) left 256 MiB instances OOM-killed in a loop.
        base = parse_core(self.project)          # the configured memory for the configured table
        need = base.memory + max(0, size - base.flow_table) * FLOW_ENTRY_BYTES
        if need > self.core.memory:
            self.core.memory = min(max(self.bounds.memory[1], self.core.memory), need)
        if self.spare is not None:          # compiled for the old size
            self.runtime.destroy(self.spare)
            self.spare = None
        self._resizing = {"from": old, "to": size, "step": "standby", "since": time.time()}

    def _resize_step(self, roles: dict) -> None:
        r = self._resizing
        if r is None:
            return
        def sized(name):
            return self.instances[name].spec.config.get("datapath", {}).get("flow_table") == r["to"]
        ready = [n for n in self.instances if n in self.answered and not self.health[n].problems]
        if len(ready) < len(self.instances) or len(roles) < len(self.instances):
            return                           # wait until the pair is whole again
        if time.time() - r.get("step_at", 0) < 3.0:
            return                           # let the new standby take the full flow dump
        pending = [n for n in self.instances if not sized(n)]
        if not pending:
            self.events.log("scale", resource="flow_table", action="resized", old=r["from"],
                            new=r["to"], seconds=round(time.time() - r["since"], 1))
            self._resizing = None
            return
        standby = [n for n in pending if roles.get(n) == "standby"]
        name = (standby or pending)[0]
        r["step_at"] = time.time()
        spec = replace(self.spec_of(name), memory=max(self.core.memory, self.instances[name].spec.memory),
                       cpu=self.instances[name].spec.cpu)
        self.replace(name, [f"flow table {r['from']} -> {r['to']}"], spec=spec, planned=True)
