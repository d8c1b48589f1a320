"""The project file: YAML in, frozen dataclasses out, or one ConfigError listing every problem.

Every key and type is checked; a file is accepted whole or rejected whole. Each problem reads
``<field path>: <value> <why>``, e.g. ``services.app.ports[0].port: 70000 is not a port
(1-65535)``. A service is named by its ``name`` in paths, or by its index when the name is
missing, invalid or used twice.

Sections parsed here: ``project``, ``node``, ``services``, ``datapath``, ``public_ports``,
``firewall``, ``ha`` and ``routing``; ``telemetry``'s values are checked (zfast.telemetry) but
read from ``Project.raw``. The sections ``store`` and ``core`` are only checked for their shape
(a mapping) and kept, like the whole file (``routing`` too), in ``Project.raw``.

The routing service (``routing``; parsed into ``Routing``, ``Domain`` and ``Acme``)::

    routing:
      addresses: [203.0.113.10, "2001:db8::10"]  # required, at least one, no duplicates; TCP
                                 # ports 80 and 443 there are the routing service's: no service
                                 # (nor public port, which never takes 80/443) may listen there
      acme:                      # optional; required when a domain has tls: acme
        directory: https://acme.example/dir   # an http:// or https:// URL with a host
        email: ops@example.org   # optional; local@host.name
        ca_bundle: /etc/zfast/acme-ca.pem     # optional; the file must exist and be readable
                                 # where the file is checked (best absolute: a relative path is
                                 # from the working directory of the process that reads it)
      domains:                   # optional, default none
        - host: app.example.org  # a DNS name, or "*." + a DNS name (a wildcard)
          service: app           # a service of this file
          port: 80               # one of its tcp ports (``ports[].port``); see below
          tls: acme              # acme | self-signed (the default) | none
          redirect_https: true   # default false; not with tls: none

``host``: RFC 1123 labels (1-63 characters of a-z, 0-9 and '-', neither first nor last a '-'),
at least two labels, at most 253 characters; case does not matter (``Domain.host`` is
lowercased) and ONE trailing dot is dropped (``app.example.org.`` is ``app.example.org``). A
wildcard is ``*.`` before such a name: only the whole leftmost label, and only one
(``a*.x.org``, ``*.*.x.org`` and ``x.*.org`` are refused), and never with ``tls: acme`` (HTTP-01
cannot validate a wildcard). No IP addresses, no ``:port``, no non-ASCII names (give the
``xn--`` form). Each host once, compared after lowercasing and dropping the dot.

``port``: the service's port map whose ``port`` it is; the router sends to the backends at that
map's ``target_port``. A number that is no map's ``port`` but a tcp map's ``target_port`` (the
backends' port, as in the spec's example: ``port: 8080`` for ``{port: 80, target_port: 8080}``)
names that map too, and ``Domain.port`` is then that map's ``port``: ``Domain.port`` is always
one of the service's tcp ``ports[].port``, and ``domain_target()`` gives the service and map.

Extension of the spec, the data plane's sizes (all optional)::

    datapath:
      maglev_size: 65537   # slots of each service's Maglev table; must be prime
      flow_table: 65536    # LRU flow entries (two per connection), >= 1024
      max_services: 64     # services the data plane can hold
      max_backends: 4096   # backends over all services
      max_ifindex: 4096    # devmap slots, indexed by ifindex
      flow_idle_s: 300     # idle flows leave the table after this (0: never); not a size
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import socket
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from zfast.reconcile.maglev import is_prime, next_prime

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

PROTOCOLS = ("tcp", "udp")
XDP_MODES = ("native", "generic", "tc", "auto")   # tc: not XDP, the tc ingress hook
INTERFACE_ROLES = ("public", "private")
HEALTH_KINDS = ("tcp", "http")

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN + r"\Z")
_IFNAMSIZ = 16  # Linux: names are at most 15 bytes plus the NUL
_BPF_MAP_LIMIT = 2**31 - 1  # keep sizes well inside max_entries (a u32)

# Sections that later work parses; here only their shape is checked.
_KEPT_SECTIONS = {"store": dict, "telemetry": dict, "core": dict}
_TOP_LEVEL = {"project", "node", "services", "datapath", "public_ports", "firewall", "ha",
              "routing", *_KEPT_SECTIONS}
ROUTING_PORTS = (80, 443)  # the routing service's (HTTP/HTTPS); not public_ports'
TLS_KINDS = ("acme", "self-signed", "none")

# Every mapping the validator reads and the fields it knows, by section path ("[]": each
# item of a list). The validator takes its field sets from here, and docs/configuration.md's
# reference is generated from here (`python -m zfast.config --reference`); a test keeps the
# two equal, so a field cannot exist in one and not the other.
FIELDS: dict[str, tuple[str, ...]] = {
    "": tuple(sorted(_TOP_LEVEL)),
    "node": ("name", "state_dir", "interfaces", "mode"),
    "node.interfaces[]": ("name", "role", "mode"),
    "datapath": ("maglev_size", "flow_table", "max_services", "max_backends", "max_ifindex",
                 "max_public_ports", "max_rules", "flow_idle_s"),
    "services[]": ("name", "vip", "ports", "backends", "health"),
    "services[].ports[]": ("port", "proto", "target_port"),
    "services[].backends[]": ("address", "weight"),
    "services[].health": ("kind", "interval_ms", "fall", "rise", "path"),
    "public_ports[]": ("port", "proto", "address", "service", "target_port", "firewall"),
    "public_ports[].firewall": ("policy", "allow", "deny", "limit"),
    "public_ports[].firewall.limit": ("new_per_s", "burst"),
    "firewall": ("deny",),
    "ha": ("peer", "bind", "priority", "key_file", "heartbeat_ms", "vips", "port", "sync_port",
           "links", "preempt", "dead_intervals"),
    "ha.links[]": ("bind", "peer"),
    "routing": ("addresses", "acme", "domains", "routers"),
    "routing.routers[]": ("address", "weight"),
    "routing.acme": ("directory", "email", "ca_bundle"),
    "routing.domains[]": ("host", "service", "port", "tls", "redirect_https"),
    "telemetry": ("prometheus", "syslog"),
}


def _known(section: str) -> set[str]:
    return set(FIELDS[section])


def reference() -> str:
    """The configuration reference (Markdown), from FIELDS."""
    lines = ["| section | fields |", "| --- | --- |"]
    for section, fields in FIELDS.items():
        lines.append(f"| `{section or '(top level)'}` | {', '.join(f'`{f}`' for f in fields)} |")
    return "\n".join(lines) + "\n"



class ConfigError(Exception):
    """A project file that cannot be used; ``problems`` lists every reason, one per field."""

    def __init__(self, problems: list[str], source: str = "<file>"):
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class Interface:
    name: str
    role: str  # public | private
    mode: str | None = None  # overrides Node.mode for this interface


@dataclass(frozen=True)
class Node:
    name: str
    state_dir: str
    interfaces: tuple[Interface, ...]
    mode: str = "auto"  # native | generic | auto


@dataclass(frozen=True)
class PortMap:
    port: int
    proto: str  # tcp | udp
    target_port: int


@dataclass(frozen=True)
class Backend:
    address: IPAddress
    weight: int = 1  # 0 drains the backend: it keeps its flows, gets no new ones


@dataclass(frozen=True)
class Health:
    kind: str  # tcp | http
    interval_ms: int = 500
    fall: int = 3  # failed checks in a row before a backend is down
    rise: int = 2  # good checks in a row before it is up again
    path: str | None = None  # http only; "/" by default


@dataclass(frozen=True)
class Service:
    name: str
    vip: IPAddress
    ports: tuple[PortMap, ...]
    backends: tuple[Backend, ...]
    health: Health | None = None


@dataclass(frozen=True)
class Datapath:
    maglev_size: int = 65537
    flow_table: int = 65536
    max_services: int = 64
    max_backends: int = 4096
    max_ifindex: int = 4096
    max_public_ports: int = 256   # slot 0 is the project-wide deny list
    max_rules: int = 131072       # CIDR rules, all ports together
    # Not a size: a flow with no client packet for this long leaves the table (swept every
    # flow_idle_s / 2; 0: never). Established flows come back by Maglev's hash if they wake.
    flow_idle_s: int = 300


SIZE_FIELDS = ("maglev_size", "flow_table", "max_services", "max_backends", "max_ifindex",
               "max_public_ports", "max_rules")   # what the compiled program and its maps depend on


IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class RateLimit:
    new_per_s: int   # sustained new connections per second from one source
    burst: int       # how many it may open at once


@dataclass(frozen=True)
class Firewall:
    policy: str = "allow"                      # when no rule matches: allow | deny
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    limit: RateLimit | None = None


@dataclass(frozen=True)
class PublicPort:
    port: int
    proto: str
    address: IPAddress       # a public address of the project
    service: str
    target_port: int
    firewall: Firewall = Firewall()


@dataclass(frozen=True)
class HA:
    """The active/standby pair (zfast/ha). Extensions of the spec: port, sync_port,
    links, preempt."""
    peer: IPAddress               # the partner's heartbeat/sync address
    bind: IPAddress               # this node's address on the sync link
    key_file: str                 # shared secret of the pair (HMAC of heartbeats and sync)
    priority: int = 100           # higher wins when both start
    heartbeat_ms: int = 50
    vips: tuple[IPAddress, ...] = ()   # addresses that move to the active node
    port: int = 5405              # heartbeats (UDP)
    sync_port: int = 5406         # flow replication (TCP)
    links: tuple[tuple[IPAddress, IPAddress], ...] = ()  # more (bind, peer) heartbeat paths
    preempt: bool = False         # a returning higher-priority node takes over (default: no)
    dead_intervals: int = 3       # heartbeats missed before the peer counts as dead


@dataclass(frozen=True)
class Acme:
    """The ACME server the routing service gets certificates from (HTTP-01)."""
    directory: str                 # the directory URL, http:// or https://
    email: str | None = None       # the account's contact
    ca_bundle: str | None = None   # a path: trust for a private ACME server's own TLS


@dataclass(frozen=True)
class Domain:
    """One host the routing service serves, and where its requests go."""
    host: str                      # lowercased, no trailing dot; exact or "*." + name
    service: str                   # a service of the project
    port: int                      # one of that service's tcp ports (its ports[].port)
    tls: str = "self-signed"       # acme | self-signed | none
    redirect_https: bool = False   # answer plain HTTP with a redirect to HTTPS

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")


@dataclass(frozen=True)
class Routing:
    """The L7 routing service (HTTP on 80, HTTPS on 443 of each address)."""
    addresses: tuple[IPAddress, ...]
    domains: tuple[Domain, ...] = ()
    acme: Acme | None = None
    # Extension of the spec: the HTTP balancers (HAProxy) behind the addresses. `zfast core
    # up` writes it; a node given it balances 80/443 of each address over them (below).
    routers: tuple[Backend, ...] = ()


ROUTING_SERVICE = "routing-"   # services `routing-<i>` are made from routing.routers: reserved


def routing_services(routing: Routing) -> tuple[Service, ...]:
    """The balancer's services for the routing service: ports 80 and 443 (TCP) of each
    routing address over the routers of its family, checked like a backend (tcp)."""
    out = []
    for i, address in enumerate(routing.addresses):
        routers = tuple(r for r in routing.routers if r.address.version == address.version)
        if routers:
            out.append(Service(name=f"{ROUTING_SERVICE}{i}", vip=address,
                               ports=tuple(PortMap(p, "tcp", p) for p in ROUTING_PORTS),
                               backends=routers,
                               health=Health(kind="tcp", interval_ms=200, fall=2, rise=2)))
    return tuple(out)


@dataclass(frozen=True)
class Project:
    project: str
    node: Node | None
    services: tuple[Service, ...]
    datapath: Datapath
    raw: dict = field(repr=False, hash=False)  # the whole file, for the sections parsed later
    public_ports: tuple[PublicPort, ...] = ()
    project_deny: tuple[IPNetwork, ...] = ()   # `firewall: {deny: [...]}`: before every port
    ha: HA | None = None
    routing: Routing | None = None


def domain_target(project: Project, domain: Domain) -> tuple[Service, PortMap]:
    """The service a domain routes to and its port map (the router connects to the service's
    backends at ``target_port``). LookupError for a domain that is not of this project."""
    for service in project.services:
        if service.name == domain.service:
            for port_map in service.ports:
                if port_map.proto == "tcp" and port_map.port == domain.port:
                    return service, port_map
            break
    raise LookupError(f"{domain.host}: the project has no tcp port {domain.port} "
                      f"of a service {domain.service}")


def parse_host(value: Any) -> str:
    """A host of routing.domains as the routing service keys it (lowercased, no trailing
    dot); ValueError saying why for anything else (see the module docstring)."""
    why = _host_problem(value)
    if why:
        raise ValueError(why)
    return _normal_host(value)


def load(path: str | Path) -> Project:
    """Read and check a project file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "is not UTF-8 text"
        raise ConfigError([f"{source}: cannot read: {reason}"], source) from None
    return loads(text, source)


def loads(text: str, source: str = "<file>") -> Project:
    """Check a project file given as YAML text (what `zfast apply` sends the node)."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: {_describe_yaml_error(err)}"], source) from None
    return parse(data, source)


def parse(data: Any, source: str = "<file>") -> Project:
    """Check an already-read project file (the mapping YAML gives)."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: {_show(data)} is not a mapping of sections"], source)
    problems = _Problems()
    top = _Mapping(problems, "", data, _known(""))

    name = top.name("project")
    for section, kind in _KEPT_SECTIONS.items():
        if section in data and not isinstance(data[section], kind):
            problems.add(section, data[section],
                         "is not a list" if kind is list else "is not a mapping")
    node = _node(problems, data["node"]) if "node" in data else None
    datapath = _datapath(problems, data.get("datapath", {}))
    items = top.list("services", default=[]) or []
    paths = _service_paths(items)
    services = tuple(_service(problems, path, item, datapath) for path, item in zip(paths, items))
    _check_services_together(problems, services, paths, datapath)
    project_deny = _project_firewall(problems, data["firewall"]) if "firewall" in data else ()
    port_items = top.list("public_ports", default=[]) or []
    public_ports = tuple(_public_port(problems, f"public_ports[{i}]", item)
                         for i, item in enumerate(port_items))
    _check_public_ports(problems, public_ports, services, datapath, project_deny)
    ha = _ha(problems, data["ha"]) if "ha" in data else None
    routing = (_routing(problems, data["routing"], services, paths, public_ports)
               if "routing" in data else None)
    for service, path in zip(services, paths):
        if isinstance(service.name, str) and service.name.startswith(ROUTING_SERVICE):
            problems.add(f"{path}.name", service.name, f"is reserved: services named "
                                                       f"{ROUTING_SERVICE}* come from routing.routers")
    if routing is not None and routing.routers and all(routing.routers):
        services += routing_services(routing)
        if len(services) > datapath.max_services:
            problems.add("routing.routers", len(routing.routers),
                         f"make {len(services)} services with the routing ones, over "
                         f"datapath.max_services ({datapath.max_services})")
    if isinstance(data.get("telemetry"), dict):
        _telemetry(problems, data["telemetry"])
    # Objects built above hold None where a field was bad; they never leave here then.
    if problems:
        raise ConfigError(problems, source)
    return Project(project=name, node=node, services=services, datapath=datapath,
                   raw=copy.deepcopy(data), public_ports=public_ports,
                   project_deny=project_deny, ha=ha, routing=routing)


# ---- sections -----------------------------------------------------------------------------

def _node(problems: _Problems, value: Any) -> Node:
    node = _Mapping(problems, "node", value, _known("node"))
    name = node.name("name")
    state_dir = node.string("state_dir", default=f"/run/zfast/{name}")
    mode = node.choice("mode", XDP_MODES, default="auto")
    items = node.list("interfaces") or []
    if node.data.get("interfaces") == []:
        problems.add("node.interfaces", items, "has no interfaces (XDP attaches to them)")
    interfaces = tuple(_interface(problems, f"node.interfaces[{i}]", item)
                       for i, item in enumerate(items))
    seen: dict[str, int] = {}
    for i, interface in enumerate(interfaces):
        if interface.name is None:
            continue
        if interface.name in seen:
            problems.add(f"node.interfaces[{i}].name", interface.name,
                         f"is already node.interfaces[{seen[interface.name]}]")
        seen.setdefault(interface.name, i)
    return Node(name=name, state_dir=state_dir, interfaces=interfaces, mode=mode)


def _interface(problems: _Problems, path: str, value: Any) -> Interface:
    interface = _Mapping(problems, path, value, _known("node.interfaces[]"))
    name = interface.string("name")
    if name is not None and not _is_interface_name(name):
        problems.add(f"{path}.name", name,
                     "is not an interface name (1-15 characters, no '/', ':' or spaces)")
        name = None
    return Interface(name=name, role=interface.choice("role", INTERFACE_ROLES),
                     mode=interface.choice("mode", XDP_MODES, default=None))


def _datapath(problems: _Problems, value: Any) -> Datapath:
    section = _Mapping(problems, "datapath", value, _known("datapath"))
    defaults = Datapath()
    maglev_size = section.integer("maglev_size", default=defaults.maglev_size,
                                  low=3, high=2**24)
    if maglev_size is not None and not is_prime(maglev_size):
        problems.add("datapath.maglev_size", maglev_size,
                     f"is not a prime number (the next prime is {next_prime(maglev_size)})")
        maglev_size = None
    sizes = {"maglev_size": maglev_size}
    for key, low in (("flow_table", 1024), ("max_services", 1), ("max_backends", 1),
                     ("max_ifindex", 1), ("max_public_ports", 2), ("max_rules", 16)):
        sizes[key] = section.integer(key, default=getattr(defaults, key), low=low,
                                     high=_BPF_MAP_LIMIT)
    idle = section.integer("flow_idle_s", default=defaults.flow_idle_s, low=0, high=86400 * 7)
    if idle is not None and 0 < idle < 2:
        problems.add("datapath.flow_idle_s", idle, "is too short (0 for never, else >= 2)")
        idle = None
    sizes["flow_idle_s"] = idle
    # An invalid size is reported above; the checks that use it fall back to the default.
    return Datapath(**{key: getattr(defaults, key) if size is None else size
                       for key, size in sizes.items()})


def _service_paths(items: list) -> list[str]:
    """How problems name each service: by name when it is valid and unique, else by index."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    uses = Counter(name for name in names if isinstance(name, str))
    return [f"services.{name}" if _is_name(name) and uses[name] == 1 else f"services[{i}]"
            for i, name in enumerate(names)]


def _service(problems: _Problems, path: str, value: Any, datapath: Datapath) -> Service:
    service = _Mapping(problems, path, value, _known("services[]"))
    name = service.name("name")
    vip = service.address("vip", what="VIP")

    port_items = service.list("ports") or []
    if service.data.get("ports") == []:
        problems.add(f"{path}.ports", port_items, "has no ports")
    ports = tuple(_port(problems, f"{path}.ports[{i}]", item)
                  for i, item in enumerate(port_items))

    backend_items = service.list("backends", default=[]) or []
    if service.ok and service.data.get("backends", []) == []:
        problems.say(f"{path}.backends", "has no backends")
    backends = tuple(_backend(problems, f"{path}.backends[{i}]", item)
                     for i, item in enumerate(backend_items))
    _check_backends(problems, path, vip, backends, datapath)

    health = (_health(problems, f"{path}.health", service.data["health"])
              if "health" in service.data else None)
    return Service(name=name, vip=vip, ports=ports, backends=backends, health=health)


def _port(problems: _Problems, path: str, value: Any) -> PortMap:
    port_map = _Mapping(problems, path, value, _known("services[].ports[]"))
    port = port_map.port("port")
    return PortMap(port=port, proto=port_map.choice("proto", PROTOCOLS),
                   target_port=port_map.port("target_port", default=port))


def _backend(problems: _Problems, path: str, value: Any) -> Backend:
    backend = _Mapping(problems, path, value, _known("services[].backends[]"))
    return Backend(address=backend.address("address", what="backend"),
                   weight=backend.integer("weight", default=1, low=0, high=65535))


def _health(problems: _Problems, path: str, value: Any) -> Health:
    health = _Mapping(problems, path, value, _known("services[].health"))
    kind = health.choice("kind", HEALTH_KINDS)
    url_path = None
    if kind == "http":
        url_path = health.string("path", default="/")
        if url_path is not None and not url_path.startswith("/"):
            problems.add(f"{path}.path", url_path, "does not start with '/'")
    elif kind is not None and "path" in health.data:
        problems.add(f"{path}.path", health.data["path"], "is only for http checks")
    return Health(kind=kind,
                  interval_ms=health.integer("interval_ms", default=500, low=10, high=3_600_000),
                  fall=health.integer("fall", default=3, low=1, high=1000),
                  rise=health.integer("rise", default=2, low=1, high=1000),
                  path=url_path)


def _telemetry(problems: _Problems, value: dict) -> None:
    from zfast.telemetry.prometheus import parse_addr
    from zfast.telemetry.syslog import parse_target

    section = _Mapping(problems, "telemetry", value, _known("telemetry"))
    for key, check in (("prometheus", parse_addr), ("syslog", parse_target)):
        if key in section.data:
            try:
                check(section.data[key])
            except (ValueError, TypeError) as err:
                problems.add(f"telemetry.{key}", section.data[key], str(err))


def _ha(problems: _Problems, value: Any) -> HA:
    section = _Mapping(problems, "ha", value, _known("ha"))
    peer = section.address("peer", what="peer")
    bind = section.address("bind", what="bind")
    if peer is not None and bind is not None and peer.version != bind.version:
        problems.add("ha.bind", str(bind), f"is IPv{bind.version} but ha.peer is IPv{peer.version}")
    if peer is not None and peer == bind:
        problems.add("ha.peer", str(peer), "is this node's own bind address")
    vip_items = section.list("vips", default=[]) or []
    vips = []
    for i, item in enumerate(vip_items):
        vip = _Mapping(problems, "ha", {f"vips[{i}]": item}, {f"vips[{i}]"}).address(
            f"vips[{i}]", what="VIP")
        if vip is not None:
            if vip in vips:
                problems.add(f"ha.vips[{i}]", str(vip), "is listed twice")
            vips.append(vip)
    links = []
    for i, item in enumerate(section.list("links", default=[]) or []):
        link = _Mapping(problems, f"ha.links[{i}]", item, _known("ha.links[]"))
        lb, lp = link.address("bind", what="bind"), link.address("peer", what="peer")
        if lb is not None and lp is not None:
            links.append((lb, lp))
    preempt = section.data.get("preempt", False)
    if not isinstance(preempt, bool):
        problems.add("ha.preempt", preempt, "is not true or false")
        preempt = False
    return HA(peer=peer, bind=bind, key_file=section.string("key_file"),
              priority=section.integer("priority", default=100, low=1, high=255),
              heartbeat_ms=section.integer("heartbeat_ms", default=50, low=10, high=10_000),
              vips=tuple(vips), port=section.port("port", default=5405),
              sync_port=section.port("sync_port", default=5406), links=tuple(links),
              preempt=preempt,
              dead_intervals=section.integer("dead_intervals", default=3, low=2, high=100))


def _routing(problems: _Problems, value: Any, services: tuple[Service, ...], paths: list[str],
             public_ports: tuple[PublicPort, ...]) -> Routing:
    section = _Mapping(problems, "routing", value, _known("routing"))
    address_items = section.list("addresses") or []
    if section.data.get("addresses") == []:
        problems.add("routing.addresses", [], "has no addresses (the routing service serves "
                                              "ports 80 and 443 on them)")
    addresses: list[IPAddress] = []
    for i, item in enumerate(address_items):
        key = f"addresses[{i}]"
        address = _Mapping(problems, "routing", {key: item}, {key}).address(key, what="public")
        if address is None:
            continue
        if address in addresses:
            problems.add(f"routing.{key}", str(address),
                         f"is listed twice (also routing.addresses[{addresses.index(address)}])")
            continue
        addresses.append(address)
        _check_routing_address(problems, f"routing.{key}", address, services, paths,
                               public_ports)

    acme = _acme(problems, section.data["acme"]) if "acme" in section.data else None
    by_name = {s.name: s for s in services if s.name is not None}
    domains = []
    first_host: dict[str, int] = {}
    for i, item in enumerate(section.list("domains", default=[]) or []):
        path = f"routing.domains[{i}]"
        domain = _domain(problems, path, item, by_name, has_acme="acme" in section.data)
        if domain.host is not None:
            if domain.host in first_host:
                problems.add(f"{path}.host", item["host"], f"is listed twice (also "
                             f"routing.domains[{first_host[domain.host]}].host)")
            first_host.setdefault(domain.host, i)
        domains.append(domain)
    routers = tuple(_backend(problems, f"routing.routers[{i}]", item)
                    for i, item in enumerate(section.list("routers", default=[]) or []))
    return Routing(addresses=tuple(addresses), domains=tuple(domains), acme=acme,
                   routers=routers)


def _check_routing_address(problems: _Problems, path: str, address: IPAddress,
                           services: tuple[Service, ...], paths: list[str],
                           public_ports: tuple[PublicPort, ...]) -> None:
    """Ports 80 and 443 (TCP) of a routing address are the routing service's alone."""
    taken = [(port_map.port, f"{service_path}.ports[{j}]")
             for service, service_path in zip(services, paths) if service.vip == address
             for j, port_map in enumerate(service.ports)
             if port_map.proto == "tcp" and port_map.port in ROUTING_PORTS]
    # public_ports refuses 80 and 443 outright (its port is None then); kept for safety.
    taken += [(pp.port, f"public_ports[{j}]") for j, pp in enumerate(public_ports)
              if pp.address == address and pp.proto == "tcp" and pp.port in ROUTING_PORTS]
    for port, where in taken:
        problems.add(path, str(address), f"is the routing service's on {port}/tcp, but "
                                         f"{where} already listens there")


def _acme(problems: _Problems, value: Any) -> Acme:
    section = _Mapping(problems, "routing.acme", value, _known("routing.acme"))
    directory = section.string("directory")
    if directory is not None and not _is_http_url(directory):
        problems.add("routing.acme.directory", directory,
                     "is not an http:// or https:// URL with a host")
        directory = None
    email = section.string("email", default=None)
    if email is not None and not _is_email(email):
        problems.add("routing.acme.email", email, "is not an email address (like ops@example.org)")
        email = None
    ca_bundle = section.string("ca_bundle", default=None)
    if ca_bundle is not None:
        bundle = Path(ca_bundle)
        why = ("does not exist" if not bundle.exists() else
               "is not a file" if not bundle.is_file() else
               "is not readable" if not os.access(bundle, os.R_OK) else None)
        if why:
            problems.add("routing.acme.ca_bundle", ca_bundle, why)
            ca_bundle = None
    return Acme(directory=directory, email=email, ca_bundle=ca_bundle)


def _domain(problems: _Problems, path: str, value: Any, services: dict[str, Service],
            has_acme: bool) -> Domain:
    item = _Mapping(problems, path, value, _known("routing.domains[]"))
    host = None
    if item.ok and "host" in item.data:
        why = _host_problem(item.data["host"])
        if why:
            problems.add(f"{path}.host", item.data["host"], why)
        else:
            host = _normal_host(item.data["host"])
    else:
        item.string("host")  # files "is required"

    name = item.name("service")
    port = item.port("port")
    service = services.get(name) if name is not None else None
    if name is not None and service is None:
        problems.add(f"{path}.service", name, "is not a service of this project (known: "
                                              f"{', '.join(sorted(services)) or 'none'})")
    # A service whose ports are missing or bad has its own problems; judge no port against it.
    if (service is not None and port is not None and service.ports
            and all(None not in (p.port, p.proto) for p in service.ports)):
        port_map = _domain_port_map(service, port)
        if port_map is None:
            tcp = [p for p in service.ports if p.proto == "tcp"]
            shown = ", ".join(f"{p.port}" if p.target_port in (None, p.port)
                              else f"{p.port} (target_port {p.target_port})" for p in tcp)
            problems.add(f"{path}.port", port, f"is not a tcp port of service {name} " +
                         (f"(its tcp ports: {shown})" if tcp else "(it has no tcp ports)"))
            port = None
        else:
            port = port_map.port

    tls = item.choice("tls", TLS_KINDS, default="self-signed")
    if tls == "acme" and host is not None and host.startswith("*."):
        problems.add(f"{path}.tls", tls, f"cannot be used for the wildcard host {host}: HTTP-01 "
                                         "cannot validate a wildcard; use self-signed or an "
                                         "exact host")
    elif tls == "acme" and not has_acme:
        problems.add(f"{path}.tls", tls, "needs a routing.acme section (its directory)")
    redirect = item.boolean("redirect_https", default=False)
    if redirect and tls == "none":
        problems.add(f"{path}.redirect_https", redirect,
                     "redirects to HTTPS, which tls: none does not serve")
    return Domain(host=host, service=name, port=port, tls=tls, redirect_https=redirect)


def _domain_port_map(service: Service, port: int) -> PortMap | None:
    """The tcp port map a domain's port names: by its port, else by its target_port."""
    tcp = [p for p in service.ports if p.proto == "tcp"]
    return (next((p for p in tcp if p.port == port), None)
            or next((p for p in tcp if p.target_port == port), None))


def _project_firewall(problems: _Problems, value: Any) -> tuple[IPNetwork, ...]:
    section = _Mapping(problems, "firewall", value, _known("firewall"))
    items = section.list("deny", default=[]) or []
    return tuple(n for n in (_cidr(problems, f"firewall.deny[{i}]", item, None)
                             for i, item in enumerate(items)) if n is not None)


def _public_port(problems: _Problems, path: str, value: Any) -> PublicPort:
    item = _Mapping(problems, path, value, _known("public_ports[]"))
    port = item.port("port")
    proto = item.choice("proto", PROTOCOLS)
    if port in ROUTING_PORTS:
        problems.add(f"{path}.port", port, "belongs to the routing service (HTTP/HTTPS): "
                                           "use routing.domains for it")
        port = None
    address = item.address("address", what="public")
    firewall = (_firewall(problems, f"{path}.firewall", item.data["firewall"], address)
                if "firewall" in item.data else Firewall())
    return PublicPort(port=port, proto=proto, address=address, service=item.name("service"),
                      target_port=item.port("target_port", default=port), firewall=firewall)


def _firewall(problems: _Problems, path: str, value: Any, address: IPAddress | None) -> Firewall:
    section = _Mapping(problems, path, value, _known("public_ports[].firewall"))
    policy = section.choice("policy", ("allow", "deny"), default="allow")
    lists = {}
    for kind in ("allow", "deny"):
        items = section.list(kind, default=[]) or []
        lists[kind] = tuple(n for n in (_cidr(problems, f"{path}.{kind}[{i}]", item, address)
                                        for i, item in enumerate(items)) if n is not None)
    limit = None
    if "limit" in section.data:
        lim = _Mapping(problems, f"{path}.limit", section.data["limit"], _known("public_ports[].firewall.limit"))
        rate = lim.integer("new_per_s", low=1, high=10_000_000)
        burst = lim.integer("burst", default=rate, low=1, high=10_000_000)
        if rate is not None and burst is not None:
            limit = RateLimit(new_per_s=rate, burst=burst)
    return Firewall(policy=policy, allow=lists["allow"], deny=lists["deny"], limit=limit)


def _cidr(problems: _Problems, path: str, value: Any, address: IPAddress | None) -> IPNetwork | None:
    """A CIDR of a firewall list; of the port address's family when it has one."""
    if not isinstance(value, str):
        problems.add(path, value, "is not a CIDR (like 198.51.100.0/24)")
        return None
    try:
        network = _plain_v4_network(value) or ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            loose = None
        if loose is not None and "host bits set" in str(err):
            problems.add(path, value, f"has host bits set (the network is {loose})")
        else:
            problems.add(path, value, "is not a CIDR (like 198.51.100.0/24 or 2001:db8::/32)")
        return None
    if address is not None and network.version != address.version:
        problems.add(path, value, f"is IPv{network.version} but the port's address {address} "
                                  f"is IPv{address.version}")
        return None
    return network


_PLAIN_V4_CIDR = re.compile(r"((?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3})/(0|[1-9][0-9]?)\Z")


def _plain_v4_network(value: str) -> IPNetwork | None:
    """The network of a plain "a.b.c.d/n" without host bits, parsed by the C library
    rather than ipaddress's string parser (100,000 firewall rules: most of parse()'s
    time); None for anything else, which ip_network() then judges and explains."""
    m = _PLAIN_V4_CIDR.match(value)
    if m is None:
        return None
    try:
        number = int.from_bytes(socket.inet_aton(m.group(1)), "big")  # refuses an octet > 255
    except OSError:
        return None
    prefix = int(m.group(2))
    if prefix > 32 or number & ((1 << (32 - prefix)) - 1):
        return None
    return ipaddress.IPv4Network((number, prefix))


# ---- checks across fields -------------------------------------------------------------------

def _check_backends(problems: _Problems, path: str, vip: IPAddress | None,
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


def _check_services_together(problems: _Problems, services: tuple[Service, ...],
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
            shown = f"{_host(service.vip)}:{port_map.port}/{port_map.proto}"
            if listener in first_listener:
                problems.add(f"{path}.ports[{i}]", shown,
                             f"is already served by {first_listener[listener]}")
            first_listener.setdefault(listener, f"{path}.ports[{i}]")

    if len(services) > datapath.max_services:
        problems.say("services", f"{len(services)} services are more than"
                                 f" datapath.max_services ({datapath.max_services})")
    backend_count = sum(len(service.backends) for service in services)
    if backend_count > datapath.max_backends:
        problems.say("services", f"{backend_count} backends in all are more than"
                                 f" datapath.max_backends ({datapath.max_backends})")


def _check_public_ports(problems: _Problems, ports: tuple[PublicPort, ...],
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
        shown = f"{_host(pp.address)}:{pp.port}/{pp.proto}"
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


# ---- reading one mapping ----------------------------------------------------------------------

_REQUIRED = object()


class _Problems(list):
    """Every problem found so far, as the lines ConfigError shows."""

    def add(self, path: str, value: Any, why: str) -> None:
        """A bad value: `path: value why`."""
        self.append(f"{path}: {_show(value)} {why}")

    def say(self, path: str, text: str) -> None:
        """A problem that is not about one value (a missing field, a count)."""
        self.append(f"{path}: {text}")


class _Mapping:
    """One mapping of the file: hands out its fields by type, files problems under its path.

    A getter returns the field's value, its default when absent, or None after filing a
    problem. Nothing is filed twice: if the mapping itself is bad, its fields are not read.
    """

    def __init__(self, problems: _Problems, path: str, value: Any, known: set[str]):
        self.problems = problems
        self.path = path
        self.ok = isinstance(value, dict)
        self.data = value if self.ok else {}
        if not self.ok:
            problems.add(path, value, "is not a mapping")
        for key in self.data:
            if key not in known:
                problems.say(self._path(key),
                             f"unknown field (known: {', '.join(sorted(known))})")

    def _path(self, key: Any) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def _get(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value): a missing required field is filed and gives (False, None)."""
        if key in self.data:
            return True, self.data[key]
        if default is _REQUIRED:
            if self.ok:
                self.problems.say(self._path(key), "is required")
            return False, None
        return False, default

    def _bad(self, key: str, value: Any, why: str) -> None:
        self.problems.add(self._path(key), value, why)

    def string(self, key: str, default: Any = _REQUIRED) -> str | None:
        present, value = self._get(key, default)
        if present and (not isinstance(value, str) or not value):
            self._bad(key, value, "is not a non-empty string")
            return None
        return value

    def name(self, key: str, default: Any = _REQUIRED) -> str | None:
        present, value = self._get(key, default)
        if present and not _is_name(value):
            self._bad(key, value, f"is not a name ({NAME_PATTERN})")
            return None
        return value

    def integer(self, key: str, default: Any = _REQUIRED, low: int = 0,
                high: int = _BPF_MAP_LIMIT) -> int | None:
        present, value = self._get(key, default)
        if not present:
            return value
        if not _is_int(value):  # YAML's true/false are not numbers, whatever Python says
            self._bad(key, value, "is not an integer")
            return None
        if not low <= value <= high:
            self._bad(key, value, f"is out of range ({low}-{high})")
            return None
        return value

    def port(self, key: str, default: Any = _REQUIRED) -> int | None:
        present, value = self._get(key, default)
        if present and (not _is_int(value) or not 1 <= value <= 65535):
            self._bad(key, value, "is not a port (1-65535)")
            return None
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = _REQUIRED) -> str | None:
        present, value = self._get(key, default)
        if present and value not in choices:
            self._bad(key, value, f"is not one of {', '.join(choices)}")
            return None
        return value

    def boolean(self, key: str, default: Any = _REQUIRED) -> bool | None:
        present, value = self._get(key, default)
        if present and not isinstance(value, bool):
            self._bad(key, value, "is not true or false")
            return None
        return value

    def list(self, key: str, default: Any = _REQUIRED) -> list | None:
        present, value = self._get(key, default)
        if present and not isinstance(value, list):
            self._bad(key, value, "is not a list")
            return None
        return value

    def address(self, key: str, what: str) -> IPAddress | None:
        """A usable unicast IPv4 or IPv6 address (of a VIP or a backend)."""
        present, value = self._get(key, _REQUIRED)
        if not present:
            return None
        try:
            # A string only: ip_address() would also take an int, which YAML gives for 123.
            address = ipaddress.ip_address(value) if isinstance(value, str) else None
        except ValueError:
            address = None
        if address is None:
            self._bad(key, value, "is not an IP address")
            return None
        unusable = _unusable_reason(address)
        if unusable:
            self._bad(key, value, f"is {unusable}, not a usable {what} address")
            return None
        return address


# ---- small helpers ------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def _is_interface_name(name: str) -> bool:
    """What Linux accepts as a device name (dev_valid_name)."""
    return (0 < len(name.encode()) < _IFNAMSIZ and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name))


def _unusable_reason(address: IPAddress) -> str | None:
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if getattr(address, "scope_id", None):
        return "scoped to a link"
    return None


_LABEL_RE = re.compile(r"[a-z0-9-]{1,63}\Z")
_EMAIL_LOCAL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}\Z")


def _normal_host(value: str) -> str:
    host = value.lower()
    return host[:-1] if host.endswith(".") else host


def _host_problem(value: Any) -> str | None:
    """Why ``value`` is not a host of routing.domains, or None (see the module docstring)."""
    if not isinstance(value, str) or not value:
        return "is not a host name (like app.example.org or *.example.org)"
    if "://" in value:
        return "is a URL, not a host name (give the name only, like app.example.org)"
    name, colon, port = value.rpartition(":")
    with_port = bool(colon and port.isdigit())
    for candidate in (value, name) if with_port else (value,):
        bare = candidate.rstrip(".")
        bare = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
        try:
            ipaddress.ip_address(bare)
            return "is an IP address, not a host name"
        except ValueError:
            pass
    if with_port and ":" not in name:
        return "has a port: a host is a name only (the routing service serves 80 and 443)"
    host = _normal_host(value)
    labels = host.split(".")
    if "*" in host:
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            return ("has a '*' that is not the whole leftmost label "
                    "(a wildcard is *. before a name, like *.example.org)")
        labels = labels[1:]
        if len(labels) < 2:
            return ("is not a host name: a wildcard needs a name of at least two labels "
                    "after '*.' (like *.example.org)")
    for label in labels:
        if not label:
            return "is not a host name: it has an empty label"
        if not _LABEL_RE.match(label):
            if len(label) > 63:
                return "is not a host name: a label is longer than 63 characters"
            return (f"is not a host name: label {_show(label)} has a character other than "
                    "a-z, 0-9 and '-'")
        if label[0] == "-" or label[-1] == "-":
            return f"is not a host name: label {_show(label)} starts or ends with '-'"
    if len(labels) < 2:
        return "is not a host name: it needs at least two labels (like example.org)"
    if labels[-1].isdigit():
        return f"is not a host name: its last label {_show(labels[-1])} is all digits"
    if len(host) > 253:
        return "is not a host name: it is longer than 253 characters"
    return None


def _is_email(value: str) -> bool:
    local, at, domain = value.rpartition("@")
    return (bool(at) and _EMAIL_LOCAL_RE.match(local) is not None
            and "*" not in domain and not domain.endswith(".")
            and _host_problem(domain) is None)


def _is_http_url(value: str) -> bool:
    if any(c.isspace() for c in value):
        return False
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # a bad port raises ValueError
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)


def _host(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def _show(value: Any) -> str:
    """A value as the problem line shows it: YAML-like and short."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML's safe loader, but a key given twice in one mapping is an error, not "last wins".

    libyaml's parser when PyYAML has it: the pure-Python one takes seconds on a file
    with 100,000 firewall rules."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {_show(key)} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).replace("\n", " ")
    if mark is None:
        return f"is not valid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: is not valid YAML: {problem}"


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(reference())
    else:
        sys.exit("usage: python -m zfast.config --reference")
