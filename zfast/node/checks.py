"""What a node checks before it touches the kernel, and before it takes a new file:
each failure is a NodeError, one line that says why."""

from __future__ import annotations

from zfast import config
from zfast.dataplane.loader import DatapathError, ifindex
from zfast.ha.heartbeat import KeyError_, load_key


class NodeError(Exception):
    """The node cannot start or cannot take this change; one line says why."""


def check_node_section(project: config.Project) -> None:
    if project.node is None:
        raise NodeError("the project file has no node section (name, interfaces)")


def check_interfaces(node: config.Node) -> None:
    missing = []
    for itf in node.interfaces:
        try:
            ifindex(itf.name)
        except DatapathError:
            missing.append(itf.name)
    if missing:
        raise NodeError("no such interface: " + ", ".join(missing))


def check_ha_key(project: config.Project) -> None:
    """A bad key of a pair fails before anything is made."""
    if project.ha is None:
        return
    try:
        load_key(project.ha.key_file)
    except KeyError_ as err:
        raise NodeError(str(err)) from None


def check_local(running: config.Project, project: config.Project) -> None:
    """Can the running node take project without a restart? Its own sections must not
    change (name, project, datapath sizes, ha, interfaces)."""
    name = running.node.name
    if project.node is None or project.node.name != name:
        raise NodeError(f"the file is for node {project.node.name if project.node else None!r}, "
                        f"this node is {name!r}")
    if project.project != running.project:
        raise NodeError(f"the file is for project {project.project!r}, this node serves "
                        f"{running.project!r}")
    if project.datapath != running.datapath:
        raise NodeError("datapath sizes differ from the running node's; restart it to resize")
    if project.ha != running.ha:
        raise NodeError("the ha section differs from the running node's; restart it to change it")
    if project.node.interfaces != running.node.interfaces or project.node.mode != running.node.mode:
        raise NodeError("interfaces differ from the running node's; restart it to change them")
