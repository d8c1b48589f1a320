"""BCC's BPF syscall library without its compiler: Debian's libbcc_bpf.so.0, through ctypes.

``import bcc`` loads libbcc.so.0, which links libLLVM and libclang (~200 MiB resident
once mapped and touched). Everything a running balancer needs after the program is
compiled — map lookups and batches, program load, XDP attach, ring buffers, bpffs pins
— is in libbcc_bpf.so.0 (BCC's libbpf.c) and the libbpf.so.1 it links, under the same
names and with the same signatures as BCC's Python module declares them
(bcc/libbcc.py), so code written against ``bcc.libbcc.lib`` works with ``lib`` here.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
import threading

_c = ct.c_int
_p = ct.c_void_p
_u32p = ct.POINTER(ct.c_uint32)

# callback of bpf_new_ringbuf: (ctx, data, size) -> int, as bcc/libbcc.py declares it
RINGBUF_CB_TYPE = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_int)

_SIGNATURES = {
    # name: (restype, argtypes); bcc/libbcc.py's declarations, plus what it leaves out
    "bpf_get_next_key": (_c, [_c, _p, _p]),
    "bpf_get_first_key": (_c, [_c, _p, ct.c_uint]),
    "bpf_lookup_elem": (_c, [_c, _p, _p]),
    "bpf_update_elem": (_c, [_c, _p, _p, ct.c_ulonglong]),
    "bpf_delete_elem": (_c, [_c, _p]),
    "bpf_lookup_and_delete": (_c, [_c, _p, _p]),
    "bpf_delete_batch": (_c, [_c, _p, _p]),
    "bpf_update_batch": (_c, [_c, _p, _p, _u32p]),
    "bpf_lookup_batch": (_c, [_c, _u32p, _u32p, _p, _p, _p]),
    "bpf_lookup_and_delete_batch": (_c, [_c, _u32p, _u32p, _p, _p, _p]),
    "bcc_create_map": (_c, [_c, ct.c_char_p, _c, _c, _c, _c]),
    "bcc_prog_load": (_c, [_c, ct.c_char_p, _p, _c, ct.c_char_p, ct.c_uint, _c, ct.c_char_p,
                           ct.c_uint]),
    "bpf_attach_xdp": (_c, [ct.c_char_p, _c, ct.c_uint32]),
    "bpf_new_ringbuf": (_p, [_c, RINGBUF_CB_TYPE, _p]),
    "bpf_add_ringbuf": (_c, [_p, _c, RINGBUF_CB_TYPE, _p]),
    "bpf_poll_ringbuf": (_c, [_p, _c]),
    "bpf_consume_ringbuf": (_c, [_p]),
    "bpf_free_ringbuf": (None, [_p]),
    # libbpf.so.1's, found through libbcc_bpf's own dependencies
    "bpf_obj_get": (_c, [ct.c_char_p]),
    "bpf_obj_pin": (_c, [_c, ct.c_char_p]),
    "bpf_obj_get_info_by_fd": (_c, [_c, _p, _u32p]),
    "bpf_btf_load": (_c, [_p, ct.c_size_t, _p]),
    "bpf_btf_get_fd_by_id": (_c, [ct.c_uint32]),
    "bpf_map_get_fd_by_id": (_c, [ct.c_uint32]),
    "bpf_xdp_query_id": (_c, [_c, _c, _u32p]),
    "bpf_tc_query": (_c, [_p, _p]),
    "bpf_tc_hook_create": (_c, [_p]),
    "bpf_tc_attach": (_c, [_p, _p]),
    "bpf_tc_detach": (_c, [_p, _p]),
    "libbpf_set_print": (_p, [_p]),
    "bpf_map_create": (_c, [_c, ct.c_char_p, ct.c_uint32, ct.c_uint32, ct.c_uint32, _p]),
}

LIBRARY = "libbcc_bpf.so.0"


def _open() -> ct.CDLL:
    handle = ct.CDLL(LIBRARY, use_errno=True)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return handle


class _Lazy:
    """The library, opened at its first use: importing zfast needs no BCC."""

    _handle = None

    def __getattr__(self, name):
        if _Lazy._handle is None:
            _Lazy._handle = _open()
        return getattr(_Lazy._handle, name)


lib = _Lazy()


class bpf_map_info(ct.Structure):
    # struct bpf_map_info (linux/bpf.h) up to the BTF ids; the kernel fills what fits
    _fields_ = [
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("name", ct.c_char * 16),
        ("ifindex", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("netns_dev", ct.c_uint64),
        ("netns_ino", ct.c_uint64),
        ("btf_id", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
    ]


class bpf_btf_info(ct.Structure):
    # struct bpf_btf_info (linux/bpf.h)
    _fields_ = [
        ("btf", ct.c_uint64),
        ("btf_size", ct.c_uint32),
        ("id", ct.c_uint32),
        ("name", ct.c_uint64),
        ("name_len", ct.c_uint32),
        ("kernel_btf", ct.c_uint32),
    ]


class bpf_map_create_opts(ct.Structure):
    # libbpf's struct bpf_map_create_opts (bpf.h) up to map_ifindex; sz says how far
    _fields_ = [
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32),
        ("map_ifindex", ct.c_uint32),
    ]


def _info(fd: int, info: ct.Structure) -> None:
    size = ct.c_uint32(ct.sizeof(info))
    if lib.bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)) != 0:
        err = ct.get_errno()
        raise BpfError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")


def map_info(fd: int) -> bpf_map_info:
    info = bpf_map_info()
    _info(fd, info)
    return info


def btf_data(btf_id: int) -> bytes:
    """The raw BTF the kernel holds under btf_id (what a loader gave it, as it took it)."""
    fd = lib.bpf_btf_get_fd_by_id(btf_id)
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"BTF id {btf_id}: {os.strerror(err)}")
    try:
        info = bpf_btf_info()
        _info(fd, info)                 # first the size
        buf = ct.create_string_buffer(info.btf_size)
        info = bpf_btf_info(btf=ct.addressof(buf), btf_size=len(buf))
        _info(fd, info)
        return buf.raw[:info.btf_size]
    finally:
        os.close(fd)


def load_btf(data: bytes) -> int:
    """An fd of this raw BTF loaded into the kernel (BPF_BTF_LOAD)."""
    buf = ct.create_string_buffer(data, len(data))
    fd = lib.bpf_btf_load(buf, len(data), None)
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"BPF_BTF_LOAD: {os.strerror(err)}")
    return fd


def create_map(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, btf_fd: int = 0, btf_key: int = 0, btf_value: int = 0,
               inner_map_fd: int = 0) -> int:
    """A new map's fd (BPF_MAP_CREATE), its key and value described by BTF when given:
    bpftool then prints its entries by field, as for a map BCC made. A map of maps
    needs inner_map_fd: a map like the ones it will hold."""
    opts = bpf_map_create_opts(sz=ct.sizeof(bpf_map_create_opts), map_flags=flags,
                               inner_map_fd=inner_map_fd)
    if btf_fd and (btf_key or btf_value):
        opts.btf_fd, opts.btf_key_type_id, opts.btf_value_type_id = btf_fd, btf_key, btf_value
    fd = lib.bpf_map_create(map_type, name[:15].encode(), key_size, value_size, max_entries,
                            ct.byref(opts))
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"cannot create map {name}: {os.strerror(err)}")
    return fd


def map_fd_by_id(map_id: int) -> int:
    """An fd of the map with this id (a map of maps answers ids for its inner maps)."""
    fd = lib.bpf_map_get_fd_by_id(map_id)
    if fd < 0:
        err = ct.get_errno()
        raise BpfError(err, f"map id {map_id}: {os.strerror(err)}")
    return fd


def update_batch(fd: int, keys: bytes, values: bytes, count: int) -> None:
    """Write count packed keys and values in one BPF_MAP_UPDATE_BATCH."""
    n = ct.c_uint32(count)
    kbuf, vbuf = ct.create_string_buffer(keys, len(keys)), ct.create_string_buffer(values, len(values))
    if lib.bpf_update_batch(fd, kbuf, vbuf, ct.byref(n)) != 0 or n.value != count:
        err = ct.get_errno()
        raise BpfError(err, f"BPF_MAP_UPDATE_BATCH: {n.value} of {count}: {os.strerror(err)}")


class BpfError(OSError):
    """A failed BPF call: errno, and the message alone as its text (no "[Errno N]")."""

    def __str__(self) -> str:
        return str(self.strerror)


def attach_xdp(dev: str, prog_fd: int, flags: int = 0) -> None:
    """Attach an XDP program to dev (prog_fd -1: remove it), as bcc.BPF.attach_xdp does."""
    if lib.bpf_attach_xdp(dev.encode(), prog_fd, flags) < 0:
        err = ct.get_errno()
        what = "attach BPF to" if prog_fd >= 0 else "detach BPF from"
        # bcc.BPF.attach_xdp's words, which callers match ("No such device")
        raise BpfError(err, f"Failed to {what} device {dev}: {os.strerror(err)}")


def xdp_prog_id(ifindex: int) -> int:
    """The id of the XDP program attached to ifindex (0: none), in one netlink request."""
    prog_id = ct.c_uint32(0)
    res = lib.bpf_xdp_query_id(ifindex, 0, ct.byref(prog_id))
    if res < 0:
        raise BpfError(-res, f"XDP query of ifindex {ifindex}: {os.strerror(-res)}")
    return prog_id.value


class bpf_tc_hook(ct.Structure):
    # libbpf's struct bpf_tc_hook
    _fields_ = [("sz", ct.c_size_t), ("ifindex", ct.c_int), ("attach_point", ct.c_int),
                ("parent", ct.c_uint32)]


class bpf_tc_opts(ct.Structure):
    # libbpf's struct bpf_tc_opts
    _fields_ = [("sz", ct.c_size_t), ("prog_fd", ct.c_int), ("flags", ct.c_uint32),
                ("prog_id", ct.c_uint32), ("handle", ct.c_uint32), ("priority", ct.c_uint32)]


BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1
_quiet_libbpf = threading.Lock()


def _tc(call: str, ifindex: int, handle: int, priority: int, prog_fd: int = 0,
        flags: int = 0) -> tuple[int, int]:
    """One of libbpf's tc calls on the ingress filter (handle, priority) of ifindex:
    (its result, the program id it reports)."""
    hook = bpf_tc_hook(sz=ct.sizeof(bpf_tc_hook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)
    opts = bpf_tc_opts(sz=ct.sizeof(bpf_tc_opts), handle=handle, priority=priority,
                       prog_fd=prog_fd, flags=flags)
    with _quiet_libbpf:     # "Cannot find specified filter chain" is an answer, not news
        before = lib.libbpf_set_print(None)
        try:
            if call == "attach":
                res = lib.bpf_tc_hook_create(ct.byref(hook))    # clsact, if it is not there
                if res < 0 and res != -errno.EEXIST:
                    return res, 0
            return getattr(lib, f"bpf_tc_{call}")(ct.byref(hook), ct.byref(opts)), opts.prog_id
        finally:
            lib.libbpf_set_print(before)


def tc_prog_id(ifindex: int, handle: int, priority: int) -> int:
    """The id of the BPF program of the tc ingress filter (handle, priority) of ifindex
    (0: no such filter), in one netlink request."""
    res, prog_id = _tc("query", ifindex, handle, priority)
    if res in (-errno.ENOENT, -errno.EINVAL):    # no filter there; no clsact qdisc
        return 0
    if res < 0:
        raise BpfError(-res, f"tc query of ifindex {ifindex}: {os.strerror(-res)}")
    return prog_id


def tc_attach(ifindex: int, handle: int, priority: int, prog_fd: int) -> None:
    """prog_fd as the direct-action filter (handle, priority) at tc ingress of ifindex,
    replacing the one there; the clsact qdisc is made if missing."""
    res, _ = _tc("attach", ifindex, handle, priority, prog_fd, BPF_TC_F_REPLACE)
    if res < 0:
        raise BpfError(-res, f"tc attach to ifindex {ifindex}: {os.strerror(-res)}")


def tc_detach(ifindex: int, handle: int, priority: int) -> None:
    """Remove the filter (handle, priority) from tc ingress of ifindex, if it is there."""
    res, _ = _tc("detach", ifindex, handle, priority)
    if res < 0 and res not in (-errno.ENOENT, -errno.EINVAL):
        raise BpfError(-res, f"tc detach from ifindex {ifindex}: {os.strerror(-res)}")


def remove_xdp(dev: str, flags: int = 0) -> None:
    attach_xdp(dev, -1, flags)
