"""The core service's plan: its instances' specs, derived from the project file.

Two balancers (an active/standby pair) and ``core.routers.count`` routers when the file
has a routing section. Addresses follow the spec: an instance takes the next free
addresses counting down from the top of each subnet (below the private gateway); the
VIPs (services' vip, public ports' address, the routing addresses, the private gateway)
belong to the pair and move to its active instance.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, replace
from pathlib import Path

from zfast import config
from zfast.core.runtime import Instance, InstanceSpec, Link

BALANCERS = ("lb-a", "lb-b")


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


class Plan:
    """Specs from the project (``project`` changes with an apply) and the core's sizes
    (``core`` changes with a flow-table resize). ``drained``: routers at weight 0."""

    def __init__(self, project: config.Project, core: CoreSpec, state_dir: Path):
        self.project = project
        self.core = core
        self.state_dir = Path(state_dir)
        self.key_file = self.state_dir / "ha.key"
        self._spare_seq = 0

    def vips(self) -> list:
        out = [s.vip for s in self.project.services] + [p.address for p in self.project.public_ports]
        if self.project.routing is not None:
            out += list(self.project.routing.addresses)
        out.append(self.core.gateway)
        return list(dict.fromkeys(out))

    def router_names(self) -> list[str]:
        return [f"rt-{chr(ord('a') + i)}" for i in range(self.core.routers)]

    def shared_raw(self, drained: set[str]) -> dict:
        """The project file every instance shares (what the store's revisions hold): the
        operator's, without core/node/ha, with the routers behind the routing addresses
        (drained ones at weight 0)."""
        raw = {k: copy.deepcopy(v) for k, v in self.project.raw.items() if k not in ("core", "node", "ha")}
        raw["store"] = {"kind": "sqlite", "path": str(self.state_dir / "store.sqlite")}
        dp = dict(raw.get("datapath") or {})
        dp["flow_table"] = self.core.flow_table
        raw["datapath"] = dp
        acme = (raw.get("routing") or {}).get("acme")
        if isinstance(acme, dict) and "ca_bundle" in acme:
            # the ACME client is the core's (routing/renewal.py): no instance reads the CA
            # bundle, and a container (on another member) has no such path
            raw["routing"] = dict(raw["routing"], acme={k: v for k, v in acme.items()
                                                        if k != "ca_bundle"})
        if self.core.routers:
            priv = self._private_addresses()
            raw["routing"] = dict(raw["routing"])
            raw["routing"]["routers"] = [
                {"address": str(priv[2 + i]), "weight": 0 if name in drained else 1}
                for i, name in enumerate(self.router_names())]
        return raw

    def _private_addresses(self) -> list:
        c = self.core
        return _top_down(c.private_subnet, {c.gateway, *self.vips()}, 2 + c.routers)

    def specs(self, drained: set[str]) -> list[InstanceSpec]:
        c = self.core
        pub4 = _top_down(c.public_subnet, set(self.vips()), 2)
        priv4 = self._private_addresses()
        pub6 = _top_down(c.public_subnet6, set(self.vips()), 2) if c.public_subnet6 else [None, None]
        specs = []
        for i, name in enumerate(BALANCERS):
            j = 1 - i
            raw = self.shared_raw(drained)
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
            raw = self.shared_raw(drained)
            raw["router"] = {"name": f"{self.project.project}-{name}", "state_dir": str(state_dir),
                             "binds": ["0.0.0.0"], "http_port": 80, "https_port": 443}
            specs.append(InstanceSpec(
                name=name, kind="router", cpu=c.router_cpu, memory=c.router_memory,
                state_dir=state_dir, routes=[("default", str(c.gateway))],
                links=[Link(c.private_bridge, "priv0",
                            [f"{priv4[2 + i]}/{c.private_subnet.prefixlen}"])],
                config=raw))
        return specs

    def spec_of(self, name: str, drained: set[str]) -> InstanceSpec:
        return next(s for s in self.specs(drained) if s.name == name)

    def successor_spec(self, inst: Instance, drained: set[str], planned: bool) -> InstanceSpec:
        """A successor: a balancer (or a resized instance) gets today's spec (a flow-table
        resize may be under way) with this one's CPU and memory, never less memory than
        the plan's; a router replaced for a fault keeps its spec."""
        if inst.spec.kind != "balancer" and not planned:
            return inst.spec
        return replace(self.spec_of(inst.spec.name, drained), cpu=inst.spec.cpu,
                       memory=max(inst.spec.memory, self.core.memory))

    def spare_spec(self, drained: set[str]) -> InstanceSpec:
        """A spare: lb-a's links without addresses, its file under its own node name."""
        self._spare_seq += 1
        name = f"spare{self._spare_seq}"
        base = self.specs(drained)[0]
        raw = copy.deepcopy(base.config)
        raw["node"]["name"] = f"{self.project.project}-{name}"
        raw["node"]["state_dir"] = str(self.state_dir / name)
        return InstanceSpec(name=name, kind="spare", cpu=base.cpu, memory=base.memory,
                            state_dir=self.state_dir / name,
                            links=[Link(link.bridge, link.ifname, []) for link in base.links], config=raw)
