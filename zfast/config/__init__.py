"""The project file: YAML in, frozen dataclasses out, or one ConfigError listing every problem.

Every key and type is checked; a file is accepted whole or rejected whole. Each problem reads
``<field path>: <value> <why>``, e.g. ``services.app.ports[0].port: 70000 is not a port
(1-65535)``. A service is named by its ``name`` in paths, or by its index when the name is
missing, invalid or used twice.

Each field is declared once, on the dataclass that holds it (schema.py): its kind, default
and meaning. The validation, the known keys of each mapping, ``FIELDS`` and the reference in
docs/configuration.md (``python -m zfast.config --reference``) all come from there.

project.py      Project, load/loads/parse: the sections composed, the checks across them
schema.py       the declare-once machinery: setting(), Reader, ListOf, Section
kinds.py        field kinds: integers in a range, ports, names, addresses, CIDRs, sizes...
node.py         node
datapath.py     datapath (the data plane's sizes; defaults from bpf/zfast_shared.h)
services.py     services, their ports, backends and health checks
firewall.py     public_ports and their firewalls; firewall (the project-wide deny list)
ha.py           ha
routing.py      routing (the L7 routing service): addresses, acme, domains, routers
telemetry.py    telemetry (checked here, read from Project.raw)
core.py         core (`zfast core up`'s section)
reference.py    FIELDS, the reference tables of docs/configuration.md
problems.py     ConfigError and how a problem line shows a value
hostnames.py    DNS host names, email addresses, http(s) URLs
yaml_loader.py  YAML in, strict about a key given twice

The section ``store`` is only checked for its shape (a mapping) and kept, like the whole
file, in ``Project.raw``.
"""

from zfast.config.core import Core, CoreBalancer, CorePrivate, CorePublic, CoreRouters, CoreScale
from zfast.config.datapath import SIZE_FIELDS, Datapath
from zfast.config.firewall import Firewall, PublicPort, RateLimit
from zfast.config.ha import HA
from zfast.config.kinds import NAME_PATTERN, IPAddress, IPNetwork
from zfast.config.node import INTERFACE_ROLES, XDP_MODES, Interface, Node
from zfast.config.problems import ConfigError
from zfast.config.project import Project, load, loads, parse
from zfast.config.reference import FIELDS, field_table, reference
from zfast.config.routing import (
                                      ROUTING_PORTS,
                                      ROUTING_SERVICE,
                                      TLS_KINDS,
                                      Acme,
                                      Domain,
                                      Routing,
                                      domain_target,
                                      parse_host,
                                      routing_services,
)
from zfast.config.services import HEALTH_KINDS, PROTOCOLS, Backend, Health, PortMap, Service

__all__ = [
    "Acme", "Backend", "ConfigError", "Core", "CoreBalancer", "CorePrivate", "CorePublic",
    "CoreRouters", "CoreScale", "Datapath", "Domain", "FIELDS", "Firewall", "HA",
    "HEALTH_KINDS", "Health", "INTERFACE_ROLES", "IPAddress", "IPNetwork", "Interface",
    "NAME_PATTERN", "Node", "PROTOCOLS", "PortMap", "Project", "PublicPort", "ROUTING_PORTS",
    "ROUTING_SERVICE", "RateLimit", "Routing", "SIZE_FIELDS", "Service", "TLS_KINDS",
    "XDP_MODES", "domain_target", "field_table", "load", "loads", "parse", "parse_host",
    "reference", "routing_services",
]
