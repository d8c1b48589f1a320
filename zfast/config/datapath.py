"""``datapath``: the data plane's sizes (an extension of the spec; all optional).

::

    datapath:
      maglev_size: 16381   # slots of each service's Maglev table; prime (default: ZF_RING_SIZE)
      flow_table: 262144   # LRU flow entries (two per connection), >= 1024 (ZF_FLOW_TABLE)
      max_services: 16     # services the data plane can hold (ZF_MAX_SERVICES)
      max_backends: 1024   # backends over all services (ZF_MAX_BACKENDS)
      max_ifindex: 256     # devmap slots, indexed by ifindex (ZF_MAX_IFINDEX)
      max_public_ports: 64 # firewalled public ports, slot 0 the project-wide (ZF_MAX_PUBLIC_PORTS)
      max_rules: 16384     # firewall CIDR rules, all ports together (ZF_MAX_RULES)
      rate_table: 16384    # sources the new-connection rate limit tracks (ZF_RATE_TABLE)
      flow_idle_s: 300     # idle flows leave the table after this (0: never); not a size

A size's default is the C side's own, the ZF_* named beside it in bpf/zfast_shared.h,
read from there (``Datapath()`` has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zfast.config import kinds
from zfast.config.problems import Problems
from zfast.config.schema import Reader, setting
from zfast.dataplane.reasons import defines
from zfast.reconcile.maglev import is_prime, next_prime

_C = defines()   # bpf/zfast_shared.h: what the program is compiled with unless told

# Also core.balancer.flow_table's (zfast/config/core.py): the core writes that into each
# balancer's datapath section.
FLOW_TABLE = kinds.Integer(1024)


@dataclass(frozen=True)
class Datapath:
    maglev_size: int = setting(
        kinds.Refined(kinds.Integer(3, 2**24), is_prime,
                      lambda size: f"is not a prime number (the next prime is {next_prime(size)})",
                      "prime"),
        default=_C["ZF_RING_SIZE"], doc="slots per Maglev table; prime")
    flow_table: int = setting(FLOW_TABLE, default=_C["ZF_FLOW_TABLE"],
                              doc="LRU flow entries (two per connection)")
    max_services: int = setting(kinds.Integer(1), default=_C["ZF_MAX_SERVICES"], doc="services")
    max_backends: int = setting(kinds.Integer(1), default=_C["ZF_MAX_BACKENDS"],
                                doc="backends over all services")
    max_ifindex: int = setting(kinds.Integer(1), default=_C["ZF_MAX_IFINDEX"],
                               doc="devmap slots (interface indices)")
    max_public_ports: int = setting(
        kinds.Integer(2), default=_C["ZF_MAX_PUBLIC_PORTS"],
        doc="public ports with a firewall (slot 0 is the project-wide list)")
    max_rules: int = setting(kinds.Integer(16), default=_C["ZF_MAX_RULES"],
                             doc="firewall CIDR rules, all ports together")
    rate_table: int = setting(kinds.Integer(1024), default=_C["ZF_RATE_TABLE"],
                              doc="sources the new-connection rate limit tracks (LRU)")
    # Not a size: a flow with no client packet for this long leaves the table (swept every
    # flow_idle_s / 2; 0: never). Established flows come back by Maglev's hash if they wake.
    flow_idle_s: int = setting(
        kinds.Refined(kinds.Integer(0, 86400 * 7), lambda idle: not 0 < idle < 2,
                      "is too short (0 for never, else >= 2)", "0 or at least 2"),
        default=300,
        doc="not a size: a flow with no client packet for this long leaves the table "
            "(0: never); an established flow that wakes later is balanced again by Maglev's "
            "hash (the same backend while the backends are the same)")


SIZE_FIELDS = ("maglev_size", "flow_table", "max_services", "max_backends", "max_ifindex",
               "max_public_ports", "max_rules", "rate_table")   # what the compiled program and its maps depend on


def read_datapath(problems: Problems, path: str, value: Any) -> Datapath:
    values = Reader(problems, path, value, Datapath).read_all()
    defaults = Datapath()
    # An invalid size is reported; the checks that use it fall back to the default.
    return Datapath(**{name: getattr(defaults, name) if size is None else size
                       for name, size in values.items()})
