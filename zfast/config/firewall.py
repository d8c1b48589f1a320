"""``public_ports`` with their firewalls, and ``firewall``, the project-wide deny list.

A public port is a port of a public address of the project, forwarded to a service's
backends at ``target_port``; its firewall's CIDRs are of that address's family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from zfast.config import kinds
from zfast.config.datapath import Datapath
from zfast.config.kinds import IPAddress, IPNetwork
from zfast.config.problems import Problems, host_port
from zfast.config.routing import ROUTING_PORTS
from zfast.config.schema import From, ListOf, Reader, Section, setting
from zfast.config.services import PROTOCOLS, Service

_RATE = kinds.Integer(1, 10_000_000)


@dataclass(frozen=True)
class RateLimit:
    new_per_s: int = setting(_RATE, doc="sustained new connections per second from one source")
    burst: int = setting(_RATE, default=From("new_per_s"), shown_default="new_per_s",
                         doc="how many it may open at once")


def read_rate_limit(problems: Problems, path: str, value: Any) -> RateLimit | None:
    values = Reader(problems, path, value, RateLimit).read_all()
    return None if None in values.values() else RateLimit(**values)


def read_firewall(problems: Problems, path: str, value: Any,
                  address: IPAddress | None) -> Firewall:
    section = Reader(problems, path, value, Firewall)
    policy = section.read("policy")
    allow = tuple(_networks(section, "allow", address))
    deny = tuple(_networks(section, "deny", address))
    return Firewall(policy=policy, allow=allow, deny=deny, limit=section.read("limit"))


def _networks(section: Reader, name: str, address: IPAddress | None) -> Iterator[IPNetwork]:
    """A list's CIDRs; of the port address's family when it has one."""
    for path, item, network in section.each(name):
        if network is None:
            continue
        if address is not None and network.version != address.version:
            section.problems.add(path, item, f"is IPv{network.version} but the port's address "
                                             f"{address} is IPv{address.version}")
            continue
        yield network


@dataclass(frozen=True)
class Firewall:
    policy: str = setting(kinds.Choice(("allow", "deny")), default="allow",
                          doc="when no rule matches")
    allow: tuple[IPNetwork, ...] = setting(ListOf(kinds.Cidr()), default=())
    deny: tuple[IPNetwork, ...] = setting(ListOf(kinds.Cidr()), default=())
    limit: RateLimit | None = setting(Section(RateLimit, read=read_rate_limit), default=None)


def read_public_port(problems: Problems, path: str, value: Any) -> PublicPort:
    item = Reader(problems, path, value, PublicPort)
    port = item.read("port")
    proto = item.read("proto")
    if port in ROUTING_PORTS:
        problems.add(f"{path}.port", port, "belongs to the routing service (HTTP/HTTPS): "
                                           "use routing.domains for it")
        port = None
    address = item.read("address")
    firewall = item.read("firewall", address=address)
    return PublicPort(port=port, proto=proto, address=address, service=item.read("service"),
                      target_port=item.read("target_port", default=port), firewall=firewall)


@dataclass(frozen=True)
class PublicPort:
    port: int = setting(kinds.Port(), doc="any but 80 and 443 (the routing service's)")
    proto: str = setting(kinds.Choice(PROTOCOLS))
    address: IPAddress = setting(kinds.Address("public"), doc="a public address of the project")
    service: str = setting(kinds.Name())
    target_port: int = setting(kinds.Port(), default=From("port"), shown_default="port")
    firewall: Firewall = setting(Section(Firewall, read=read_firewall), default=Firewall())


@dataclass(frozen=True)
class ProjectFirewall:
    """``firewall:``, read into ``Project.project_deny``: checked before every port."""
    deny: tuple[IPNetwork, ...] = setting(ListOf(kinds.Cidr()), default=())


def read_project_deny(problems: Problems, path: str, value: Any) -> tuple[IPNetwork, ...]:
    section = Reader(problems, path, value, ProjectFirewall)
    return tuple(network for _, _, network in section.each("deny") if network is not None)


def check_public_ports(problems: Problems, ports: tuple[PublicPort, ...],
                       services: tuple[Service, ...], datapath: Datapath,
                       project_deny: tuple[IPNetwork, ...]) -> None:
    by_name = {s.name: s for s in services if s.name is not None}
    listeners = {(s.vip, p.port, p.proto): f"services.{s.name}"
                 for s in services for p in s.ports if s.vip is not None}
    first: dict[tuple, str] = {}
    for i, pp in enumerate(ports):
        path = f"public_ports[{i}]"
        if pp.service is not None:
            service = by_name.get(pp.service)
            if service is None:
                problems.add(f"{path}.service", pp.service,
                             "is not a service of this project (known: "
                             f"{', '.join(sorted(by_name)) or 'none'})")
            elif (pp.address is not None and service.vip is not None
                  and service.vip.version != pp.address.version):
                problems.add(f"{path}.address", str(pp.address),
                             f"is IPv{pp.address.version} but service {pp.service}'s backends "
                             f"are IPv{service.vip.version}")
        if None in (pp.address, pp.port, pp.proto):
            continue
        listener = (pp.address, pp.port, pp.proto)
        shown = host_port(*listener)
        if listener in first:
            problems.add(path, shown, f"is already {first[listener]}")
        elif listener in listeners:
            problems.add(path, shown, f"is already a port of {listeners[listener]}")
        first.setdefault(listener, path)
    if len(ports) >= datapath.max_public_ports:
        problems.say("public_ports", f"{len(ports)} public ports are more than "
                                     f"datapath.max_public_ports - 1 ({datapath.max_public_ports - 1})")
    rules = len(project_deny) + sum(len(p.firewall.allow) + len(p.firewall.deny) for p in ports)
    if rules > datapath.max_rules:
        problems.say("public_ports", f"{rules} firewall rules are more than "
                                     f"datapath.max_rules ({datapath.max_rules})")
