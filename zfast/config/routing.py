"""``routing``: the L7 routing service (HTTP on 80, HTTPS on 443 of each address).

::

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

Extension of the spec: ``routers``, the HTTP balancers behind the addresses. `zfast core up`
writes it; a node given it balances 80/443 of each address over them (``routing_services``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zfast.config import kinds
from zfast.config.hostnames import host_problem, is_email, is_http_url, normal_host
from zfast.config.kinds import IPAddress
from zfast.config.problems import Problems
from zfast.config.schema import ListOf, Reader, Section, setting
from zfast.config.services import Backend, Health, PortMap, Service

if TYPE_CHECKING:   # both import this module: firewall.py for ROUTING_PORTS, project.py all
    from zfast.config.firewall import PublicPort
    from zfast.config.project import Project

ROUTING_PORTS = (80, 443)  # the routing service's (HTTP/HTTPS); not public_ports'
TLS_KINDS = ("acme", "self-signed", "none")
ROUTING_SERVICE = "routing-"   # services `routing-<i>` are made from routing.routers: reserved


@dataclass(frozen=True)
class Acme:
    """The ACME server the routing service gets certificates from (HTTP-01)."""
    directory: str = setting(kinds.Refined(kinds.Text(), is_http_url,
                                           "is not an http:// or https:// URL with a host",
                                           "http:// or https:// URL with a host"),
                             doc="the directory URL")
    email: str | None = setting(kinds.Refined(kinds.Text(), is_email,
                                              "is not an email address (like ops@example.org)",
                                              "email address"),
                                default=None, doc="the account's contact")
    ca_bundle: str | None = setting(kinds.ReadableFile(), default=None,
                                    doc="trust for a private ACME server's own TLS")


def read_domain(problems: Problems, path: str, value: Any, services: dict[str, Service],
                has_acme: bool) -> Domain:
    item = Reader(problems, path, value, Domain)
    host = item.read("host")
    name = item.read("service")
    port = item.read("port")
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

    tls = item.read("tls")
    if tls == "acme" and host is not None and host.startswith("*."):
        problems.add(f"{path}.tls", tls, f"cannot be used for the wildcard host {host}: HTTP-01 "
                                         "cannot validate a wildcard; use self-signed or an "
                                         "exact host")
    elif tls == "acme" and not has_acme:
        problems.add(f"{path}.tls", tls, "needs a routing.acme section (its directory)")
    redirect = item.read("redirect_https")
    if redirect and tls == "none":
        problems.add(f"{path}.redirect_https", redirect,
                     "redirects to HTTPS, which tls: none does not serve")
    return Domain(host=host, service=name, port=port, tls=tls, redirect_https=redirect)


def _domain_port_map(service: Service, port: int) -> PortMap | None:
    """The tcp port map a domain's port names: by its port, else by its target_port."""
    tcp = [p for p in service.ports if p.proto == "tcp"]
    return (next((p for p in tcp if p.port == port), None)
            or next((p for p in tcp if p.target_port == port), None))


@dataclass(frozen=True)
class Domain:
    """One host the routing service serves, and where its requests go."""
    host: str = setting(kinds.Host(), doc="lowercased, no trailing dot; exact or `*.` + name")
    service: str = setting(kinds.Name(), doc="a service of the project")
    port: int = setting(kinds.Port(), doc="one of that service's tcp ports (its ports[].port)")
    tls: str = setting(kinds.Choice(TLS_KINDS), default="self-signed")
    redirect_https: bool = setting(kinds.Flag(), default=False,
                                   doc="answer plain HTTP with a redirect to HTTPS")

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")


def read_routing(problems: Problems, path: str, value: Any, services: tuple[Service, ...],
                 paths: list[str], public_ports: tuple[PublicPort, ...]) -> Routing:
    section = Reader(problems, path, value, Routing)
    addresses: list[IPAddress] = []
    for address_path, _, address in section.each("addresses"):
        if address is None:
            continue
        if address in addresses:
            problems.add(address_path, str(address), f"is listed twice (also "
                         f"{path}.addresses[{addresses.index(address)}])")
            continue
        addresses.append(address)
        _check_routing_address(problems, address_path, address, services, paths, public_ports)

    acme = section.read("acme")
    by_name = {s.name: s for s in services if s.name is not None}
    domains = []
    first_host: dict[str, int] = {}
    for i, (domain_path, item, domain) in enumerate(
            section.each("domains", services=by_name, has_acme=section.present("acme"))):
        if domain.host is not None:
            if domain.host in first_host:
                problems.add(f"{domain_path}.host", item["host"], f"is listed twice (also "
                             f"{path}.domains[{first_host[domain.host]}].host)")
            first_host.setdefault(domain.host, i)
        domains.append(domain)
    return Routing(addresses=tuple(addresses), domains=tuple(domains), acme=acme,
                   routers=section.read("routers"))


def _check_routing_address(problems: Problems, path: str, address: IPAddress,
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


@dataclass(frozen=True)
class Routing:
    """The L7 routing service (HTTP on 80, HTTPS on 443 of each address)."""
    addresses: tuple[IPAddress, ...] = setting(
        ListOf(kinds.Address("public"),
               empty="has no addresses (the routing service serves ports 80 and 443 on them)"),
        doc="public addresses whose TCP ports 80 and 443 the routing service serves")
    domains: tuple[Domain, ...] = setting(ListOf(Section(Domain, read=read_domain)), default=())
    acme: Acme | None = setting(Section(Acme), default=None)
    # Extension of the spec: the HTTP balancers (HAProxy) behind the addresses. `zfast core
    # up` writes it; a node given it balances 80/443 of each address over them (below).
    routers: tuple[Backend, ...] = setting(ListOf(Section(Backend)), default=())


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
    why = host_problem(value)
    if why:
        raise ValueError(why)
    return normal_host(value)
