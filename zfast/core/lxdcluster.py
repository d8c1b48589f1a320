"""The LXD cluster as the runtime sees it: which members are up, where this core's
containers are, and where a new one goes (the rule: zfast/core/placement.py).

LXD calls a member Offline only after its heartbeats have failed for
``cluster.offline_threshold`` (more than 10 s), and a request it forwards to a member that
is gone stalls meanwhile (10 s here, then "Missing event connection"). So a member whose
API address refuses a connection (or does not accept one in 0.5 s) is down at once.
"""

from __future__ import annotations

import socket
from typing import Callable
from urllib.parse import urlsplit

from zfast.core.lxdapi import LxdClient, LxdError
from zfast.core.placement import choose_member, shares_member
from zfast.core.runtime import Instance, InstanceSpec

REACH_TIMEOUT_S = 0.5     # a member's API address that does not accept in this is down


class ClusterView:
    def __init__(self, client: LxdClient, prefix: str, log: Callable[..., None]):
        self.client = client
        self.prefix = prefix          # this core's containers: tagged user.zfast.core
        self.log = log
        self.urls: dict[str, str] = {}    # each member's API address (https://host:port)

    def online(self) -> list[str] | None:
        """The members that are up (Online to LXD, and their address answers); None: no
        cluster (one daemon)."""
        if not (self.client.get("/1.0/cluster") or {}).get("enabled"):
            return None
        members = self.client.get("/1.0/cluster/members?recursion=1") or []
        self.urls.update({m["server_name"]: m.get("url", "") for m in members})
        return sorted(m["server_name"] for m in members
                      if m.get("status") == "Online" and self.reachable(m["server_name"]))

    def reachable(self, member: str | None) -> bool:
        """Whether the member's API address accepts a connection; no member (no cluster)
        or an address not known counts as reachable."""
        url = self.urls.get(member or "")
        if not member or not url:
            return True
        host, _, port = urlsplit(url).netloc.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port or 8443)), REACH_TIMEOUT_S).close()
            return True
        except (OSError, ValueError):
            return False

    def containers(self) -> list[dict]:
        """This core's containers (tagged user.zfast.core), as LXD lists them."""
        return [c for c in self.client.get("/1.0/instances?recursion=1") or []
                if (c.get("config") or {}).get("user.zfast.core") == self.prefix]

    def placed(self, without: str | None = None) -> list[tuple[str, str]]:
        """(kind, member) of every container of this core but ``without``."""
        return [((c.get("config") or {}).get("user.zfast.kind", ""), c.get("location") or "")
                for c in self.containers() if c["name"] != without]

    def target(self, spec: InstanceSpec) -> str | None:
        """The member for a new instance (None: no cluster); a balancer or router that
        has to share a member with another of its kind is said."""
        online = self.online()
        if online is None:
            return None
        placed = self.placed()
        member = choose_member(spec.kind, online, placed)
        if member is None:
            raise LxdError("no member of the LXD cluster is online")
        if spec.kind != "spare" and shares_member(spec.kind, member,
                                                  [(k, m) for k, m in placed if k != "spare"]):
            self.log("error", instance=spec.name, what="placement", member=member,
                     error=f"shares {member} with another {spec.kind}: every other online "
                           "member has one too")
        return member

    def better_placed(self, inst: Instance) -> bool:
        """Whether the instance shares its member with one of its group while a new one
        would go to a member without any."""
        if not inst.member:
            return False
        try:
            online = self.online()
            others = self.placed(without=inst.netns)     # its container's name
        except (OSError, LxdError):
            return False
        if not online:
            return False
        if not shares_member(inst.spec.kind, inst.member, others):
            return False
        target = choose_member(inst.spec.kind, online, others)
        return target is not None and not shares_member(inst.spec.kind, target, others)
