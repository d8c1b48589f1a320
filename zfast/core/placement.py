"""Where an instance runs in a cluster: the balancers apart, the routers apart.

A pure choice from the members that are up and where this core's instances are. The two
balancers and the parked spare are one group (the spare becomes either balancer), the
routers another: an instance goes to the online member with the fewest of its group, then
the fewest instances, then the first by name. So the pair never shares a member while a
second one is up, the spare waits on a third, and a successor lands away from the
surviving peer: the member that failed holds none of them any more.
"""

from __future__ import annotations

GROUPS = {"balancer": "balancer", "spare": "balancer", "router": "router"}


def group_of(kind: str) -> str:
    return GROUPS.get(kind, kind)


def choose_member(kind: str, online: list[str], placed: list[tuple[str, str]]) -> str | None:
    """The member for a new instance of ``kind``; ``placed``: (kind, member) of every
    instance of this core that exists now. None when no member is online."""
    group = group_of(kind)

    def load(member: str) -> tuple[int, int, str]:
        here = [k for k, m in placed if m == member]
        return sum(1 for k in here if group_of(k) == group), len(here), member

    return min(online, key=load) if online else None


def shares_member(kind: str, member: str, placed: list[tuple[str, str]]) -> bool:
    """Whether an instance of ``kind`` on ``member`` shares it with one of its group."""
    return any(m == member and group_of(k) == group_of(kind) for k, m in placed)
