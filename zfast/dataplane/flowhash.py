"""The data plane's flow hash, in Python: which Maglev slot (so which backend) a new flow gets.

The twin of zf_flow_hash() in bpf/flows.h, fields read as the data plane loads
them (addresses as 32-bit little-endian words of the wire bytes, ports in
network order). The packet tests check the two agree flow for flow; the
end-to-end tests use it as the oracle of where each connection must land.
"""

from __future__ import annotations

import ipaddress
import socket

from zfast.dataplane.reasons import defines

_M = 0xFFFFFFFF   # arithmetic modulo 2**32, as the C side's __u32
_C = defines()    # the seed and murmur3's constants, from bpf/zfast_shared.h
SEED, C1, C2, N = _C["ZF_HASH_SEED"], _C["ZF_MURMUR_C1"], _C["ZF_MURMUR_C2"], _C["ZF_MURMUR_N"]
F1, F2 = _C["ZF_MURMUR_F1"], _C["ZF_MURMUR_F2"]


def _mix(h: int, v: int) -> int:
    """murmur3's mixing step, as zf_mix()."""
    v = (v * C1) & _M
    v = ((v << 15) | (v >> 17)) & _M
    v = (v * C2) & _M
    h ^= v
    h = ((h << 13) | (h >> 19)) & _M
    return (h * 5 + N) & _M


def _words(address: str) -> list[int]:
    raw = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP) -> int:
    h = SEED
    for s, d in zip(_words(src), _words(dst)):
        h = _mix(_mix(h, s), d)
    h = _mix(h, ((_be16(sport) << 16) | _be16(dport)) & _M)
    h = _mix(h, proto)
    h ^= h >> 16
    h = (h * F1) & _M
    h ^= h >> 13
    h = (h * F2) & _M
    return h ^ (h >> 16)
