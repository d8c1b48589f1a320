"""The data plane's C structs and maps, read from the sources that define them.

bpf/zfast_shared.h holds every struct the maps use; bpf/maps.h declares each map with
ZF_MAP(type, key, value, name, size). Both are simple enough to read with a few regular
expressions: scalar fields of the kernel's fixed-width types, arrays of them, nested
structs. The ctypes classes made here lay fields out as the C compiler does (natural
alignment), which tests/bpf/test_layouts.py checks against BCC's classes of a compile.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from functools import lru_cache

from zfast.dataplane.reasons import defines
from zfast.paths import bpf_dir

SCALARS = {
    "__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
    "__u64": ctypes.c_uint64, "__be16": ctypes.c_uint16, "__be32": ctypes.c_uint32,
    "__be64": ctypes.c_uint64, "__s32": ctypes.c_int32, "u8": ctypes.c_uint8,
    "u16": ctypes.c_uint16, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64, "int": ctypes.c_int,
}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_STRUCT = re.compile(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", re.S)
_FIELD = re.compile(r"^(struct\s+\w+|\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?$")
_MAP = re.compile(r'^ZF_MAP(?:_F)?\(\s*"([^"]+)"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*(\w+)\s*,'
                  r'\s*([^,)]+?)\s*[,)]', re.M)


def _source(name: str) -> str:
    return _COMMENT.sub(" ", (bpf_dir() / name).read_text())


@lru_cache(maxsize=None)
def structs() -> dict[str, type[ctypes.Structure]]:
    """{C struct name: ctypes class} of every struct in zfast_shared.h, in header order
    (a struct may use those before it)."""
    out: dict[str, type[ctypes.Structure]] = {}
    consts = defines()
    for name, body in _STRUCT.findall(_source("zfast_shared.h")):
        fields = []
        for decl in filter(None, (d.strip() for d in body.split(";"))):
            m = _FIELD.match(" ".join(decl.split()))
            if not m:
                raise ValueError(f"struct {name}: cannot read the field {decl!r}")
            ctype = c_type(m.group(1), out)
            if m.group(3):
                count = m.group(3)
                ctype = ctype * (int(count) if count.isdigit() else consts[count])
            fields.append((m.group(2), ctype))
        out[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return out


def c_type(spelled: str, known: dict | None = None):
    """The ctypes type of a C type as the sources spell it: `struct flow_key`, `__u32`."""
    if spelled.startswith("struct "):
        return (structs() if known is None else known)[spelled.split()[1]]
    return SCALARS[spelled]


@dataclass(frozen=True)
class MapDecl:
    name: str
    kind: str          # hash, lru_hash, lpm_trie, array, percpu_array, array_of_maps
    key: str           # the C types as maps.h spells them
    value: str
    size: str          # max_entries: a number, a ZF_* constant or a product of them


@lru_cache(maxsize=None)
def map_decls() -> dict[str, MapDecl]:
    """{name: MapDecl} of every ZF_MAP in bpf/maps.h (the ring buffer and the devmap,
    declared by BCC's own macros, are not among them)."""
    return {name: MapDecl(name, kind.split("$")[0], key, value, size)
            for kind, key, value, name, size in _MAP.findall(_source("maps.h"))}


def view_mismatches(dtype, cls) -> list[str]:
    """How a numpy structured dtype (a view of a C struct the product writes through)
    differs from the ctypes class of that struct, field by field: a C field (BCC's
    __pad_* fields aside) the view lacks or has at another offset or of another size, a
    field of the view the struct lacks (unless it is padding, pad*), another total size.
    Empty when they agree."""
    c = {name: (getattr(cls, name).offset, getattr(cls, name).size)
         for name, *_ in cls._fields_ if not name.startswith("__pad")}
    view = {name: (dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names}
    wrong = [f"{name}: (offset, size) {c[name]} in C, {view.get(name)} in the view"
             for name in c if view.get(name) != c[name]]
    wrong += [f"{name}: not in the C struct" for name in view
              if name not in c and not name.startswith("pad")]
    if ctypes.sizeof(cls) != dtype.itemsize:
        wrong.append(f"{ctypes.sizeof(cls)} bytes in C, {dtype.itemsize} in the view")
    return wrong
