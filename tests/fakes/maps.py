"""One map of the fake data plane: BCC's table interface (bcc/table.py) over bytes.

What the control plane relies on behaves as BCC's classes over a kernel map do: Key and
Leaf are the C structs' ctypes classes; an array has every slot (zeroed until written,
IndexError beyond max_entries, `del` zeroes the slot); a hash or LPM trie map raises
KeyError for a key it does not hold; a per-CPU array's Leaf is one value per CPU; a
value read is a copy (writing it back is what changes the map). A key or value whose size
is not the C struct's is refused: that is a layout bug, however the bytes would land.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import MutableMapping

ARRAYS = ("array", "percpu_array")
SPARSE = ("hash", "lru_hash", "lpm_trie", "array_of_maps")


class FakeMap(MutableMapping):
    def __init__(self, name: str, kind: str, key: type, leaf: type, max_entries: int,
                 cpus: int = 2):
        if kind not in ARRAYS + SPARSE:
            raise ValueError(f"map {name}: no fake for map type {kind!r}")
        self.name, self.kind, self.max_entries = name, kind, max_entries
        self.Key = key
        self.sLeaf = leaf                                    # one CPU's value, as BCC names it
        self.Leaf = leaf * cpus if kind == "percpu_array" else leaf
        self.data: dict[bytes, bytes] = {}                   # key bytes -> value bytes
        self.writes = 0                                      # entries written, any way

    # -- keys and values as bytes

    def _key(self, key) -> bytes:
        if isinstance(key, int) and self.kind in ARRAYS + ("array_of_maps",):
            key = self.Key(key)
        if not isinstance(key, ctypes._SimpleCData | ctypes.Structure | ctypes.Array):
            raise TypeError(f"map {self.name}: a key is a ctypes value, not {type(key).__name__}")
        raw = bytes(key)
        if len(raw) != ctypes.sizeof(self.Key):
            raise TypeError(f"map {self.name}: a {len(raw)}-byte key, the C key has "
                            f"{ctypes.sizeof(self.Key)}")
        if self.kind not in ("hash", "lru_hash", "lpm_trie"):
            index = int.from_bytes(raw, "little")
            if index >= self.max_entries:
                raise IndexError(f"map {self.name}: index {index} of {self.max_entries}")
        return raw

    def _value(self, value) -> bytes:
        if isinstance(value, int) and issubclass(self.Leaf, ctypes._SimpleCData):
            value = self.Leaf(value)
        raw = bytes(value)
        if len(raw) != ctypes.sizeof(self.Leaf):
            raise TypeError(f"map {self.name}: a {len(raw)}-byte value, the C value has "
                            f"{ctypes.sizeof(self.Leaf)}")
        return raw

    # -- the mapping

    def __getitem__(self, key):
        raw = self._key(key)
        if raw in self.data:
            return self.Leaf.from_buffer_copy(self.data[raw])
        if self.kind in ARRAYS:
            return self.Leaf()
        raise KeyError(key)

    def __setitem__(self, key, value) -> None:
        raw, leaf = self._key(key), self._value(value)
        if raw not in self.data and self.kind in SPARSE and len(self.data) >= self.max_entries:
            if self.kind != "lru_hash":
                raise OSError(errno.E2BIG, f"map {self.name} is full ({self.max_entries})")
            del self.data[next(iter(self.data))]             # the least recently added
        self.data[raw] = leaf
        self.writes += 1

    def __delitem__(self, key) -> None:
        raw = self._key(key)
        if self.kind in ARRAYS:
            self.data.pop(raw, None)                          # as BCC's clearitem: zeroed
        elif self.data.pop(raw, None) is None:
            raise KeyError(key)

    def __iter__(self):
        if self.kind in ARRAYS:
            return (self.Key(i) for i in range(self.max_entries))
        return (self.Key.from_buffer_copy(k) for k in list(self.data))

    def __len__(self) -> int:
        return self.max_entries if self.kind in ARRAYS else len(self.data)

    def clear(self) -> None:
        self.data.clear()

    # -- BCC's extras the control plane uses

    def getvalue(self, key):
        return self[key]

    def items_update_batch(self, keys, values) -> None:
        for k, v in zip(keys, values, strict=True):
            self[k] = v

    def items_delete_batch(self, keys) -> None:
        for k in keys:
            del self[k]

    def raw(self) -> dict[bytes, bytes]:
        """{key bytes: value bytes} of the entries written (an array's other slots are zero)."""
        return dict(self.data)
