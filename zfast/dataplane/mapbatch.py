"""Reading a whole BPF hash map in a few syscalls (BPF_MAP_LOOKUP_BATCH), not one a key."""

from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Iterator

from zfast.dataplane.bpflib import lib


def lookup_batches(fd: int, key_size: int, value_size: int,
                   chunk: int = 8192) -> Iterator[tuple[bytes, bytes, int]]:
    """(keys, values, n) chunk after chunk until the map is read: n entries, packed."""
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    in_batch, out_batch = ct.c_uint32(0), ct.c_uint32(0)   # a hash map's token is a u32
    count = ct.c_uint32(0)
    first = True
    while True:
        count.value = chunk
        res = lib.bpf_lookup_batch(fd, None if first else ct.byref(in_batch),
                                   ct.byref(out_batch), keys, values, ct.byref(count))
        err = ct.get_errno()
        n = count.value
        yield keys.raw[:n * key_size], values.raw[:n * value_size], n
        if res != 0:
            if err == errno.ENOENT or -res == errno.ENOENT:
                return
            raise OSError(err or -res, f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err or -res)}")
        first = False
        in_batch.value = out_batch.value


def read_all(fd: int, key_size: int, value_size: int, chunk: int = 8192) -> tuple[bytes, bytes, int]:
    """Every (key, value) of a hash map: keys and values packed, and how many."""
    keys, values, count = [], [], 0
    for k, v, n in lookup_batches(fd, key_size, value_size, chunk):
        keys.append(k)
        values.append(v)
        count += n
    return b"".join(keys), b"".join(values), count
