"""The idle-flow sweep: flows with no packet for a while leave the flow table.

The table is an LRU hash, so it never overflows; but without a sweep it also never
empties, and its fill says nothing about the load (the scaling controller reads it to size
the table). The data plane marks an entry SEEN on a packet (bpf/zfast.c, one write a
sweep period at most); every ``flow_idle_s / 2`` this sweep turns SEEN into nothing and
nothing into AGED, and deletes a forward entry still AGED with its reply entry. So a flow
leaves between one and one and a half idle periods after its last client packet; one that
wakes up later is balanced again by Maglev's hash, to the same backend while the backends
are the same. Reply entries whose forward entry is gone (evicted) age the same way.

The whole table is read and written with batch syscalls and numpy: a million entries
take about a second of one CPU.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import sys
from types import SimpleNamespace

import numpy as np

SEEN, AGED = 1, 2          # bpf/zfast_shared.h ZF_FLOW_SEEN / ZF_FLOW_AGED
FORWARD, REPLY = 1, 2      # ZF_DIR_*
CHUNK = 8192


def _read_all(fd: int, key_size: int, value_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (key, value) of a hash map, as two uint8 arrays of rows."""
    from zfast.mapbatch import lookup_batches
    keys_out, vals_out = [], []
    for keys, values, n in lookup_batches(fd, key_size, value_size, CHUNK):
        keys_out.append(np.frombuffer(keys, np.uint8).reshape(n, key_size))
        vals_out.append(np.frombuffer(values, np.uint8).reshape(n, value_size))
    return (np.concatenate(keys_out) if keys_out else np.zeros((0, key_size), np.uint8),
            np.concatenate(vals_out) if vals_out else np.zeros((0, value_size), np.uint8))


def _batched(fn, fd: int, *arrays: np.ndarray) -> None:
    for i in range(0, len(arrays[0]), CHUNK):
        parts = [np.ascontiguousarray(a[i:i + CHUNK]) for a in arrays]
        count = ct.c_uint32(len(parts[0]))
        fn(fd, *[p.ctypes.data for p in parts], ct.byref(count))


KEY_FIELDS = ("src", "dst", "sport", "dport", "proto", "family")
VALUE_FIELDS = ("addr", "port", "dir", "flags")


def layout_of(table) -> dict:
    """Sizes and field offsets of a BCC flows table (from its Key/Leaf ctypes), as JSON."""
    return {"key_size": ct.sizeof(table.Key), "value_size": ct.sizeof(table.Leaf),
            "key": {f: getattr(table.Key, f).offset for f in KEY_FIELDS},
            "value": {f: getattr(table.Leaf, f).offset for f in VALUE_FIELDS}}


class _Fields:
    """Offsets by name, read like ctypes fields: fields.src.offset."""

    def __init__(self, offsets: dict):
        for name, offset in offsets.items():
            setattr(self, name, SimpleNamespace(offset=offset))


def sweep(table) -> dict:
    """One sweep of a BCC flows table, in this process."""
    return sweep_fd(table.map_fd, layout_of(table))


def sweep_fd(fd: int, layout: dict) -> dict:
    """One sweep of the flows map behind fd."""
    from zfast.bpflib import lib
    Key, Leaf = _Fields(layout["key"]), _Fields(layout["value"])
    ks, vs = layout["key_size"], layout["value_size"]
    keys, vals = _read_all(fd, ks, vs)
    if not len(keys):
        return {"entries": 0, "aged": 0, "deleted": 0}
    flags = vals[:, Leaf.flags.offset]
    direction = vals[:, Leaf.dir.offset]
    seen, aged = (flags & SEEN) != 0, (flags & AGED) != 0
    idle = aged & ~seen
    gone_fwd = idle & (direction == FORWARD)

    k, v = Key, Leaf
    a, port, fam = v.addr.offset, v.port.offset, k.family.offset

    def swap(rows_k, rows_v, reply_from_forward: bool) -> np.ndarray:
        """The key of the other direction's entry (flows.h zf_flow_new builds them so)."""
        out = np.zeros((len(rows_k), ks), np.uint8)
        if reply_from_forward:   # reply: backend -> client
            out[:, k.src.offset:k.src.offset + 16] = rows_v[:, a:a + 16]
            out[:, k.dst.offset:k.dst.offset + 16] = rows_k[:, k.src.offset:k.src.offset + 16]
            out[:, k.sport.offset:k.sport.offset + 2] = rows_v[:, port:port + 2]
            out[:, k.dport.offset:k.dport.offset + 2] = rows_k[:, k.sport.offset:k.sport.offset + 2]
        else:                    # forward: client -> VIP
            out[:, k.src.offset:k.src.offset + 16] = rows_k[:, k.dst.offset:k.dst.offset + 16]
            out[:, k.dst.offset:k.dst.offset + 16] = rows_v[:, a:a + 16]
            out[:, k.sport.offset:k.sport.offset + 2] = rows_k[:, k.dport.offset:k.dport.offset + 2]
            out[:, k.dport.offset:k.dport.offset + 2] = rows_v[:, port:port + 2]
        out[:, k.proto.offset] = rows_k[:, k.proto.offset]
        out[:, fam] = rows_k[:, fam]
        return out

    def as_rows(arr: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(arr).view(f"V{ks}").ravel()

    # Reply entries of forward entries that go, if they are there (a batch delete stops at
    # the first missing key).
    rkeys = swap(keys[gone_fwd], vals[gone_fwd], True)
    rkeys = rkeys[np.isin(as_rows(rkeys), as_rows(keys[direction == REPLY]))]
    # Reply entries whose forward entry is gone (evicted, or going now) go when idle too.
    cand = idle & (direction == REPLY)
    orphan = np.zeros(len(keys), bool)
    if cand.any():
        alive_fwd = as_rows(keys[(direction == FORWARD) & ~gone_fwd])
        orphan[cand] = ~np.isin(as_rows(swap(keys[cand], vals[cand], False)), alive_fwd)

    delete = np.concatenate([keys[gone_fwd | orphan], rkeys])
    if len(delete):
        delete = np.unique(delete, axis=0)
        _batched(lambda fd, kp, cp: lib.bpf_delete_batch(fd, kp, cp), fd, delete)
    # Everything else ages one step; only changed entries are written.
    stay = ~(gone_fwd | orphan)
    change = stay & (seen | ~aged)
    if change.any():
        new_vals = vals[change].copy()
        f = new_vals[:, Leaf.flags.offset]
        new_vals[:, Leaf.flags.offset] = np.where((f & SEEN) != 0, f & np.uint8(0xff ^ (SEEN | AGED)), f | AGED)
        # (an entry the data plane deleted meanwhile, a firewall denial, comes back aged:
        # the next sweep removes it)
        _batched(lambda fd, kp, vp, cp: lib.bpf_update_batch(fd, kp, vp, cp), fd,
                 keys[change], new_vals)
    return {"entries": int(len(keys)), "aged": int(change.sum()),
            "deleted": int(len(delete))}


def main() -> None:
    """`python -m zfast.flowage LAYOUT_JSON PINNED_MAP`: a sweeper process of its own.

    The daemon runs the sweep here, not in its own process: a quarter of a million entries
    take ~0.5 s of numpy work, and in the daemon's process that would hold the GIL
    (heartbeats, the API) that long. One sweep per line read ("sweep"), one JSON line back."""
    from zfast.bpflib import lib
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
