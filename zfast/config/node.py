"""``node``: this node of the balancer and the interfaces XDP attaches to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zfast.config import kinds
from zfast.config.problems import Problems
from zfast.config.schema import From, ListOf, Reader, Section, setting

XDP_MODES = ("native", "generic", "tc", "auto")   # tc: not XDP, the tc ingress hook
INTERFACE_ROLES = ("public", "private")


@dataclass(frozen=True)
class Interface:
    name: str = setting(kinds.INTERFACE_NAME)
    role: str = setting(kinds.Choice(INTERFACE_ROLES))  # public | private
    mode: str | None = setting(kinds.Choice(XDP_MODES), default=None,
                               doc="overrides node.mode for this interface")


@dataclass(frozen=True)
class Node:
    name: str = setting(kinds.Name(), doc="unique per node")
    state_dir: str = setting(kinds.Text(), default=From("name", lambda name: f"/run/zfast/{name}"),
                             shown_default="`/run/zfast/<name>`",
                             doc="where the node keeps its API socket and lock")
    interfaces: tuple[Interface, ...] = setting(
        ListOf(Section(Interface), empty="has no interfaces (XDP attaches to them)"))
    mode: str = setting(kinds.Choice(XDP_MODES), default="auto")  # native | generic | tc | auto


def read_node(problems: Problems, path: str, value: Any) -> Node:
    node = Reader(problems, path, value, Node)
    name = node.read("name")
    state_dir = node.read("state_dir")
    mode = node.read("mode")
    interfaces = node.read("interfaces")
    seen: dict[str, int] = {}
    for i, interface in enumerate(interfaces):
        if interface.name is None:
            continue
        if interface.name in seen:
            problems.add(f"{path}.interfaces[{i}].name", interface.name,
                         f"is already {path}.interfaces[{seen[interface.name]}]")
        seen.setdefault(interface.name, i)
    return Node(name=name, state_dir=state_dir, interfaces=interfaces, mode=mode)
