"""``ha``: the active/standby pair (zfast/ha; docs/ha.md). Extensions of the spec: port,
sync_port, links, preempt, dead_intervals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zfast.config import kinds
from zfast.config.kinds import IPAddress
from zfast.config.problems import Problems
from zfast.config.schema import ListOf, Reader, Section, setting


@dataclass(frozen=True)
class HeartbeatLink:
    """One item of ``ha.links``; ``HA.links`` keeps it as the pair (bind, peer)."""
    bind: IPAddress = setting(kinds.Address("bind"))
    peer: IPAddress = setting(kinds.Address("peer"))


@dataclass(frozen=True)
class HA:
    """The active/standby pair (zfast/ha). Extensions of the spec: port, sync_port,
    links, preempt."""
    peer: IPAddress = setting(kinds.Address("peer"), doc="the partner's heartbeat/sync address")
    bind: IPAddress = setting(kinds.Address("bind"), doc="this node's address on the sync link")
    key_file: str = setting(kinds.Text(),
                            doc="shared secret of the pair (HMAC of heartbeats and sync)")
    priority: int = setting(kinds.Integer(1, 255), default=100, doc="higher wins when both start")
    heartbeat_ms: int = setting(kinds.Integer(10, 10_000), default=50)
    vips: tuple[IPAddress, ...] = setting(ListOf(kinds.Address("VIP")), default=(),
                                          doc="addresses that move to the active node")
    port: int = setting(kinds.Port(), default=5405, doc="heartbeats (UDP)")
    sync_port: int = setting(kinds.Port(), default=5406, doc="flow replication (TCP)")
    links: tuple[tuple[IPAddress, IPAddress], ...] = setting(
        ListOf(Section(HeartbeatLink)), default=(), doc="more (bind, peer) heartbeat paths")
    preempt: bool = setting(kinds.Flag(), default=False,
                            doc="a returning higher-priority node takes over")
    dead_intervals: int = setting(kinds.Integer(2, 100), default=3,
                                  doc="heartbeats missed before the peer counts as dead")


def read_ha(problems: Problems, path: str, value: Any) -> HA:
    section = Reader(problems, path, value, HA)
    peer = section.read("peer")
    bind = section.read("bind")
    if peer is not None and bind is not None and peer.version != bind.version:
        problems.add(f"{path}.bind", str(bind),
                     f"is IPv{bind.version} but {path}.peer is IPv{peer.version}")
    if peer is not None and peer == bind:
        problems.add(f"{path}.peer", str(peer), "is this node's own bind address")
    vips: list[IPAddress] = []
    for vip_path, _, vip in section.each("vips"):
        if vip is not None:
            if vip in vips:
                problems.add(vip_path, str(vip), "is listed twice")
            vips.append(vip)
    links = tuple((link.bind, link.peer) for _, _, link in section.each("links")
                  if link.bind is not None and link.peer is not None)
    preempt = section.read("preempt") or False
    return HA(peer=peer, bind=bind, key_file=section.read("key_file"),
              priority=section.read("priority"), heartbeat_ms=section.read("heartbeat_ms"),
              vips=tuple(vips), port=section.read("port"), sync_port=section.read("sync_port"),
              links=links, preempt=preempt, dead_intervals=section.read("dead_intervals"))
