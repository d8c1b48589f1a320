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
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from zfast import config
from zfast.api import ApiError, Client, Server
from zfast.core.cgroups import parse_size
from zfast.core.runtime import Instance, InstanceSpec, Link, NetnsRuntime, Runtime
from zfast.controllers.logger import LoggerController

log = logging.getLogger("zfast.core")

CHECK_EVERY_S = 0.5
BACKOFF_MAX_S = 60.0


class CoreError(Exception):
    pass


@dataclass
class CoreSpec:
    public_bridge: str
    public_subnet: ipaddress.IPv4Network
    public_subnet6: ipaddress.IPv6Network | None
    private_bridge: str
    private_subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    cpu: float = 0.5
    memory: int = 256 << 20
    flow_table: int = 65536
    scale: dict = field(default_factory=dict)


def parse_core(project: config.Project) -> CoreSpec:
    raw = project.raw.get("core")
    if not isinstance(raw, dict):
        raise CoreError("the project file has no core section (core: {public, private, balancer})")
    problems = []
    try:
        pub, priv = raw["public"], raw["private"]
        bal = raw.get("balancer", {})
        spec = CoreSpec(
            public_bridge=pub.get("bridge", "zpub0"),
            public_subnet=ipaddress.IPv4Network(pub["subnet"]),
            public_subnet6=ipaddress.IPv6Network(pub["subnet6"]) if pub.get("subnet6") else None,
            private_bridge=priv.get("bridge", "zpriv0"),
            private_subnet=ipaddress.IPv4Network(priv["subnet"]),
            gateway=ipaddress.IPv4Address(priv.get("gateway")
                                          or ipaddress.IPv4Network(priv["subnet"])[-2]),
            cpu=float(bal.get("cpu", 0.5)), memory=parse_size(bal.get("memory", "256Mi")),
            flow_table=int(bal.get("flow_table", 65536)), scale=bal.get("scale", {}) or {})
    except (KeyError, TypeError, ValueError) as err:
        problems.append(f"core: {err}")
        spec = None
    if spec and spec.gateway not in spec.private_subnet:
        problems.append(f"core.private.gateway: {spec.gateway} is not in {spec.private_subnet}")
    if problems:
        raise CoreError("; ".join(problems))
    return spec


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


class CoreService:
    def __init__(self, project: config.Project, state_dir: Path, runtime: Runtime | None = None):
        self.project = project
        self.core = parse_core(project)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = runtime or NetnsRuntime(prefix=f"zfc-{project.project}"[:20])
        self.events = LoggerController(self.state_dir, f"{project.project}-core")
        self.instances: dict[str, Instance] = {}
        self.health: dict[str, Health] = {}
        self.next_try: dict[str, float] = {}
        self.answered: set[str] = set()   # instances whose daemon has answered since (re)start
        self.decisions = {"repair": None, "scaling": None}
        self._stop = threading.Event()
        self.api: Server | None = None
        self.key_file = self.state_dir / "ha.key"

    # ---- plan ---------------------------------------------------------------------

    def vips(self) -> list:
        out = [s.vip for s in self.project.services] + [p.address for p in self.project.public_ports]
        out.append(self.core.gateway)
        return list(dict.fromkeys(out))

    def specs(self) -> list[InstanceSpec]:
        c = self.core
        pub4 = _top_down(c.public_subnet, set(self.vips()), 2)
        priv4 = _top_down(c.private_subnet, {c.gateway, *self.vips()}, 2)
        pub6 = _top_down(c.public_subnet6, set(self.vips()), 2) if c.public_subnet6 else [None, None]
        names = [f"lb-a", f"lb-b"]
        specs = []
        for i, name in enumerate(names):
            j = 1 - i
            raw = {k: copy.deepcopy(v) for k, v in self.project.raw.items() if k not in ("core", "node", "ha")}
            state_dir = self.state_dir / name
            raw["node"] = {"name": f"{self.project.project}-{name}", "state_dir": str(state_dir),
                           "mode": "native",
                           "interfaces": [{"name": "pub0", "role": "public"},
                                          {"name": "priv0", "role": "private"}]}
            raw["ha"] = {"peer": str(priv4[j]), "bind": str(priv4[i]), "priority": 200 - 100 * i,
                         "key_file": str(self.key_file), "heartbeat_ms": 50,
                         "vips": [str(v) for v in self.vips()],
                         "links": [{"bind": str(pub4[i]), "peer": str(pub4[j])}]}
            raw["store"] = {"kind": "sqlite", "path": str(self.state_dir / "store.sqlite")}
            dp = dict(raw.get("datapath") or {})
            dp["flow_table"] = c.flow_table
            raw["datapath"] = dp
            pub_addrs = [f"{pub4[i]}/{c.public_subnet.prefixlen}"]
            if pub6[i] is not None:
                pub_addrs.append(f"{pub6[i]}/{c.public_subnet6.prefixlen}")
            specs.append(InstanceSpec(
                name=name, kind="balancer", cpu=c.cpu, memory=c.memory, state_dir=state_dir,
                links=[Link(c.public_bridge, "pub0", pub_addrs),
                       Link(c.private_bridge, "priv0", [f"{priv4[i]}/{c.private_subnet.prefixlen}"])],
                config=raw))
        return specs

    # ---- life cycle ---------------------------------------------------------------

    def ensure_bridges(self) -> list[str]:
        import subprocess
        made = []
        for br in (self.core.public_bridge, self.core.private_bridge):
            if subprocess.run(["ip", "link", "show", br], capture_output=True).returncode != 0:
                subprocess.run(["ip", "link", "add", br, "type", "bridge"], check=True)
                made.append(br)
            subprocess.run(["ip", "link", "set", br, "up"], check=True)
        return made

    def up(self) -> None:
        from zfast.ha.heartbeat import write_key
        if not self.key_file.exists():
            write_key(self.key_file)
        for br in self.ensure_bridges():
            self.events.log("repair", action="bridge created", bridge=br)
        for spec in self.specs():
            self._launch(spec)
        self.api = Server(self.state_dir, {("GET", "/status"): lambda _: (200, self.status())})
        self.api.start()

    def _launch(self, spec: InstanceSpec, restarts: int = 0) -> Instance:
        inst = self.runtime.create(spec)
        inst.restarts = restarts
        self.runtime.start(inst)
        self.instances[spec.name] = inst
        self.answered.discard(spec.name)
        self.health[spec.name] = Health(since=time.time())
        self.events.log("repair", instance=spec.name, action="started", pid=inst.pid,
                        restarts=restarts)
        return inst

    def run(self) -> None:
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        while not self._stop.wait(CHECK_EVERY_S):
            self.repair_tick()
        self.down()

    def down(self) -> None:
        if self.api:
            self.api.stop()
            self.api = None
        for inst in list(self.instances.values()):
            self.runtime.stop(inst)
            self.runtime.destroy(inst)
        self.instances.clear()

    # ---- repair controller --------------------------------------------------------

    def problems_of(self, inst: Instance) -> list[str]:
        """What is wrong with an instance now (empty: healthy)."""
        if inst.proc is None or inst.proc.poll() is not None:
            code = inst.proc.returncode if inst.proc else None
            return [f"daemon exited ({code})"]
        try:
            st = Client(inst.spec.state_dir, timeout=1.0).get("/status")
            self.answered.add(inst.spec.name)
        except ApiError as err:
            if inst.spec.name not in self.answered and time.time() - inst.started < 60:
                return []  # still starting (compiling the program takes seconds)
            return [f"daemon does not answer: {err}"]
        problems = []
        if len(st.get("interfaces", [])) < len(inst.spec.links):
            problems.append("programs detached")
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
            h = self.health[name]
            if not problems:
                h.problems, h.since = [], now
                continue
            if not h.problems:
                h.since = now
            h.problems = problems
            exited = inst.proc is None or inst.proc.poll() is not None
            # A gone daemon is replaced at once; other problems must last a second.
            if not exited and now - h.since < 1.0:
                continue
            if now < self.next_try.get(name, 0):
                continue
            restarts = inst.restarts + 1
            backoff = min(BACKOFF_MAX_S, 2 ** min(restarts - 1, 10)) if now - inst.started < 30 else 0
            self.decisions["repair"] = {"time": now, "instance": name, "problems": problems,
                                        "action": "replace", "restarts": restarts,
                                        "next_retry_in_s": backoff}
            self.events.log("repair", instance=name, action="replace", problems=problems,
                            restarts=restarts, backoff_s=backoff)
            self.runtime.destroy(inst)
            self.next_try[name] = now + backoff
            try:
                self._launch(inst.spec, restarts)
            except Exception as err:
                self.events.log("error", instance=name, error=f"cannot recreate: {err}")

    # ---- status ---------------------------------------------------------------------

    def status(self) -> dict:
        out = []
        for name, inst in self.instances.items():
            role = None
            try:
                role = Client(inst.spec.state_dir, timeout=0.5).get("/status").get("role")
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
            })
        return {"project": self.project.project, "instances": out,
                "controllers": {"repair": self.decisions["repair"] or {},
                                "scaling": self.decisions["scaling"] or {}}}
