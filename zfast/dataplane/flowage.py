"""The idle-flow sweep: flows with no packet for a while leave the flow table.

The table is an LRU hash, so it never overflows; but without a sweep it also never
empties, and its fill says nothing about the load (the scaling controller reads it to size
the table). The data plane marks an entry SEEN on a packet (bpf/zfast.c, one write a
sweep period at most); every ``flow_idle_s / 2`` this sweep turns SEEN into nothing and
nothing into AGED, and deletes a forward entry still AGED with its reply entry. So a flow
leaves between one and one and a half idle periods after its last client packet; one that
wakes up later is balanced again by Maglev's hash, to the same backend while the backends
are the same. Reply entries whose forward entry is gone (evicted) age the same way.

The whole table is read and written with batch syscalls, and the per-entry work is
plain Python over the packed rows (no numpy: the sweeper is a process of its own, and
without numpy it holds ~11 MiB, not ~28): a million entries take about a second of one
CPU, 65536 about 60 ms.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import sys

from zfast.dataplane.bpflib import lib
from zfast.dataplane.mapbatch import read_all
from zfast.dataplane.reasons import defines

_C = defines()             # bpf/zfast_shared.h
SEEN, AGED = _C["ZF_FLOW_SEEN"], _C["ZF_FLOW_AGED"]
FORWARD, REPLY = _C["ZF_DIR_FORWARD"], _C["ZF_DIR_REPLY"]
CHUNK = 8192

# a sweep's new flags: SEEN (and AGED) cleared on an entry a packet saw, AGED set on the others
AGE_STEP = bytes((f & (0xFF ^ (SEEN | AGED))) if f & SEEN else (f | AGED) for f in range(256))


def _batched(fn, fd: int, sizes: tuple[int, ...], *packed: bytes) -> None:
    """fn(fd, *buffers, &count) over CHUNK rows at a time of packed rows of these sizes."""
    rows = len(packed[0]) // sizes[0]
    for i in range(0, rows, CHUNK):
        n = min(CHUNK, rows - i)
        parts = [ct.create_string_buffer(buf[i * size:(i + n) * size], n * size)
                 for buf, size in zip(packed, sizes)]
        count = ct.c_uint32(n)
        fn(fd, *parts, ct.byref(count))


KEY_FIELDS = ("src", "dst", "sport", "dport", "proto", "family")
VALUE_FIELDS = ("addr", "port", "dir", "flags")


def layout_of(table) -> dict:
    """Sizes and field offsets of a BCC flows table (from its Key/Leaf ctypes), as JSON."""
    return {"key_size": ct.sizeof(table.Key), "value_size": ct.sizeof(table.Leaf),
            "key": {f: getattr(table.Key, f).offset for f in KEY_FIELDS},
            "value": {f: getattr(table.Leaf, f).offset for f in VALUE_FIELDS}}


def sweep(table) -> dict:
    """One sweep of a BCC flows table, in this process."""
    return sweep_fd(table.map_fd, layout_of(table))


class _Swap:
    """The key of a flow's other direction, as bpf/flows.h zf_flow_new makes the pair:
    forward client -> VIP, reply backend -> client (the value holds the other end)."""

    def __init__(self, layout: dict):
        k, v = layout["key"], layout["value"]
        self.size = layout["key_size"]
        self.src, self.dst, self.sport, self.dport = k["src"], k["dst"], k["sport"], k["dport"]
        self.proto, self.family = k["proto"], k["family"]
        self.addr, self.port = v["addr"], v["port"]

    def other(self, key: bytes, value: bytes, reply_from_forward: bool) -> bytes:
        out = bytearray(self.size)
        s, d, sp, dp, a, p = self.src, self.dst, self.sport, self.dport, self.addr, self.port
        if reply_from_forward:   # reply: backend -> client
            out[s:s + 16] = value[a:a + 16]
            out[d:d + 16] = key[s:s + 16]
            out[sp:sp + 2] = value[p:p + 2]
            out[dp:dp + 2] = key[sp:sp + 2]
        else:                    # forward: client -> VIP
            out[s:s + 16] = key[d:d + 16]
            out[d:d + 16] = value[a:a + 16]
            out[sp:sp + 2] = key[dp:dp + 2]
            out[dp:dp + 2] = value[p:p + 2]
        out[self.proto] = key[self.proto]
        out[self.family] = key[self.family]
        return bytes(out)


def sweep_fd(fd: int, layout: dict) -> dict:
    """One sweep of the flows map behind fd."""
    ks, vs = layout["key_size"], layout["value_size"]
    keys, vals, n = read_all(fd, ks, vs, CHUNK)
    if not n:
        return {"entries": 0, "aged": 0, "deleted": 0}
    flags = vals[layout["value"]["flags"]::vs]
    dirs = vals[layout["value"]["dir"]::vs]
    swap = _Swap(layout)

    def key(i: int) -> bytes:
        return keys[i * ks:(i + 1) * ks]

    def value(i: int) -> bytes:
        return vals[i * vs:(i + 1) * vs]

    gone_fwd, idle_reply, change = [], [], []
    for i, (f, d) in enumerate(zip(flags, dirs)):
        if f & AGED and not f & SEEN:                   # idle for a whole period
            if d == FORWARD:
                gone_fwd.append(i)
            elif d == REPLY:
                idle_reply.append(i)
        else:
            change.append(i)                            # ages one step
    delete: set[bytes] = set()
    if gone_fwd:
        # a forward entry that goes takes its reply entry, if it is there (a batch delete
        # stops at the first missing key)
        replies = {key(i) for i, d in enumerate(dirs) if d == REPLY}
        for i in gone_fwd:
            delete.add(key(i))
            reply = swap.other(key(i), value(i), True)
            if reply in replies:
                delete.add(reply)
    if idle_reply:
        # a reply entry whose forward entry is gone (evicted, or going now) goes when idle too
        alive = {key(i) for i, d in enumerate(dirs) if d == FORWARD} - delete
        for i in idle_reply:
            if swap.other(key(i), value(i), False) not in alive:
                delete.add(key(i))
    if delete:
        _batched(lambda fd, kp, cp: lib.bpf_delete_batch(fd, kp, cp), fd, (ks,),
                 b"".join(sorted(delete)))
        change = [i for i in change if key(i) not in delete]   # a reply going with its flow
    if change:
        # only changed entries are written: everything else ages one step (an entry the
        # data plane deleted meanwhile, a firewall denial, comes back aged: the next sweep
        # removes it)
        aged = bytearray(vals)
        aged[layout["value"]["flags"]::vs] = flags.translate(AGE_STEP)
        if len(change) == n:
            new_keys, new_vals = keys, bytes(aged)
        else:
            new_keys = b"".join(keys[i * ks:(i + 1) * ks] for i in change)
            new_vals = b"".join(aged[i * vs:(i + 1) * vs] for i in change)
        _batched(lambda fd, kp, vp, cp: lib.bpf_update_batch(fd, kp, vp, cp), fd, (ks, vs),
                 new_keys, new_vals)
    return {"entries": n, "aged": len(change), "deleted": len(delete)}


def main() -> None:
    """`python -m zfast.dataplane.flowage LAYOUT_JSON PINNED_MAP`: a sweeper process of its own.

    The daemon runs the sweep here, not in its own process: a quarter of a million entries
    take ~0.3 s of Python, and in the daemon's process that would hold the GIL
    (heartbeats, the API) that long. One sweep per line read ("sweep"), one JSON line back."""
    layout, path = json.loads(sys.argv[1]), sys.argv[2]
    for line in sys.stdin:
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            print(json.dumps({"error": f"{path}: cannot open the pinned map"}), flush=True)
            continue
        try:
            print(json.dumps(sweep_fd(fd, layout)), flush=True)
        except OSError as err:
            print(json.dumps({"error": str(err)}), flush=True)
        finally:
            os.close(fd)


if __name__ == "__main__":
    main()
