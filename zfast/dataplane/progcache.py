"""Compiled programs, cached per kernel: a balancer compiles bpf/zfast.c once, not every start.

BCC compiles the C source with clang/LLVM on every ``bcc.BPF(text=...)``: 3-5 s of CPU,
and the process keeps LLVM mapped (~260 MiB resident). What the kernel finally receives
is small: per program function its instructions, in which every map reference is an
ld_imm64 carrying the map's fd (BPF_PSEUDO_MAP_FD), and the maps' definitions. That is
what an entry records, and a later start with the same key loads it through BCC's own
loader library (libbcc_bpf.so.0, zfast.dataplane.bpflib: bcc_create_map, bcc_prog_load), without
importing bcc and so without LLVM:

- key: sha256 of the inlined source as zfast.dataplane.loader.inline_source makes it, the
  compile-time cflags (the sizes are -D flags), the kernel (release and build version
  string, as BCC compiles against that kernel's headers), BCC's version, the program
  functions and their types, and FORMAT. The pin dir, a -D flag too, is replaced by a
  placeholder: it only says where the maps live (BPF_TABLE_PINNED in bpf/maps.h), not
  what the instructions are, so every node of the same sizes shares one entry;
- an entry: one file <key>.zfc in the cache dir (/var/cache/zfast, or $ZFAST_CACHE_DIR):
  MAGIC, FORMAT, a sha256 over the body, the body's length, then the body (JSON: the key
  again, what it was made from, the license, per program its instructions and which
  instruction references which map, per map its definition, pin name and BCC's key and
  leaf type descriptions, from which the ctypes Key/Leaf classes are rebuilt);
- written atomically (a temporary file in the same dir, fsync, rename); the dir is
  bounded (MAX_BYTES, least recently used entries go first); a miss compiles under the
  dir's compile lock, so daemons starting together on a cold cache compile once;
- verified before use: magic, format, length, checksum, the key inside, the instruction
  layout (every map reference is an ld_imm64 the entry names a map for, and no other
  instruction carries an fd). Anything that does not verify is a miss: the program is
  compiled, and the entry written again. A hit that the kernel refuses (a kernel rebuilt
  under the same version strings) is a miss too.

On a hit, maps are opened from their pins in the caller's pin dir when the program pins
them (compiled with ZF_PIN_DIR), made and pinned there when missing, else created; the fds are patched into the ld_imm64 instructions, and each program loaded.
The tables are BCC's own classes (zfast.dataplane.bcctables) over those fds, behind a small
stand-in for bcc.BPF (`CachedBPF`: ``bpf[b"flows"]``, ring buffers, cleanup).
"""

from __future__ import annotations

import base64
import ctypes as ct
import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from zfast.dataplane import bpflib
from zfast.dataplane.background import Background
from zfast.dataplane.bcctables import MapDef, ModuleInfo, bcc_version, decode_type, table_module

log = logging.getLogger(__name__)

FORMAT = 3                      # 2: the maps' BTF is in the entry; 3: maps of maps
MAGIC = b"ZFPROG\r\n"
HEADER = struct.Struct("<8sI32sQ")      # magic, format, sha256(body), len(body)
SUFFIX = ".zfc"
DEFAULT_DIR = Path("/var/cache/zfast")
MAX_BYTES = 64 << 20

# BPF program types (linux/bpf.h enum bpf_prog_type), the same numbers as bcc.BPF.XDP ...
SCHED_CLS = 3
XDP = 6

# ld_imm64's pseudo sources (linux/bpf.h)
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_PSEUDO_MAP_VALUE = 2
_PSEUDO_FUNC = 4
_CALL = 0x85
_PSEUDO_KFUNC_CALL = 2
_INSN = struct.Struct("<BBhi")


class Invalid(Exception):
    """An entry that must not be used: the reason says why."""


class Uncacheable(Exception):
    """A compiled program that an entry cannot describe (say, one that needs BTF ids)."""


class HitError(Exception):
    """A verified entry that could not be loaded (the kernel refused a map or program)."""


@dataclass
class Program:
    name: str
    type: int
    insns: bytes
    refs: list[tuple[int, str]]     # (index of an ld_imm64, name of the map it references)


@dataclass
class Entry:
    key: str
    material: dict                  # what the key is the hash of
    license: str
    kern_version: int
    programs: list[Program]
    maps: list[MapDef]
    created: float = field(default_factory=time.time)
    btf: bytes = b""                # the BTF the maps' key and value type ids are in


# ---- the key -------------------------------------------------------------------------------


PIN_PLACEHOLDER = "<pin dir>"


def key_material(source: str, cflags: Iterable[str], programs: Iterable[tuple[str, int]],
                 *, pin: Path | None = None, release: str | None = None,
                 kernel_version: str | None = None, bcc: str | None = None) -> dict:
    """Everything a compiled program depends on; the pin dir, where cflags name it, as a
    placeholder (the other arguments override the running kernel's and BCC's, for tests)."""
    uname = os.uname()
    return {
        "format": FORMAT,
        "source": hashlib.sha256(source.encode()).hexdigest(),
        "cflags": [str(f).replace(str(pin), PIN_PLACEHOLDER) if pin is not None else str(f)
                   for f in cflags],
        "release": uname.release if release is None else release,
        "kernel_version": uname.version if kernel_version is None else kernel_version,
        "bcc": bcc_version() if bcc is None else bcc,
        "programs": [[str(name), int(ptype)] for name, ptype in programs],
    }


def cache_key(material: dict) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- entries as bytes ------------------------------------------------------------------------


def encode(entry: Entry) -> bytes:
    body = json.dumps({
        "key": entry.key,
        "format": FORMAT,
        "material": entry.material,
        "created": entry.created,
        "license": entry.license,
        "kern_version": entry.kern_version,
        "programs": [{"name": p.name, "type": p.type,
                      "insns": base64.b64encode(p.insns).decode(),
                      "refs": [[i, m] for i, m in p.refs]} for p in entry.programs],
        "maps": [asdict(m) for m in entry.maps],
        "btf": base64.b64encode(entry.btf).decode(),
    }, sort_keys=True).encode()
    return HEADER.pack(MAGIC, FORMAT, hashlib.sha256(body).digest(), len(body)) + body


def decode(data: bytes, key: str | None = None) -> Entry:
    """The entry in data, verified; raises Invalid. With key: it must be that entry's."""

    if len(data) < HEADER.size:
        raise Invalid("truncated header")
    magic, fmt, digest, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise Invalid("not a zfast program cache entry")
    if fmt != FORMAT:
        raise Invalid(f"format {fmt}, not {FORMAT}")
    body = data[HEADER.size:]
    if len(body) != length:
        raise Invalid(f"truncated: {len(body)} of {length} bytes")
    if hashlib.sha256(body).digest() != digest:
        raise Invalid("checksum mismatch")
    try:
        doc = json.loads(body)
        if doc["format"] != FORMAT:
            raise Invalid(f"body format {doc['format']}, not {FORMAT}")
        if key is not None and doc["key"] != key:
            raise Invalid(f"entry of key {str(doc['key'])[:16]}, not {key[:16]}")
        if cache_key(doc["material"]) != doc["key"]:
            raise Invalid("its key is not the hash of what it says it was made from")
        maps = [_map_def(m) for m in doc["maps"]]
        programs = [Program(_typed(p["name"], str), _typed(p["type"], int),
                            base64.b64decode(_typed(p["insns"], str), validate=True),
                            [(_typed(i, int), _typed(m, str)) for i, m in p["refs"]])
                    for p in doc["programs"]]
        entry = Entry(doc["key"], doc["material"], _typed(doc["license"], str),
                      _typed(doc["kern_version"], int), programs, maps, float(doc["created"]),
                      base64.b64decode(_typed(doc["btf"], str), validate=True))
        _check_layout(entry)
    except Invalid:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, Uncacheable) as err:
        raise Invalid(f"malformed body: {err!r}") from None
    return entry


def _typed(value, kind):
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value


def _map_def(doc: dict) -> MapDef:
    m = MapDef(**doc)
    for name in ("name", "key_desc", "leaf_desc"):
        _typed(getattr(m, name), str)
    for name in ("type", "key_size", "value_size", "max_entries", "flags", "kernel_flags",
                 "btf_key", "btf_value"):
        _typed(getattr(m, name), int)
    if m.pin is not None:
        _typed(m.pin, str)
    if m.inner is not None:
        _typed(m.inner, str)
    json.loads(m.key_desc)
    json.loads(m.leaf_desc)
    return m


def _check_layout(entry: Entry) -> None:
    """Every map reference an instruction makes is one the entry resolves, and no more."""
    names = [m.name for m in entry.maps]
    if len(set(names)) != len(names):
        raise Invalid("a map name twice")
    by_name = {m.name: m for m in entry.maps}
    for m in entry.maps:
        if m.pin is not None and (not m.pin or "/" in m.pin or m.pin in (".", "..")):
            raise Invalid(f"map {m.name}: pin {m.pin!r} is not a name in the pin dir")
        if (m.type in MAP_OF_MAPS) != (m.inner is not None):
            raise Invalid(f"map {m.name}: type {m.type} with inner map {m.inner!r}")
        if m.inner is not None and (m.inner not in by_name or by_name[m.inner].type in MAP_OF_MAPS):
            raise Invalid(f"map {m.name}: its inner map {m.inner!r} is not a plain map of the entry")
    if [[p.name, p.type] for p in entry.programs] != entry.material["programs"]:
        raise Invalid("its programs are not the ones its key names")
    for p in entry.programs:
        if not p.insns or len(p.insns) % _INSN.size:
            raise Invalid(f"{p.name}: {len(p.insns)} bytes of instructions")
        refs = dict(p.refs)
        if len(refs) != len(p.refs):
            raise Invalid(f"{p.name}: an instruction referenced twice")
        if not set(refs.values()) <= set(names):
            raise Invalid(f"{p.name}: references an unknown map")
        if set(refs) != set(map_references(p.insns)):
            raise Invalid(f"{p.name}: the map references do not match the instructions")


def map_references(insns: bytes) -> dict[int, int]:
    """{index: fd} of the ld_imm64 instructions that load a map (by fd, or a value in it).

    Raises Uncacheable for what an entry cannot carry: a BTF id, a map by index into an
    fd array, a kfunc call."""
    n = len(insns) // _INSN.size
    refs = {}
    i = 0
    while i < n:
        code, regs, _off, imm = _INSN.unpack_from(insns, i * _INSN.size)
        src = regs >> 4
        if code == _LD_IMM64:
            if i + 1 >= n:
                raise Uncacheable(f"an ld_imm64 at the end (instruction {i})")
            if src in (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE):
                refs[i] = imm
            elif src not in (0, _PSEUDO_FUNC):
                raise Uncacheable(f"ld_imm64 with pseudo source {src} (instruction {i})")
            i += 2
            continue
        if code == _CALL and src == _PSEUDO_KFUNC_CALL:
            raise Uncacheable(f"a kfunc call (instruction {i})")
        i += 1
    return refs


# ---- the cache dir ---------------------------------------------------------------------------


OFF = "off"


def cache_dir() -> Path:
    """$ZFAST_CACHE_DIR, else /var/cache/zfast. ZFAST_CACHE_DIR=off: no cache (compile
    every time)."""
    return Path(os.environ.get("ZFAST_CACHE_DIR") or DEFAULT_DIR)


def usable_dir(directory: Path | None = None, create: bool = True) -> Path | None:
    """The cache dir, made if missing (0700), or None when it is off or cannot be trusted:
    programs from a dir someone else can write to would be loaded into the kernel as root."""
    d = Path(directory) if directory is not None else cache_dir()
    if str(d) == OFF:
        return None
    try:
        if create:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError as err:
        log.info("program cache %s unusable: %s", d, err)
        return None
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        log.warning("program cache %s not used: owned by uid %d, mode %o (it must be ours and "
                    "writable by no one else)", d, st.st_uid, st.st_mode & 0o777)
        return None
    return d


def entry_path(directory: Path, key: str) -> Path:
    return directory / f"{key}{SUFFIX}"


def read_entry(directory: Path, key: str) -> Entry | None:
    """The verified entry of key, or None (missing, or not valid: the reason is logged)."""
    path = entry_path(directory, key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("program cache: cannot read %s: %s", path, err)
        return None
    try:
        return decode(data, key)
    except Invalid as err:
        log.warning("program cache: %s not used: %s", path.name, err)
        return None


def write_entry(directory: Path, entry: Entry, max_bytes: int = MAX_BYTES) -> Path:
    """Write atomically (a reader sees the old entry or the whole new one), then bound the dir."""
    path = entry_path(directory, entry.key)
    data = encode(entry)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    evict(directory, max_bytes, keep=path)
    return path


def _files(directory: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    for p in directory.iterdir():
        if p.name.endswith(SUFFIX):
            try:
                out.append((p, p.stat()))
            except OSError:
                pass
    return out


def evict(directory: Path, max_bytes: int = MAX_BYTES, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries until the dir holds at most max_bytes; and
    temporary files a crashed writer left (older than an hour)."""
    removed = []
    now = time.time()
    files = _files(directory)
    for p, st in files:
        if p.name.startswith(".tmp-") and now - st.st_mtime > 3600:
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    entries = sorted(((p, st) for p, st in files if not p.name.startswith(".tmp-")),
                     key=lambda x: x[1].st_mtime)
    total = sum(st.st_size for _, st in entries)
    for p, st in entries:
        if total <= max_bytes:
            break
        if keep is not None and p == keep:
            continue
        try:
            p.unlink()
            removed.append(p)
            total -= st.st_size
        except OSError:
            pass
    return removed


def list_entries(directory: Path | None = None) -> list[dict]:
    """Every entry in the dir with what it was made from, verified (``valid``, ``reason``)."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return []
    out = []
    for p, st in sorted(_files(d), key=lambda x: -x[1].st_mtime):
        if p.name.startswith(".tmp-"):
            continue
        item = {"key": p.name[:-len(SUFFIX)], "path": str(p), "bytes": st.st_size,
                "used": st.st_mtime}
        try:
            e = decode(p.read_bytes(), item["key"])
            m = e.material
            item.update(valid=True, reason="", created=e.created, release=m["release"],
                        bcc=m["bcc"], programs=[name for name, _ in m["programs"]],
                        instructions=sum(len(prog.insns) // 8 for prog in e.programs),
                        maps=len(e.maps), cflags=m["cflags"])
        except (Invalid, OSError) as err:
            item.update(valid=False, reason=str(err))
        out.append(item)
    return out


def has_entry(key: str, directory: Path | None = None) -> bool:
    """Whether a valid entry of that key is there (a start with it will not compile)."""
    d = usable_dir(directory, create=False)
    return d is not None and read_entry(d, key) is not None


def forget(key: str, directory: Path | None = None) -> None:
    """Remove one entry (one the kernel refused: the next start compiles)."""
    d = usable_dir(directory, create=False)
    if d is not None:
        try:
            entry_path(d, key).unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("program cache: cannot remove %s: %s", key[:16], err)


def clear(directory: Path | None = None) -> int:
    """Remove every entry (and temporary file); the number removed."""
    d = Path(directory) if directory is not None else cache_dir()
    if not d.is_dir():
        return 0
    n = 0
    for p, _ in _files(d):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


# ---- a miss: what a compiled bcc.BPF holds ---------------------------------------------------


def _bcc_lib():
    from bcc.libbcc import lib  # noqa: PLC0415 -- maps LLVM (see the top): a miss only

    for name, restype, argtypes in (
            ("bpf_num_tables", ct.c_ulonglong, [ct.c_void_p]),
            ("bpf_table_name", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
            ("bpf_table_fd_id", ct.c_int, [ct.c_void_p, ct.c_ulonglong]),
            ("bpf_table_key_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong]),
            ("bpf_table_leaf_desc_id", ct.c_char_p, [ct.c_void_p, ct.c_ulonglong])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


# BCC declares a map of maps with its inner map's name in the type: "array_of_maps$inner"
_MAP_OF_MAPS_DECL = re.compile(r'"(?:array|hash)_of_maps\$(\w+)"\s*,\s*[^,]+,\s*[^,]+,\s*(\w+)\s*,')
MAP_OF_MAPS = {12, 13}          # BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS


def inner_maps(source: str) -> dict[str, str]:
    """{map of maps: the map its inner maps are like}, as the source declares them (the
    kernel does not say: the outer map only holds a copy of the inner one's definition)."""
    return {outer: inner for inner, outer in _MAP_OF_MAPS_DECL.findall(source)}


def extract(bpf, programs: list[tuple[str, int]], material: dict,
            pin: Path | None = None, inner: dict[str, str] | None = None) -> Entry:
    """The entry for a compiled and loaded bcc.BPF: its maps as the kernel has them, and
    its programs' instructions with the map fds in them named; inner: inner_maps() of
    its source. Raises Uncacheable."""

    lib = _bcc_lib()
    maps, by_fd, btf_ids = [], {}, set()
    for i in range(lib.bpf_num_tables(bpf.module)):
        name = lib.bpf_table_name(bpf.module, i).decode()
        fd = lib.bpf_table_fd_id(bpf.module, i)
        if fd < 0:
            raise Uncacheable(f"map {name} has no fd")
        info = bpflib.map_info(fd)
        pinned = _pinned_at(pin, name, info.id) if pin is not None else None
        maps.append(MapDef(name, info.type, info.key_size, info.value_size, info.max_entries,
                           lib.bpf_table_flags_id(bpf.module, i), info.map_flags,
                           (lib.bpf_table_key_desc_id(bpf.module, i) or b"").decode(),
                           (lib.bpf_table_leaf_desc_id(bpf.module, i) or b"").decode(), pinned,
                           info.btf_key_type_id if info.btf_id else 0,
                           info.btf_value_type_id if info.btf_id else 0,
                           (inner or {}).get(name)))
        if info.type in MAP_OF_MAPS and name not in (inner or {}):
            raise Uncacheable(f"map {name} holds maps, and the source does not say like which")
        if info.btf_id:
            btf_ids.add(info.btf_id)
        by_fd[fd] = name
    progs = []
    for name, ptype in programs:
        insns = bytes(bpf.dump_func(name.encode()))
        refs = []
        for index, fd in sorted(map_references(insns).items()):
            if fd not in by_fd:
                raise Uncacheable(f"{name}: instruction {index} loads fd {fd}, not a map of the module")
            refs.append((index, by_fd[fd]))
        progs.append(Program(name, int(ptype), insns, refs))
    if len(btf_ids) > 1:
        raise Uncacheable(f"the maps' types are in {len(btf_ids)} BTF objects, not one")
    btf = bpflib.btf_data(btf_ids.pop()) if btf_ids else b""
    license = (lib.bpf_module_license(bpf.module) or b"").decode()
    return Entry(cache_key(material), material, license, int(lib.bpf_module_kern_version(bpf.module)),
                 progs, maps, btf=btf)


def _pinned_at(pin: Path, name: str, map_id: int) -> str | None:
    """name when pin/name is this very map (BPF_TABLE_PINNED, bpf/maps.h), else None."""

    path = Path(pin) / name
    if not path.exists():
        return None
    fd = bpflib.lib.bpf_obj_get(str(path).encode())
    if fd < 0:
        return None
    try:
        return name if bpflib.map_info(fd).id == map_id else None
    except OSError:
        return None
    finally:
        os.close(fd)


# ---- a hit: maps and programs from an entry, without LLVM ------------------------------------


class Function:
    """A loaded program, like bcc.BPF.Function: name and fd."""

    def __init__(self, bpf, name: bytes, fd: int):
        self.bpf, self.name, self.fd = bpf, name, fd


class CachedBPF:
    """What zfast uses of a bcc.BPF, for programs loaded from a cache entry."""

    Function = Function

    def __init__(self, entry: Entry, map_fds: dict[str, int]):
        self.entry = entry
        self.module = ModuleInfo(entry.maps)
        self._ids = {m.name.encode(): i for i, m in enumerate(entry.maps)}
        self.map_fds = map_fds
        self.funcs: dict[bytes, Function] = {}
        self.tables: dict[bytes, object] = {}
        self.perf_buffers: dict = {}
        self._types: dict[bytes, tuple] = {}
        self._ringbuf_manager = None

    def get_table(self, name, keytype=None, leaftype=None, reducer=None):
        name = name.encode() if isinstance(name, str) else name
        if name not in self._ids:
            raise KeyError(name)
        map_id = self._ids[name]
        m = self.entry.maps[map_id]
        if name not in self._types:
            self._types[name] = (decode_type(json.loads(m.key_desc)),
                                 decode_type(json.loads(m.leaf_desc)))
        key, leaf = self._types[name]
        return table_module().Table(self, map_id, self.map_fds[m.name], keytype or key,
                                    leaftype or leaf, name, reducer=reducer)

    def __getitem__(self, name):
        name = name.encode() if isinstance(name, str) else name
        if name not in self.tables:
            self.tables[name] = self.get_table(name)
        return self.tables[name]

    def __contains__(self, name) -> bool:
        return (name.encode() if isinstance(name, str) else name) in self._ids

    def __iter__(self):
        return iter(self.tables)

    def __len__(self) -> int:
        return len(self.tables)

    def load_func(self, func_name, prog_type=None, *args, **kwargs) -> Function:
        """The program of that name, loaded now if it is not yet (as bcc.BPF's: a start
        loads the programs of the hooks it uses; another one when a link needs it)."""
        name = func_name.encode() if isinstance(func_name, str) else func_name
        if name not in self.funcs:
            for p in self.entry.programs:
                if p.name.encode() == name:
                    fd = _load_program(p, self.map_fds, self.entry.license, self.entry.kern_version)
                    self.funcs[name] = Function(self, name, fd)
                    break
            else:
                raise Exception(f"Unknown program {name.decode()}")
        return self.funcs[name]

    def dump_func(self, func_name) -> bytes:
        """The instructions as loaded (the map fds of this process patched in)."""
        name = func_name.decode() if isinstance(func_name, bytes) else func_name
        for p in self.entry.programs:
            if p.name == name:
                return _patched(p, self.map_fds)
        raise Exception(f"Unknown program {name}")

    # ring buffers, as bcc.BPF's (RingBuf.open_ring_buffer calls _open_ring_buffer)
    def _open_ring_buffer(self, map_fd, fn, ctx=None):
        if not self._ringbuf_manager:
            self._ringbuf_manager = bpflib.lib.bpf_new_ringbuf(map_fd, fn, ctx)
            if not self._ringbuf_manager:
                raise Exception("Could not open ring buffer")
        elif bpflib.lib.bpf_add_ringbuf(self._ringbuf_manager, map_fd, fn, ctx) < 0:
            raise Exception("Could not open ring buffer")

    def ring_buffer_poll(self, timeout=-1):
        if not self._ringbuf_manager:
            raise Exception("No ring buffers to poll")
        bpflib.lib.bpf_poll_ringbuf(self._ringbuf_manager, timeout)

    def ring_buffer_consume(self):
        if not self._ringbuf_manager:
            raise Exception("No ring buffers to poll")
        bpflib.lib.bpf_consume_ringbuf(self._ringbuf_manager)

    def close(self):
        """Close the programs' and maps' fds (attached programs and pinned maps stay)."""
        for name, fn in list(self.funcs.items()):
            try:
                os.close(fn.fd)
            except OSError:
                pass
            del self.funcs[name]
        for name, fd in list(self.map_fds.items()):
            try:
                os.close(fd)
            except OSError:
                pass
            del self.map_fds[name]

    def cleanup(self):
        if self._ringbuf_manager:
            bpflib.lib.bpf_free_ringbuf(self._ringbuf_manager)
            self._ringbuf_manager = None
        self.tables.clear()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def _patched(program: Program, map_fds: dict[str, int]) -> bytes:
    insns = bytearray(program.insns)
    for index, name in program.refs:
        struct.pack_into("<i", insns, index * _INSN.size + 4, map_fds[name])
    return bytes(insns)


def _same(m: MapDef, info) -> bool:
    return (info.type, info.key_size, info.value_size, info.max_entries, info.map_flags) == \
        (m.type, m.key_size, m.value_size, m.max_entries, m.kernel_flags)


def _open_map(m: MapDef, pin: Path | None, btf_fd: int = 0, inner_fd: int = 0) -> int:
    lib = bpflib.lib
    path = None
    if m.pin:
        if pin is None:
            raise HitError(f"map {m.name} is pinned, and no pin dir was given")
        path = Path(pin) / m.pin
        fd = lib.bpf_obj_get(str(path).encode())
        if fd >= 0:
            try:
                info = bpflib.map_info(fd)
            except OSError:
                os.close(fd)
                raise
            if not _same(m, info):
                os.close(fd)
                raise HitError(f"the map pinned at {path} is not the one the program was built "
                               f"for (type {info.type}, key {info.key_size}, value {info.value_size}, "
                               f"{info.max_entries} entries, flags {info.map_flags})")
            return fd
    try:
        fd = bpflib.create_map(m.type, m.name, m.key_size, m.value_size, m.max_entries,
                               m.flags, btf_fd, m.btf_key, m.btf_value, inner_fd)
    except OSError as err:
        raise HitError(str(err)) from None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
            err = ct.get_errno()
            os.close(fd)
            raise HitError(f"cannot pin map {m.name} at {path}: {os.strerror(err)}")
    return fd


def sized(entry: Entry, map_sizes: dict[str, int] | None) -> Entry:
    """The entry with the maps map_sizes names made that size (sizes that are map sizes
    and nothing else in the program: the instructions stay the same)."""
    if not map_sizes:
        return entry
    names = {m.name for m in entry.maps}
    unknown = sorted(set(map_sizes) - names)
    if unknown:
        raise HitError(f"no map {', '.join(unknown)} in the entry")
    return replace(entry, maps=[replace(m, max_entries=int(map_sizes[m.name]))
                                if m.name in map_sizes else m for m in entry.maps])


PERCPU_TYPES = {5, 6, 10}      # percpu hash, percpu array, LRU percpu hash


def _creation_cost(m: MapDef) -> int:
    """How much the kernel allocates up front to make the map, roughly: per-CPU maps
    allocate every slot for every CPU; other maps one block."""
    return m.max_entries * (os.cpu_count() or 1) * 8 if m.type in PERCPU_TYPES else m.max_entries


def instantiate(entry: Entry, pin: Path | None = None, load: Iterable[str] | None = None,
                map_sizes: dict[str, int] | None = None) -> CachedBPF:
    """Maps and loaded programs of a verified entry: a map the compile pinned is adopted
    from its pin in pin (made and pinned if it is not there), the others are made, at the
    sizes map_sizes gives. The programs named in load are loaded now (all by default), the
    others on bpf.load_func. Raises HitError; whatever it opened is closed again (pins it
    made stay, as BCC's would)."""

    try:
        table_module()          # the tables will need it: find out now, while a compile can help
    except Exception as err:
        raise HitError(f"BCC's table classes cannot be used without libbcc.so: {err!r}") from None
    entry = sized(entry, map_sizes)
    fds: dict[str, int] = {}
    bpf = CachedBPF(entry, fds)
    btf_fd = 0
    try:
        if entry.btf:
            try:
                btf_fd = bpflib.load_btf(entry.btf)
            except OSError as err:
                raise HitError(f"the kernel refused the maps' BTF: {err}") from None
        # a map of many per-CPU slots takes the kernel a while (rule_stats, 131072 of them:
        # ~0.12 s on 2 CPUs); the biggest is made in a thread while the others are
        inners = {m.inner for m in entry.maps}
        big = max((m for m in entry.maps if m.inner is None and m.name not in inners),
                  key=_creation_cost)
        made = Background(_open_map, big, pin, btf_fd, name=f"map {big.name}")
        try:
            # a map of maps is made from its inner map's fd: those come first
            for m in sorted(entry.maps, key=lambda m: m.inner is not None):
                if m is not big:
                    fds[m.name] = _open_map(m, pin, btf_fd, fds.get(m.inner, 0))
        finally:
            fd, err = made.wait()           # recorded even when another map failed:
            if fd is not None:              # bpf.close() below closes it then
                fds[big.name] = fd
        if err is not None:
            raise err
        wanted = None if load is None else set(load)
        for p in entry.programs:
            if wanted is None or p.name in wanted:
                bpf.load_func(p.name)
    except BaseException:
        bpf.close()
        raise
    finally:
        if btf_fd:
            os.close(btf_fd)        # the maps hold it
    return bpf


def _load_program(p: Program, map_fds: dict[str, int], license: str, kern_version: int) -> int:
    """The fd of program p loaded with these maps' fds patched in. Raises HitError."""

    insns = _patched(p, map_fds)
    buf = ct.create_string_buffer(insns, len(insns))
    fd = bpflib.lib.bcc_prog_load(p.type, p.name[:15].encode(), buf, len(insns),
                                  license.encode(), kern_version, 0, None, 0)
    if fd < 0:
        err = ct.get_errno()
        raise HitError(f"the kernel refused the cached {p.name}: {os.strerror(err)}")
    return fd


# ---- the entry point ------------------------------------------------------------------------


@dataclass
class Result:
    bpf: object                     # a bcc.BPF (compiled here) or a CachedBPF
    funcs: dict[str, object]        # program name -> object with .fd (bcc's Function or ours)
    status: str                     # "hit", "miss" (compiled, entry written), "off" (no cache)
    key: str
    seconds: float
    note: str = ""                  # why a miss was a miss, when it was not just absent


LOCK = ".compile.lock"
LOCK_WAIT_S = 120.0


@contextmanager
def compile_lock(directory: Path, wait_s: float = LOCK_WAIT_S):
    """The dir's compile lock (flock): daemons that start together on a cold cache (a core's
    pair and spare) compile one after the other, and all but the first find the entry the
    first wrote. Yields whether it is held; after wait_s it gives up (and compiles anyway)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        log.info("program cache: no compile lock: %s", err)
        yield False
        return
    try:
        deadline = time.monotonic() + wait_s
        held = False
        while not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("program cache: another compile holds %s for %.0f s; "
                                "compiling anyway", directory / LOCK, wait_s)
                    break
                time.sleep(0.05)
        yield held
    finally:
        os.close(fd)            # and the lock with it


def _hit(d: Path, key: str, pin: Path | None, start: float, load: Iterable[str] | None,
         map_sizes: dict[str, int] | None) -> tuple[Result | None, str, bool]:
    """(the loaded entry or None, why a found entry was not used, whether one was found)."""
    entry = read_entry(d, key)
    if entry is None:
        return None, "", False
    try:
        bpf = instantiate(entry, pin, load, map_sizes)
    except Exception as err:    # HitError, OSError; anything else is a bug: compile
        log.warning("program cache: %s: %s; compiling", key[:16], err,
                    exc_info=not isinstance(err, (HitError, OSError)))
        return None, str(err), True
    try:
        os.utime(entry_path(d, key))    # recently used: evicted last
    except OSError:
        pass
    funcs = {name.decode(): fn for name, fn in bpf.funcs.items()}
    return Result(bpf, funcs, "hit", key, time.monotonic() - start), "", True


def load(source: str, cflags: list[str], programs: list[tuple[str, int]], *,
         pin: Path | None = None, bcc: Callable | None = None,
         directory: Path | None = None, max_bytes: int = MAX_BYTES,
         lock_wait_s: float = LOCK_WAIT_S, size_flags: Iterable[str] = (),
         map_sizes: dict[str, int] | None = None, load: Iterable[str] | None = None) -> Result:
    """The programs of source, each with its type: from the cache on a hit, else compiled
    by BCC (``bcc()`` returns the bcc module; it is called only then) and cached. A miss
    compiles under the dir's compile lock, and looks again once it has it.

    size_flags are -D flags that size maps and nothing else; map_sizes says which map
    each one sizes and to what. They are not in the key: a new size (a flow table the
    scaling controller grew) loads the same entry, its maps made at the new sizes. A
    miss compiles them in, and checks map_sizes against the maps BCC made (a mismatch
    is not cached). load names the programs to load now (all by default); the others
    load on ``result.bpf.load_func``.

    Errors of the compile or of the kernel's verifier on a miss are BCC's exceptions, as
    when compiling without a cache."""
    start = time.monotonic()
    programs = [(str(n), int(t)) for n, t in programs]
    now = [n for n, _ in programs] if load is None else list(load)
    material = key_material(source, cflags, programs, pin=pin)
    key = cache_key(material)
    compile_flags = [*cflags, *size_flags]
    d = usable_dir(directory)
    if d is None:
        compiled, funcs = _compile(bcc, source, compile_flags, programs, now)
        return Result(compiled, funcs, "off", key, time.monotonic() - start)
    got, note, found = _hit(d, key, pin, start, now, map_sizes)
    if got is not None:
        return got
    with compile_lock(d, lock_wait_s):
        if not found:           # another daemon may have compiled it while we waited
            got, note, _ = _hit(d, key, pin, start, now, map_sizes)
            if got is not None:
                return got
        compiled, funcs = _compile(bcc, source, compile_flags, programs, now)
        status = "off"
        try:
            entry = extract(compiled, programs, material, pin, inner_maps(source))
            _check_sizes(entry, map_sizes)
            write_entry(d, entry, max_bytes)
            status = "miss"
        except Uncacheable as err:
            log.warning("program cache: not cached: %s", err)
            note = note or str(err)
        except OSError as err:
            log.warning("program cache: cannot write %s: %s", d, err)
    return Result(compiled, funcs, status, key, time.monotonic() - start, note)


def _check_sizes(entry: Entry, map_sizes: dict[str, int] | None) -> None:
    """Raise Uncacheable unless every map map_sizes names was compiled at that size: the
    caller's sizes would otherwise make other maps than the source says."""
    have = {m.name: m.max_entries for m in entry.maps}
    for name, want in (map_sizes or {}).items():
        if have.get(name) != want:
            raise Uncacheable(f"map {name}: compiled with {have.get(name)} entries, the "
                              f"caller sizes it {want}: map_sizes does not match the source")


def _compile(bcc: Callable | None, source: str, cflags: list[str],
             programs: list[tuple[str, int]], load: Iterable[str]):
    if bcc is None:
        import bcc as bcc_module  # noqa: PLC0415 -- maps LLVM (see the top): a miss only
    else:
        bcc_module = bcc()
    compiled = bcc_module.BPF(text=source.encode(), cflags=list(cflags))
    wanted = set(load)
    return compiled, {name: compiled.load_func(name.encode(), ptype)
                      for name, ptype in programs if name in wanted}
