"""Pinned state: the maps in bpffs and what the daemon allocated in them.

A node's maps live in /run/zfast/bpffs/<node>/ and outlive its daemon: a
daemon killed with SIGKILL leaves the program attached and forwarding, and
the next one compiles the program against the same maps (flows included) and
swaps it in atomically. Beside them, in the state dir:
  layout.json     the sizes and the shared header's hash the maps were made with;
  installed.json  the daemon's allocations (service, backend, port slots, rings,
                  rule tries), written atomically after every change.
Maps of another layout cannot be reused: their flows are copied into the new
maps when only sizes changed (same structs), else they start empty.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from zfast.config import SIZE_FIELDS
from zfast.config import Datapath as Sizes
from zfast.dataplane.progrun import libbpf
from zfast.paths import bpf_dir

LAYOUT = "layout.json"
INSTALLED = "installed.json"


def layout(sizes: Sizes) -> dict:
    shared = (bpf_dir() / "zfast_shared.h").read_bytes()
    return {"sizes": {k: getattr(sizes, k) for k in SIZE_FIELDS},
            "structs": hashlib.sha256(shared).hexdigest()[:16]}


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data))  # json.dump streams in Python: 4x slower on 100k rules
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def has_pins(pin: Path) -> bool:
    return pin.is_dir() and any(pin.iterdir())


def remove_pins(pin: Path) -> None:
    if pin.exists():
        shutil.rmtree(pin, ignore_errors=True)


def set_aside(pin: Path) -> Path:
    """Move a pin dir out of the way (bpffs supports rename) for migration."""
    old = pin.with_name(f"{pin.name}-old-{int(time.time())}")  # bpffs refuses dots
    os.rename(pin, old)
    return old


def copy_map(old_path: Path, table) -> int:
    """Copy every entry of a pinned map into a BCC table of the same key/value layout."""
    lib = libbpf()
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get.restype = ctypes.c_int
    fd = lib.bpf_obj_get(str(old_path).encode())
    if fd < 0:
        return 0
    try:
        key, next_key, value = table.Key(), table.Key(), table.Leaf()
        lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        copied, prev = 0, None
        while lib.bpf_map_get_next_key(fd, prev, ctypes.byref(next_key)) == 0:
            ctypes.memmove(ctypes.byref(key), ctypes.byref(next_key), ctypes.sizeof(key))
            prev = ctypes.byref(key)
            if lib.bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0:
                try:
                    table[table.Key.from_buffer_copy(key)] = table.Leaf.from_buffer_copy(value)
                    copied += 1
                except Exception:
                    break  # the new table is full: it keeps what fits
        return copied
    finally:
        os.close(fd)
