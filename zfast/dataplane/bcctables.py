"""BCC's own table classes (bcc/table.py) over map fds, without loading libbcc.so.0.

bcc/table.py calls a handful of libbcc functions: the map syscalls (in libbcc_bpf.so.0 as
well, see zfast.dataplane.bpflib) and ``bpf_table_*_id(module, map_id)``, which ask the compiled
module about a map. Here table.py is loaded from BCC's installed package under a private
name, with a ``libbcc`` of our own beside it: the syscalls go to libbcc_bpf, and the
module questions are answered from the map definitions a cache entry recorded
(`ModuleInfo`). A table is then exactly BCC's class (HashTable, PerCpuArray, DevMap,
RingBuf, ...): indexing, iteration, batches and per-CPU values behave as after a compile.

Nothing here is imported by ``import bcc``, nor imports it: a process that also compiles
(a cache miss) has both, and they do not share state.
"""

from __future__ import annotations

import ctypes as ct
import importlib.util
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from zfast.dataplane import bpflib

_PACKAGE = "zfast._bcc_nollvm"


@dataclass
class MapDef:
    name: str              # BCC's table name (the C identifier)
    type: int              # BPF_MAP_TYPE_*
    key_size: int
    value_size: int
    max_entries: int
    flags: int             # as the source declares them: what the map is created with
    kernel_flags: int      # as the kernel reports them (it adds some: a devmap's RDONLY_PROG)
    key_desc: str          # BCC's JSON type descriptions (bpf_table_key_desc)
    leaf_desc: str
    pin: str | None = None  # its name in the pin dir, when the map is pinned
    btf_key: int = 0       # BTF type ids of key and value in the entry's BTF (0: none)
    btf_value: int = 0
    inner: str | None = None  # a map of maps: the map of the entry its inner maps are like


class ModuleInfo:
    """What bcc/table.py asks the compiled module (``bpf.module``), answered from MapDefs."""

    def __init__(self, maps: list[MapDef]):
        self.maps = maps


class _Lib:
    """The ``lib`` bcc/table.py imports: libbcc_bpf, plus the module questions."""

    def __getattr__(self, name):
        return getattr(bpflib.lib, name)

    @staticmethod
    def bpf_table_type_id(module: ModuleInfo, map_id: int) -> int:
        return module.maps[map_id].type

    @staticmethod
    def bpf_table_flags_id(module: ModuleInfo, map_id: int) -> int:
        return module.maps[map_id].flags

    @staticmethod
    def bpf_table_max_entries_id(module: ModuleInfo, map_id: int) -> int:
        return module.maps[map_id].max_entries

    # printing and parsing keys as text needs the compiler's type information
    @staticmethod
    def bpf_table_key_snprintf(*args) -> int:
        return -1

    bpf_table_leaf_snprintf = bpf_table_key_sscanf = bpf_table_leaf_sscanf = bpf_table_key_snprintf

    @staticmethod
    def bpf_perf_event_fields(*args) -> int:
        return 0


class bcc_perf_buffer_opts(ct.Structure):
    _fields_ = [("pid", ct.c_int), ("cpu", ct.c_int), ("wakeup_events", ct.c_int)]


_table = None


def bcc_dir() -> Path:
    """Where BCC's Python package is installed, found without importing it."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("BCC's Python module is missing (Debian's python3-bpfcc)")
    return Path(list(spec.submodule_search_locations)[0])


def bcc_version() -> str:
    """BCC's version (bcc/version.py), without importing bcc; "none" without BCC (a miss
    then fails, in its import, with the message that says what to install)."""
    try:
        text = (bcc_dir() / "version.py").read_text()
    except (ImportError, OSError):
        return "none"
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return m.group(1) if m else "unknown"


def table_module() -> types.ModuleType:
    """bcc/table.py, loaded once over our libbcc."""
    global _table
    if _table is not None:
        return _table
    where = bcc_dir()
    package = types.ModuleType(_PACKAGE)
    package.__path__ = []           # a namespace of its own: nothing else is found in it
    libbcc = types.ModuleType(_PACKAGE + ".libbcc")
    libbcc.lib = _Lib()
    libbcc._RAW_CB_TYPE = ct.CFUNCTYPE(None, ct.py_object, ct.c_void_p, ct.c_int)
    libbcc._LOST_CB_TYPE = ct.CFUNCTYPE(None, ct.py_object, ct.c_ulonglong)
    libbcc._RINGBUF_CB_TYPE = bpflib.RINGBUF_CB_TYPE
    libbcc.bcc_perf_buffer_opts = bcc_perf_buffer_opts
    saved = {name: sys.modules.get(name) for name in (_PACKAGE, libbcc.__name__)}
    sys.modules[_PACKAGE] = package
    sys.modules[libbcc.__name__] = libbcc
    try:
        loaded = {}
        for name in ("utils", "table"):   # table.py imports .libbcc and .utils
            spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}", where / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
    except BaseException:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
        for name in ("utils", "table"):
            sys.modules.pop(f"{_PACKAGE}.{name}", None)
        raise
    _table = loaded["table"]
    return _table


# ---- BCC's JSON type descriptions -> ctypes -------------------------------------------------

_SCALARS = {
    "_Bool": ct.c_bool, "char": ct.c_char, "wchar_t": ct.c_wchar,
    "unsigned char": ct.c_ubyte, "short": ct.c_short, "unsigned short": ct.c_ushort,
    "int": ct.c_int, "unsigned int": ct.c_uint, "long": ct.c_long, "unsigned long": ct.c_ulong,
    "long long": ct.c_longlong, "unsigned long long": ct.c_ulonglong,
    "float": ct.c_float, "double": ct.c_double, "long double": ct.c_longdouble,
    "__int128": ct.c_int64 * 2, "unsigned __int128": ct.c_uint64 * 2,
}
_KINDS = ("struct", "struct_packed", "union")


def decode_type(desc):
    """A ctypes type from BCC's description of a C type (what bcc.BPF builds Key/Leaf from).

    A description is a scalar's name, or [name, [field, ...], kind] with kind struct,
    struct_packed or union; a field is [name, type], [name, type, [count]] (an array),
    [name, type, bits] (a bit field) or, for a nested anonymous aggregate, the
    aggregate's own description."""
    if isinstance(desc, str):
        return _SCALARS[desc]
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields, anonymous = [], []
    for m in members:
        if len(m) == 2:
            fields.append((m[0], decode_type(m[1])))
        elif len(m) == 3 and isinstance(m[2], list):
            fields.append((m[0], decode_type(m[1]) * m[2][0]))
        elif len(m) == 3 and isinstance(m[2], int) and not isinstance(m[2], bool):
            fields.append((m[0], decode_type(m[1]), m[2]))
        elif len(m) == 3 and m[2] in _KINDS:
            field = m[0] or f"__anon{len(anonymous)}"
            if not m[0]:
                anonymous.append(field)
            fields.append((field, decode_type(m)))
        else:
            raise ValueError(f"cannot decode the type description {m!r}")
    if kind not in _KINDS:
        raise ValueError(f"cannot decode the type description {desc!r}")
    base = ct.Union if kind == "union" else ct.Structure
    attrs = {"_pack_": 1} if kind == "struct_packed" else {}
    attrs.update(_anonymous_=anonymous, _fields_=fields)
    return type(str(name), (base,), attrs)
