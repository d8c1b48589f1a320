"""The data plane as Python sees it: bpf/zfast.c compiled by BCC, its maps, XDP attach.

Map keys and values are BCC's ctypes classes, generated from the C structs in
bpf/zfast_shared.h (``self.table("flows").Key``): no layout is written twice.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zfast.config import Datapath as Sizes
from zfast.paths import bpf_dir
from zfast.reasons import reasons

# XDP attach flags (linux/if_link.h)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}

AF = {4: 4, 6: 6}  # ip.version -> ZF_AF_* (the same numbers, by design)
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}

# flags of struct backend
BACKEND_UP = 1
BACKEND_DOWN = 2
NO_BACKEND = 0xFFFFFFFF

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DatapathError(Exception):
    """The kernel or BCC refused something; the message says what, in one line."""


def _bcc():
    try:
        import bcc  # Debian's python3-bpfcc; PyPI's "bcc" is another project
    except ImportError as err:
        raise DatapathError("BCC's Python module is missing: install Debian's python3-bpfcc "
                            "and run zfast with /usr/bin/python3 (scripts/bootstrap.sh)") from err
    return bcc


def inline_source(path: Path, seen: set[Path] | None = None) -> str:
    """The C source with our own "..." includes pasted in.

    BCC rewrites map calls (``flows.lookup(&key)``) only in the main file, so
    the headers of bpf/ are inlined into it; <...> includes stay as they are.
    """
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    lines = []
    for line in path.read_text().splitlines():
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        lines.append(inline_source(path.parent / m.group(1), seen) if m else line)
    return "\n".join(lines) + "\n"


def cflags_for(sizes: Sizes, pin: Path | None = None) -> list[str]:
    flags = [
        f"-DZF_FLOW_TABLE={sizes.flow_table}",
        f"-DZF_MAX_SERVICES={sizes.max_services}",
        f"-DZF_MAX_BACKENDS={sizes.max_backends}",
        f"-DZF_RING_SIZE={sizes.maglev_size}",
        f"-DZF_MAX_IFINDEX={sizes.max_ifindex}",
        f"-DZF_MAX_PUBLIC_PORTS={sizes.max_public_ports}",
        f"-DZF_MAX_RULES={sizes.max_rules}",
        "-Wno-unused-function",
        "-Wno-compare-distinct-pointer-types",
    ]
    if pin is not None:
        flags.append(f'-DZF_PIN_DIR="{pin}"')
    return flags


def addr_words(address: IPAddress) -> bytes:
    """An address as struct zf_addr holds it: 16 bytes, a v4 address first."""
    return address.packed.ljust(16, b"\0")


def set_addr(zf_addr, address: IPAddress) -> None:
    ctypes.memmove(ctypes.addressof(zf_addr), addr_words(address), 16)


def get_addr(zf_addr, family: int) -> IPAddress:
    raw = ctypes.string_at(ctypes.addressof(zf_addr), 16)
    return ipaddress.ip_address(raw[:4] if family == 4 else raw)


def fd_info(fd: int) -> dict[str, str]:
    """/proc's fdinfo of a BPF object: prog_id, map_id, ..."""
    info = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise DatapathError(f"interface {name!r} does not exist") from None


class _captured_stderr:
    """Collect what BCC and the verifier print on fd 2 (thousands of lines on a refusal),
    so that the CLI can say one line and keep the rest in a file."""

    def __enter__(self):
        import tempfile

        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


def _last_reason(log: str) -> str | None:
    """The verifier's or compiler's own words: the line before 'processed N insns', or an error."""
    lines = [l.strip() for l in log.splitlines() if l.strip() and not l.startswith(";")]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and i > 0:
            return lines[i - 1]
    errors = [l for l in lines if "error:" in l]
    return errors[0] if errors else None


def _release_compiler_heap() -> None:
    """Give back to the kernel what clang/LLVM freed after the compile: glibc keeps it in
    its arenas otherwise, and a daemon would carry ~80 MiB it no longer uses against its
    instance's memory limit (measured: 115 -> 38 MiB anonymous after a load)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass        # not glibc: nothing to trim


@dataclass
class Attachment:
    ifname: str
    mode: str      # native | generic, as attached
    prog_id: int


class Loaded:
    """One compiled and loaded zfast program with its maps."""

    def __init__(self, sizes: Sizes = Sizes(), pin: Path | None = None):
        bcc = _bcc()
        self.sizes = sizes
        self.pin = pin
        if pin is not None:
            from zfast.paths import ensure_bpffs
            ensure_bpffs()
            pin.mkdir(parents=True, exist_ok=True)
        src = inline_source(bpf_dir() / "zfast.c")
        with _captured_stderr() as log:
            try:
                # bytes, not str: BCC warns about str on every call
                self.bpf = bcc.BPF(text=src.encode(), cflags=cflags_for(sizes, pin))
                self.fn = self.bpf.load_func(b"xdp_zfast", bcc.BPF.XDP)
                err = None
            except Exception as e:  # BCC raises bare Exception with the reason in text
                err = e
        if err is not None:
            saved = Path(f"/tmp/zfast-verifier-{os.getpid()}.log")
            saved.write_text(log.text)
            raise DatapathError(f"the kernel refused the zfast program: {_last_reason(log.text) or err}"
                                f" (compiler/verifier log: {saved})") from None
        _release_compiler_heap()
        self.prog_fd = self.fn.fd
        self.prog_id = int(fd_info(self.prog_fd).get("prog_id", 0))
        self.attached: dict[str, Attachment] = {}
        self._config_lock = threading.Lock()

    # ---- maps -------------------------------------------------------------

    def table(self, name: str):
        return self.bpf[name.encode()]

    def percpu_sum(self, name: str, index: int) -> tuple[int, int]:
        """(packets, bytes) of one slot of a per-CPU counter array, over all CPUs."""
        table = self.table(name)
        values = table.getvalue(table.Key(index))
        return sum(v.packets for v in values), sum(v.bytes for v in values)

    def percpu_all(self, name: str, count: int) -> np.ndarray:
        """Counters of slots 0..count-1 as an array of shape (count, 2): packets, bytes."""
        table = self.table(name)
        out = np.zeros((count, 2), dtype=np.uint64)
        for i in range(count):
            values = table.getvalue(table.Key(i))
            out[i, 0] = sum(v.packets for v in values)
            out[i, 1] = sum(v.bytes for v in values)
        return out

    def reason_counters(self) -> dict[str, tuple[int, int]]:
        counts = self.percpu_all("reason_stats", len(reasons()))
        return {r.name: (int(counts[r.index, 0]), int(counts[r.index, 1])) for r in reasons()}

    def update_config(self, **fields) -> None:
        """Change some fields of struct zf_config; the others keep their values (the
        firewall and the pair write different fields from different threads)."""
        with self._config_lock:
            cfg = self.table("config")
            value = cfg[cfg.Key(0)]
            for name, v in fields.items():
                setattr(value, name, v)
            cfg[cfg.Key(0)] = value

    def config(self):
        cfg = self.table("config")
        return cfg[cfg.Key(0)]

    def update_batch(self, name: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Write many entries at once; keys/values are numpy arrays laid out like Key/Leaf."""
        table = self.table(name)
        n = len(keys)
        if n == 0:
            return
        ct_keys = (table.Key * n).from_buffer(keys)
        ct_values = (table.Leaf * n).from_buffer(values)
        try:
            table.items_update_batch(ct_keys, ct_values)
        except Exception:
            for k, v in zip(ct_keys, ct_values):  # map types or kernels without batch ops
                table[k] = v

    def delete_batch(self, name: str, keys: np.ndarray) -> None:
        table = self.table(name)
        n = len(keys)
        if n == 0:
            return
        ct_keys = (table.Key * n).from_buffer(keys)
        try:
            table.items_delete_batch(ct_keys)
        except Exception:
            for k in ct_keys:
                try:
                    del table[k]
                except KeyError:
                    pass

    def write_ring(self, ring: int, backend_ids: np.ndarray) -> None:
        """Fill Maglev ring number ``ring`` with backend indices, in one batch syscall."""
        size = self.sizes.maglev_size
        if len(backend_ids) != size:
            raise ValueError(f"a ring has {size} slots, got {len(backend_ids)}")
        keys = np.arange(ring * size, (ring + 1) * size, dtype=np.uint32)
        self.update_batch("rings", keys, np.array(backend_ids, dtype=np.uint32))

    def set_tx_ports(self, ifindexes: list[int]) -> None:
        tx = self.table("tx_ports")
        for idx in ifindexes:
            if 0 < idx < self.sizes.max_ifindex:
                try:
                    if tx[ctypes.c_int(idx)].value == idx:
                        continue        # a rewrite would allocate a new entry for nothing
                except KeyError:
                    pass
                tx[ctypes.c_int(idx)] = ctypes.c_int(idx)

    # ---- XDP attach -------------------------------------------------------

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach to one interface; auto tries native (driver) mode, then generic."""
        bcc = _bcc()
        ifindex(ifname)  # a clear error for a missing interface
        tries = ["native", "generic"] if mode == "auto" else [mode]
        last = None
        for m in tries:
            try:
                bcc.BPF.attach_xdp(ifname, self.fn, MODE_FLAGS[m])
            except Exception as err:
                last = err
                continue
            att = Attachment(ifname, m, self.prog_id)
            self.attached[ifname] = att
            return att
        raise DatapathError(f"cannot attach XDP to {ifname} ({mode} mode): {last}")

    def detach(self, ifname: str) -> None:
        att = self.attached.pop(ifname, None)
        detach_interface(ifname, att.mode if att else None)

    def detach_all(self) -> None:
        for ifname in list(self.attached):
            try:
                self.detach(ifname)
            except DatapathError:
                pass


def detach_interface(ifname: str, mode: str | None = None) -> None:
    """Remove whatever XDP program is on ifname (in the given mode, or any)."""
    bcc = _bcc()
    try:
        socket.if_nametoindex(ifname)  # gone (with its namespace, or its peer): nothing to do,
    except OSError:                    # and libbcc would print its own error for it
        raise DatapathError(f"interface {ifname!r} does not exist") from None
    modes = [mode] if mode else ["native", "generic"]
    for m in modes:
        try:
            bcc.BPF.remove_xdp(ifname, MODE_FLAGS[m])
        except Exception as err:
            if "No such device" in str(err):
                raise DatapathError(f"interface {ifname!r} does not exist") from None


def attached_prog(ifname: str) -> tuple[int, str] | None:
    """(prog_id, mode) of the XDP program on ifname, from `ip -d link`, or None."""
    import json
    import subprocess

    out = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", ifname],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise DatapathError(f"interface {ifname!r} does not exist")
    info = json.loads(out.stdout)[0]
    xdp = info.get("xdp")
    if not xdp:
        return None
    mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("mode"), "unknown")
    prog = xdp.get("prog", {})
    return int(prog.get("id", 0)), mode
