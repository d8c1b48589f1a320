"""The whole project file: its sections composed into ``Project``, the checks across them.

Reads the sections in the order their problems are listed; a file is accepted whole or
refused whole (one ConfigError listing every problem).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from zfast.config import kinds
from zfast.config.core import Core
from zfast.config.datapath import Datapath, read_datapath
from zfast.config.firewall import (
    ProjectFirewall,
    PublicPort,
    check_public_ports,
    read_project_deny,
    read_public_port,
)
from zfast.config.ha import HA, read_ha
from zfast.config.kinds import IPNetwork
from zfast.config.node import Node, read_node
from zfast.config.problems import ConfigError, Problems, show
from zfast.config.routing import ROUTING_SERVICE, Routing, read_routing, routing_services
from zfast.config.schema import ListOf, Opaque, Reader, Section, Setting, setting
from zfast.config.services import Service, check_services_together, read_service, service_paths
from zfast.config.telemetry import Telemetry
from zfast.config.yaml_loader import StrictLoader, describe_yaml_error


@dataclass(frozen=True, kw_only=True)
class Project:
    """The checked file. Its settings are the file's top-level sections (read by
    ``parse``, not field by field)."""
    project: str = setting(kinds.Name(), doc="name of the project")
    node: Node | None = setting(Section(Node, read=read_node), default=None)
    services: tuple[Service, ...] = setting(ListOf(Section(Service, read=read_service)),
                                            default=())
    datapath: Datapath = setting(Section(Datapath, read=read_datapath), default=Datapath())
    raw: dict = field(repr=False, hash=False)  # the whole file, for the sections parsed later
    public_ports: tuple[PublicPort, ...] = setting(
        ListOf(Section(PublicPort, read=read_public_port)), default=())
    project_deny: tuple[IPNetwork, ...] = setting(   # `firewall: {deny: [...]}`: before every port
        Section(ProjectFirewall, read=read_project_deny), default=(), key="firewall")
    ha: HA | None = setting(Section(HA, read=read_ha), default=None)
    routing: Routing | None = setting(Section(Routing, read=read_routing), default=None)
    core: Core | None = setting(Section(Core), default=None)   # `zfast core up`'s alone

    FILE_ONLY: ClassVar[dict[str, Setting]] = {
        "store": Setting(Opaque(), default=None, doc="where revisions live (zfast/store)"),
        "telemetry": Setting(Section(Telemetry), default=None),
    }


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
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError([f"{source}: {describe_yaml_error(err)}"], source) from None
    return parse(data, source)


def parse(data: Any, source: str = "<file>") -> Project:
    """Check an already-read project file (the mapping YAML gives)."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: {show(data)} is not a mapping of sections"], source)
    problems = Problems()
    top = Reader(problems, "", data, Project)

    name = top.read("project")
    top.read("store")
    core = top.read("core")
    node = top.read("node")
    datapath = top.read("datapath")
    items = top.items("services")
    paths = service_paths(items)
    services = tuple(read_service(problems, path, item, datapath)
                     for path, item in zip(paths, items))
    check_services_together(problems, services, paths, datapath)
    project_deny = top.read("project_deny")
    public_ports = tuple(port for _, _, port in top.each("public_ports"))
    check_public_ports(problems, public_ports, services, datapath, project_deny)
    ha = top.read("ha")
    routing = top.read("routing", services=services, paths=paths, public_ports=public_ports)
    for service, path in zip(services, paths):
        if isinstance(service.name, str) and service.name.startswith(ROUTING_SERVICE):
            problems.add(f"{path}.name", service.name, f"is reserved: services named "
                                                       f"{ROUTING_SERVICE}* come from routing.routers")
    if routing is not None and routing.routers and all(r.address for r in routing.routers):
        services += routing_services(routing)
        if len(services) > datapath.max_services:
            problems.add("routing.routers", len(routing.routers),
                         f"make {len(services)} services with the routing ones, over "
                         f"datapath.max_services ({datapath.max_services})")
    top.read("telemetry")
    # Objects built above hold None where a field was bad; they never leave here then.
    if problems:
        raise ConfigError(problems, source)
    return Project(project=name, node=node, services=services, datapath=datapath,
                   raw=copy.deepcopy(data), public_ports=public_ports,
                   project_deny=project_deny, ha=ha, routing=routing, core=core)
