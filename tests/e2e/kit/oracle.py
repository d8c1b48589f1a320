"""The backend a new flow must reach: bpf/flows.h's hash of its 5-tuple into the service's
Maglev table (zfast.reconcile.maglev), computed here as the data plane does."""

from __future__ import annotations

import socket
from functools import lru_cache

from zfast.dataplane.flowhash import flow_hash as _flow_hash
from zfast.reconcile import maglev


def flow_hash(src: str, sport: int, dst: str, dport: int, proto: int = socket.IPPROTO_TCP) -> int:
    """bpf/flows.h zf_flow_hash() of a packet's 5-tuple (zfast.dataplane.flowhash, argument
    order of this module's callers)."""
    return _flow_hash(src, dst, sport, dport, proto)


@lru_cache(maxsize=16)
def _table(backends: tuple[tuple[str, int], ...], size: int) -> tuple:
    return tuple(maglev.build_table(list(backends), size).tolist())


def expected_backend(backends: list[tuple[str, int]], src: str, sport: int, vip: str,
                     dport: int, size: int = maglev.DEFAULT_SIZE) -> str:
    """The address a new flow must reach, given the service's (address, weight) list."""
    live = tuple((a, w) for a, w in backends if w > 0)
    table = _table(live, size)
    return live[table[flow_hash(src, sport, vip, dport) % size]][0]
