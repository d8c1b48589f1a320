"""BPF_PROG_RUN for XDP and tc programs, through libbpf's bpf_prog_test_run_opts.

Two uses: packet tests (one packet in, the packet and verdict out, for either hook) and the
traffic generator (BPF_F_TEST_XDP_LIVE_FRAMES: the kernel really transmits
the frames the program redirects).  BCC has no wrapper for it, so we call
libbpf, which BCC itself links, through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1

XDP_ACTIONS = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}
# tc's TC_ACT_* by the XDP action of the same meaning (bpf/hook.h maps them so)
TC_AS_XDP = {0: 2, 2: 1, 7: 4}     # OK -> pass, SHOT -> drop, REDIRECT -> redirect


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts of libbpf 1.x
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class XdpMd(ctypes.Structure):
    # struct xdp_md as BPF_PROG_RUN takes it: offsets into data, and the ingress port
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class SkBuff(ctypes.Structure):
    # the head of struct __sk_buff, as far as BPF_PROG_RUN lets a caller set it
    _fields_ = [(name, ctypes.c_uint32) for name in (
        "len", "pkt_type", "mark", "queue_mapping", "protocol", "vlan_present", "vlan_tci",
        "vlan_proto", "priority", "ingress_ifindex", "ifindex")]


_libbpf = None


def libbpf() -> ctypes.CDLL:
    global _libbpf
    if _libbpf is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        _libbpf = ctypes.CDLL(name, use_errno=True)
        _libbpf.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        _libbpf.bpf_prog_test_run_opts.restype = ctypes.c_int
    return _libbpf


@dataclass
class RunResult:
    retval: int          # the XDP action
    data: bytes          # the packet as the program left it
    duration_ns: int     # average per repetition, as the kernel measured it

    @property
    def action(self) -> str:
        return XDP_ACTIONS.get(self.retval, str(self.retval))


def run_xdp(prog_fd: int, packet: bytes, ingress_ifindex: int = 0, repeat: int = 1,
            flags: int = 0, batch_size: int = 0) -> RunResult:
    """Run an XDP program on one packet (repeat times); raises OSError on failure."""
    buf_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 512  # room for a program that grows the packet
    buf_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    if not flags & BPF_F_TEST_XDP_LIVE_FRAMES:
        opts.data_out = ctypes.cast(buf_out, ctypes.c_void_p)
        opts.data_size_out = out_size
    ctx = XdpMd(data=0, data_end=len(packet), ingress_ifindex=ingress_ifindex)
    if ingress_ifindex:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = repeat
    opts.flags = flags
    opts.batch_size = batch_size
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_RUN failed: {os.strerror(err)}")
    return RunResult(opts.retval, buf_out.raw[:opts.data_size_out], opts.duration)


def run_tc(prog_fd: int, packet: bytes, ingress_ifindex: int = 0, repeat: int = 1) -> RunResult:
    """Run a tc (sched_cls) program on one packet as if it came in on ingress_ifindex;
    retval is given as the XDP action of the same meaning, so one table of cases serves
    both hooks. Raises OSError on failure."""
    buf_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = len(packet) + 512
    buf_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(buf_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    ctx = SkBuff(ifindex=ingress_ifindex)   # the kernel takes the ingress port from it
    if ingress_ifindex:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    opts.repeat = repeat
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_RUN failed: {os.strerror(err)}")
    return RunResult(TC_AS_XDP.get(opts.retval, 1000 + opts.retval),
                     buf_out.raw[:opts.data_size_out], opts.duration)
