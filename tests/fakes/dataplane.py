"""FakeDataplane: what zfast.dataplane.loader.Loaded gives the control plane (ServiceTable,
FirewallTable, the pair's takeover, ...), over FakeMaps instead of kernel maps.

Every ZF_MAP of bpf/maps.h is there, with its C key and value (tests/fakes/cstructs.py)
and the max_entries a compile with these sizes gives it (zfast.dataplane.loader.map_sizes,
the header's defaults for the others). The Maglev rings, inner maps in the kernel, are
arrays kept here; rings[ring] holds a made-up id for each.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from tests.fakes.cstructs import c_type, map_decls
from tests.fakes.maps import FakeMap
from zfast import config
from zfast.dataplane.loader import Loaded, map_sizes
from zfast.dataplane.reasons import defines, reasons


def max_entries(size: str, sizes: config.Datapath) -> int:
    """maps.h's size expression (ZF_* constants and numbers, multiplied) for these sizes."""
    known = {**defines(), "ZF_RING_SIZE": sizes.maglev_size, "ZF_REASON_MAX": len(reasons())}
    out = 1
    for term in size.split("*"):
        term = term.strip()
        out *= int(term) if term.isdigit() else known[term]
    return out


class FakeDataplane:
    def __init__(self, sizes: config.Datapath | None = None, cpus: int = 2):
        self.sizes = sizes or config.Datapath()
        self.cpus = cpus
        sized = map_sizes(self.sizes)
        self.maps = {d.name: FakeMap(d.name, d.kind, c_type(d.key), c_type(d.value),
                                     sized.get(d.name) or max_entries(d.size, self.sizes), cpus)
                     for d in map_decls().values()}
        self.rings: dict[int, np.ndarray] = {}      # ring number -> backend slot per ring slot
        self.ring_writes = 0                        # rings made by write_ring
        self.batch_writes = 0                       # entries written by update_batch
        self._next_ring_id = 1
        self._config_lock = threading.Lock()

    # ---- maps, as Loaded has them

    def table(self, name: str) -> FakeMap:
        return self.maps[name]

    def percpu_sum(self, name: str, index: int) -> tuple[int, int]:
        table = self.table(name)
        values = table.getvalue(table.Key(index))
        return sum(v.packets for v in values), sum(v.bytes for v in values)

    def percpu_all(self, name: str, count: int) -> np.ndarray:
        out = np.zeros((count, 2), dtype=np.uint64)
        for i in range(count):
            out[i] = self.percpu_sum(name, i)
        return out

    def reason_counters(self) -> dict[str, tuple[int, int]]:
        counts = self.percpu_all("reason_stats", len(reasons()))
        return {r.name: (int(counts[r.index, 0]), int(counts[r.index, 1])) for r in reasons()}

    # The product's own: they only need table("config") and the lock.
    update_config = Loaded.update_config
    config = Loaded.config

    def update_batch(self, name: str, keys: np.ndarray, values: np.ndarray) -> None:
        """As Loaded.update_batch: numpy arrays laid out like Key and Leaf. Arrays of
        another item size are refused (Loaded would read them as if they had the C
        layout)."""
        table = self.table(name)
        n = len(keys)
        if n == 0:
            return
        for array, ctype, what in ((keys, table.Key, "keys"), (values, table.Leaf, "values")):
            if len(array) != n or array.itemsize != ctypes.sizeof(ctype):
                raise ValueError(f"map {name}: {len(array)} {what} of {array.itemsize} bytes, "
                                 f"{n} of {ctypes.sizeof(ctype)} expected")
        table.items_update_batch((table.Key * n).from_buffer(keys),
                                 (table.Leaf * n).from_buffer(values))
        self.batch_writes += n

    def delete_batch(self, name: str, keys: np.ndarray) -> None:
        """As Loaded.delete_batch, but strict: a key the map does not hold raises KeyError
        (Loaded lets it pass; the control plane deleting what it never wrote is a bug)."""
        table = self.table(name)
        n = len(keys)
        if n == 0:
            return
        if keys.itemsize != ctypes.sizeof(table.Key):
            raise ValueError(f"map {name}: keys of {keys.itemsize} bytes, "
                             f"{ctypes.sizeof(table.Key)} expected")
        table.items_delete_batch((table.Key * n).from_buffer(keys))

    # ---- Maglev rings

    def write_ring(self, ring: int, backend_ids: np.ndarray) -> None:
        size = self.sizes.maglev_size
        if len(backend_ids) != size:
            raise ValueError(f"a ring has {size} slots, got {len(backend_ids)}")
        self.table("rings")[ctypes.c_uint32(ring)] = ctypes.c_int(self._next_ring_id)
        self._next_ring_id += 1
        self.rings[ring] = np.asarray(backend_ids, dtype=np.uint32).copy()
        self.ring_writes += 1

    def clear_ring(self, ring: int) -> None:
        try:
            del self.table("rings")[ctypes.c_uint32(ring)]
        except KeyError:
            pass
        self.rings.pop(ring, None)

    def read_ring(self, ring: int) -> np.ndarray | None:
        ring_array = self.rings.get(ring)
        return None if ring_array is None else ring_array.copy()
