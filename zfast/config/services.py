"""``services``: the balanced services, their ports, backends and health checks.

A service is named by its ``name`` in problem paths (``services.app.ports[0].port``), or by
its index (``services[1].name``) when the name is missing, invalid or used twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from zfast.config import kinds
from zfast.config.datapath import Datapath
from zfast.config.kinds import IPAddress
from zfast.config.problems import Problems, host_port
from zfast.config.schema import From, ListOf, Reader, Section, setting

PROTOCOLS = ("tcp", "udp")
HEALTH_KINDS = ("tcp", "http")


@dataclass(frozen=True)
class PortMap:
    port: int = setting(kinds.Port())
    proto: str = setting(kinds.Choice(PROTOCOLS))  # tcp | udp
    target_port: int = setting(kinds.Port(), default=From("port"), shown_default="port")


@dataclass(frozen=True)
class Backend:
    address: IPAddress = setting(kinds.Address("backend"))
    weight: int = setting(kinds.Integer(0, 65535), default=1,
                          doc="0 drains the backend: it keeps its flows, gets no new ones")


_URL_PATH = kinds.Refined(kinds.Text(), lambda path: path.startswith("/"),
                          "does not start with '/'", "starts with '/'")


@dataclass(frozen=True)
class Health:
    kind: str = setting(kinds.Choice(HEALTH_KINDS))  # tcp | http
    interval_ms: int = setting(kinds.Integer(10, 3_600_000), default=500)
    fall: int = setting(kinds.Integer(1, 1000), default=3,
                        doc="failed checks in a row before a backend is down")
    rise: int = setting(kinds.Integer(1, 1000), default=2,
                        doc="good checks in a row before it is up again")
    path: str | None = setting(_URL_PATH, default=None, shown_default="`/` (http only)",
                               doc="http only")


def read_health(problems: Problems, path: str, value: Any) -> Health:
    health = Reader(problems, path, value, Health)
    kind = health.read("kind")
    url_path = None
    if kind == "http":
        url_path = health.read("path", default="/")
    elif kind is not None and health.present("path"):
        problems.add(f"{path}.path", health.raw("path"), "is only for http checks")
    return Health(kind=kind, interval_ms=health.read("interval_ms"), fall=health.read("fall"),
                  rise=health.read("rise"), path=url_path)


@dataclass(frozen=True)
class Service:
    name: str = setting(kinds.Name(), doc="unique")
    vip: IPAddress = setting(kinds.Address("VIP"))
    ports: tuple[PortMap, ...] = setting(ListOf(Section(PortMap), empty="has no ports"))
    backends: tuple[Backend, ...] = setting(ListOf(Section(Backend)), default=())
    health: Health | None = setting(Section(Health, read=read_health), default=None)


def read_service(problems: Problems, path: str, value: Any, datapath: Datapath) -> Service:
    service = Reader(problems, path, value, Service)
    name = service.read("name")
    vip = service.read("vip")
    ports = service.read("ports")
    backends = service.read("backends")
    if service.ok and service.data.get("backends", []) == []:
        problems.say(f"{path}.backends", "has no backends")
    check_backends(problems, path, vip, backends, datapath)
    return Service(name=name, vip=vip, ports=ports, backends=backends,
                   health=service.read("health"))


def service_paths(items: list) -> list[str]:
    """How problems name each service: by name when it is valid and unique, else by index."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    uses = Counter(name for name in names if isinstance(name, str))
    return [f"services.{name}" if kinds.is_name(name) and uses[name] == 1 else f"services[{i}]"
            for i, name in enumerate(names)]


def check_backends(problems: Problems, path: str, vip: IPAddress | None,
                   backends: tuple[Backend, ...], datapath: Datapath) -> None:
    first_index: dict[IPAddress, int] = {}
    for i, backend in enumerate(backends):
        address = backend.address
        if address is None:
            continue
        if vip is not None and address.version != vip.version:
            problems.add(f"{path}.backends[{i}].address", str(address),
                         f"is IPv{address.version} but the VIP {vip} is IPv{vip.version}")
        if address in first_index:
            problems.add(f"{path}.backends[{i}].address", str(address),
                         f"is already {path}.backends[{first_index[address]}]")
        first_index.setdefault(address, i)
    if len(backends) > datapath.maglev_size:
        problems.say(f"{path}.backends", f"{len(backends)} backends do not fit a Maglev table"
                                          f" of {datapath.maglev_size} slots")


def check_services_together(problems: Problems, services: tuple[Service, ...],
                            paths: list[str], datapath: Datapath) -> None:
    first_named: dict[str, str] = {}
    first_listener: dict[tuple, str] = {}
    for service, path in zip(services, paths):
        if service.name is not None:
            if service.name in first_named:
                problems.add(f"{path}.name", service.name,
                             f"is already the name of {first_named[service.name]}")
            first_named.setdefault(service.name, path)
        for i, port_map in enumerate(service.ports):
            if service.vip is None or port_map.port is None or port_map.proto is None:
                continue
            listener = (service.vip, port_map.port, port_map.proto)
            if listener in first_listener:
                problems.add(f"{path}.ports[{i}]", host_port(*listener),
                             f"is already served by {first_listener[listener]}")
            first_listener.setdefault(listener, f"{path}.ports[{i}]")

    if len(services) > datapath.max_services:
        problems.say("services", f"{len(services)} services are more than"
                                 f" datapath.max_services ({datapath.max_services})")
    backend_count = sum(len(service.backends) for service in services)
    if backend_count > datapath.max_backends:
        problems.say("services", f"{backend_count} backends in all are more than"
                                 f" datapath.max_backends ({datapath.max_backends})")
