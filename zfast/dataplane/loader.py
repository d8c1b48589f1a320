"""The data plane as Python sees it: bpf/zfast.c compiled by BCC, its maps, attach.

One source, two programs (bpf/hook.h): ``xdp_zfast`` in the driver of a physical or
virtio NIC, ``tc_zfast`` at tc ingress of a virtual interface (veth, bridge port),
where senders on the same host hand over partial checksums that only an skb carries.
`choose_hook` decides per interface and says why; `zfast status` shows it.

Map keys and values are BCC's ctypes classes, generated from the C structs in
bpf/zfast_shared.h (``self.table("flows").Key``): no layout is written twice.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:         # numpy at first use: `zfast up` starts the kernel's work on
    import numpy as np  # the data plane before it imports it (zfast/node/prestart.py)

from zfast.config import Datapath as Sizes
from zfast.dataplane import bpflib, progcache, virtio
from zfast.dataplane.background import Background
from zfast.dataplane.mapbatch import read_all
from zfast.dataplane.reasons import defines, reasons
from zfast.paths import bpf_dir, ensure_bpffs, pin_dir

# XDP attach flags (linux/if_link.h)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}

# The program functions of bpf/zfast.c and their BPF program types.
PROGRAMS = [("xdp_zfast", progcache.XDP), ("tc_zfast", progcache.SCHED_CLS)]
HOOKS = {"xdp": "xdp_zfast", "tc": "tc_zfast"}     # hook -> its program function

# tc: where our filter sits in clsact's ingress hook
TC_PRIO = 1
TC_HANDLE = 1

# Link kinds whose receive path is an skb handed over by a local sender (a veth peer,
# a bridge, a tunnel, a VM's tap): its checksum may be partial, so tc, not XDP.
VIRTUAL_KINDS = frozenset({"veth", "bridge", "vxlan", "geneve", "tun", "tap", "macvlan", "macvtap",
                           "ipvlan", "netkit", "dummy", "gretap", "ip6gretap"})

AF = {4: 4, 6: 6}  # ip.version -> ZF_AF_* (the same numbers, by design)
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAME = {v: k for k, v in PROTO.items()}

# flags of struct backend, of tx_flags: zfast_shared.h's own
BACKEND_UP = defines()["ZF_BACKEND_UP"]
BACKEND_DOWN = defines()["ZF_BACKEND_DOWN"]
NO_BACKEND = defines()["ZF_NO_BACKEND"]
TX_KERNEL = defines()["ZF_TX_KERNEL"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DatapathError(Exception):
    """The kernel or BCC refused something; the message says what, in one line."""


def _bcc():
    try:
        # libbcc links LLVM and clang (~200 MiB resident): only a cache miss compiles.
        # Debian's python3-bpfcc; PyPI's "bcc" is another project.
        import bcc  # noqa: PLC0415
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
    """The -D flags that change the program's instructions: the Maglev table size (a
    modulo in bpf/flows.h) and the pin dir. The other sizes only size maps (size_flags)."""
    flags = [
        f"-DZF_RING_SIZE={sizes.maglev_size}",
        "-Wno-unused-function",
        "-Wno-compare-distinct-pointer-types",
    ]
    if pin is not None:
        flags.append(f'-DZF_PIN_DIR="{pin}"')
    return flags


def size_flags(sizes: Sizes) -> list[str]:
    """The -D flags that size maps and nothing else in bpf/ (map_sizes says which)."""
    return [
        f"-DZF_FLOW_TABLE={sizes.flow_table}",
        f"-DZF_MAX_SERVICES={sizes.max_services}",
        f"-DZF_MAX_BACKENDS={sizes.max_backends}",
        f"-DZF_MAX_IFINDEX={sizes.max_ifindex}",
        f"-DZF_MAX_PUBLIC_PORTS={sizes.max_public_ports}",
        f"-DZF_MAX_RULES={sizes.max_rules}",
        f"-DZF_RATE_TABLE={sizes.rate_table}",
    ]


def map_sizes(sizes: Sizes) -> dict[str, int]:
    """max_entries of every map size_flags sizes, as bpf/maps.h declares it. The program
    cache makes the maps at these sizes, so a new size reuses the compiled program; a
    compile checks this table against the maps BCC made (progcache._check_sizes)."""
    return {
        "flows": sizes.flow_table,
        "service_stats": sizes.max_services,
        "rings": 2 * sizes.max_services,    # ZF_MAX_RINGS: two a service (swap, not edit)
        "backends": sizes.max_backends,
        "backend_stats": sizes.max_backends,
        "if_macs": sizes.max_ifindex,
        "tx_flags": sizes.max_ifindex,
        "tx_ports": sizes.max_ifindex,
        "fw_ports": sizes.max_public_ports,
        "port_stats": sizes.max_public_ports * defines()["ZF_PORT_VERDICTS"],
        "fw_rules0": sizes.max_rules,
        "fw_rules1": sizes.max_rules,
        "rule_stats": sizes.max_rules,
        "rate_state": sizes.rate_table,
    }


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
    lines = [line.strip() for line in log.splitlines() if line.strip() and not line.startswith(";")]
    for i, line in enumerate(lines):
        if line.startswith("processed ") and i > 0:
            return lines[i - 1]
    errors = [line for line in lines if "error:" in line]
    return errors[0] if errors else None


def _refused(log: str, err: Exception) -> DatapathError:
    """The one-line error for a compile or load the kernel or BCC refused; the whole
    compiler/verifier log goes to a file it names."""
    saved = Path(f"/tmp/zfast-verifier-{os.getpid()}.log")
    saved.write_text(log)
    return DatapathError(f"the kernel refused the zfast program: {_last_reason(log) or err}"
                         f" (compiler/verifier log: {saved})")


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
    mode: str      # native | generic (XDP) | tc, as attached
    prog_id: int
    why: str = ""  # why this hook and mode: the interface's kind or the project file

    @property
    def hook(self) -> str:
        return "tc" if self.mode == "tc" else "xdp"


def link_info(ifname: str) -> dict:
    """`ip -d -j link show dev IFNAME`: kind, XDP program, ..."""
    out = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", ifname],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise DatapathError(f"interface {ifname!r} does not exist")
    return json.loads(out.stdout)[0]


def link_kind(ifname: str) -> str | None:
    """veth, bridge, ... for a virtual link; None for a NIC with a driver of its own."""
    return link_info(ifname).get("linkinfo", {}).get("info_kind") or None


def choose_hook(ifname: str, mode: str) -> tuple[list[str], str]:
    """The modes to try on ifname, in order, and why.

    auto: tc on a virtual link (its senders may leave checksums partial, which XDP
    cannot see and no rewrite in XDP can patch; and a veth peer needs no NAPI for an
    skb), XDP in the driver on a NIC, falling back to generic XDP. A mode the project
    file names is used as it is."""
    kind = link_kind(ifname)
    if mode != "auto":
        why = f"mode {mode} set in the project file"
        if mode != "tc" and kind in VIRTUAL_KINDS:
            why += (f"; {kind}: a virtual link, whose senders must turn TX checksum offload "
                    "off (partial checksums reach XDP unmarked)")
        return [mode], why
    if kind in VIRTUAL_KINDS:
        return ["tc"], (f"{kind}: a virtual link; local senders hand over partial checksums "
                        "(TX offload), which only tc's skb carries")
    return ["native", "generic"], ("a NIC driver: XDP before any skb exists"
                                   if kind is None else f"{kind}: XDP")


def is_cached(sizes: Sizes, pin: Path) -> bool:
    """Whether a start at these sizes, pinning in pin, finds its program in the program
    cache (no compile: it answers in a second or two, not in ten)."""
    return progcache.has_entry(cache_key(sizes, pin))


def cache_key(sizes: Sizes, pin: Path | None) -> str:
    """The program cache's key of the program a start at these sizes loads."""
    src = inline_source(bpf_dir() / "zfast.c")
    return progcache.cache_key(progcache.key_material(src, cflags_for(sizes, pin), PROGRAMS, pin=pin))


def warm(sizes: Sizes) -> tuple[str, float, str]:
    """Put the program of these sizes in the program cache, compiling it if it is not
    there: (cache status "hit" | "miss" | "off", seconds, key). A start that follows
    (any pin dir: the key leaves it out) loads it without LLVM, so a process with the
    memory of a small instance never compiles (`zfast cache warm`, `zfast core up`)."""
    pin = pin_dir(f"warm-{os.getpid()}")    # the compile pins its maps: somewhere of its own
    key = cache_key(sizes, pin)
    if progcache.has_entry(key):
        return "hit", 0.0, key
    try:
        dp = Loaded(sizes, pin=pin)     # both programs: the kernel verifies them here
        try:
            return dp.cache, dp.cache_s, dp._cache_key
        finally:
            dp.bpf.cleanup()
    finally:
        shutil.rmtree(pin, ignore_errors=True)


def hooks_for(interfaces: Iterable[tuple[str, str]]) -> list[str]:
    """The hooks (interface name, mode) pairs will be attached at: the programs a start
    loads (the others load only if an attach needs them later)."""
    hooks = set()
    for ifname, mode in interfaces:
        try:
            tries, _ = choose_hook(ifname, mode)
        except (OSError, DatapathError):
            continue            # the attach says what is wrong with it
        hooks.add("tc" if tries == ["tc"] else "xdp")
    return sorted(hooks)


class Loaded:
    """One compiled and loaded zfast program with its maps."""

    def __init__(self, sizes: Sizes = Sizes(), pin: Path | None = None,
                 hooks: Iterable[str] = HOOKS, background: bool = False):
        """hooks: the hooks whose programs are loaded now (the kernel verifies each one,
        0.3-0.4 s of CPU); another one is loaded when an attach needs it. background: the
        kernel verifies them in threads of their own while the caller fills the maps
        (a start's services, rings and rules), and program() waits for them."""
        self.sizes = sizes
        self.pin = pin
        if pin is not None:
            ensure_bpffs()
            pin.mkdir(parents=True, exist_ok=True)
        hooks = list(hooks)
        src = inline_source(bpf_dir() / "zfast.c")
        with _captured_stderr() as log:
            try:
                # compiled by BCC, or loaded from the program cache without LLVM
                got = progcache.load(src, cflags_for(sizes, pin), PROGRAMS, pin=pin, bcc=_bcc,
                                     size_flags=size_flags(sizes), map_sizes=map_sizes(sizes),
                                     load=[] if background else [HOOKS[h] for h in hooks])
                self.bpf, self.cache = got.bpf, got.status
                err = None
            except DatapathError:
                raise
            except Exception as e:  # BCC raises bare Exception with the reason in text
                err = e
        if err is not None:
            raise _refused(log.text, err)
        self.cache_s, self._cache_key = got.seconds, got.key
        self._programs: dict[str, object] = {}
        self._prog_ids: dict[str, int] = {}
        self._verifying: dict[str, Background] = {}   # hook -> its program, loading
        for hook in hooks:
            if background:
                name = HOOKS[hook]
                self._verifying[hook] = Background(self.bpf.load_func, name.encode(),
                                                   dict(PROGRAMS)[name], name=f"verify {name}")
            else:
                self._programs[hook] = got.funcs[HOOKS[hook]]
        _release_compiler_heap()
        self.attached: dict[str, Attachment] = {}
        self._config_lock = threading.Lock()

    def program(self, hook: str):
        """The loaded program of a hook ("xdp" or "tc"), loaded now if it is not yet."""
        if hook in self._verifying:
            fn, err = self._verifying.pop(hook).wait()
            if err is not None:
                if self.cache == "hit":
                    progcache.forget(self._cache_key)
                    raise DatapathError(f"the kernel refused the cached zfast program ({err}); "
                                        "its cache entry is removed, the next start compiles")
                raise DatapathError(f"the kernel refused the zfast program: {err}")
            self._programs[hook] = fn
        if hook not in self._programs:
            name = HOOKS[hook]
            with _captured_stderr() as log:
                try:
                    self._programs[hook] = self.bpf.load_func(name.encode(), dict(PROGRAMS)[name])
                    err = None
                except Exception as e:
                    err = e
            if err is not None:
                raise _refused(log.text, err)
        return self._programs[hook]

    def program_id(self, hook: str) -> int:
        if hook not in self._prog_ids:
            self._prog_ids[hook] = int(fd_info(self.program(hook).fd).get("prog_id", 0))
        return self._prog_ids[hook]

    @property
    def loaded_hooks(self) -> list[str]:
        return sorted(self._programs)

    # the XDP program, as tools and tests use it
    fn = property(lambda self: self.program("xdp"))
    fn_tc = property(lambda self: self.program("tc"))
    prog_fd = property(lambda self: self.program("xdp").fd)
    prog_id = property(lambda self: self.program_id("xdp"))
    tc_prog_id = property(lambda self: self.program_id("tc"))

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
        import numpy as np  # noqa: PLC0415 -- after the prestart (see the top)

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
        """Make Maglev ring number ``ring``: a new array like ring_template (bpf/maps.h),
        filled with backend indices in one batch syscall, then put in rings[ring] at once
        (the ring it replaces is freed when the last packet using it is done)."""
        size = self.sizes.maglev_size
        if len(backend_ids) != size:
            raise ValueError(f"a ring has {size} slots, got {len(backend_ids)}")
        import numpy as np  # noqa: PLC0415 -- after the prestart (see the top)

        like = bpflib.map_info(self.table("ring_template").get_fd())
        fd = bpflib.create_map(like.type, "ring", like.key_size, like.value_size,
                               like.max_entries, like.map_flags)
        try:
            bpflib.update_batch(fd, np.arange(size, dtype=np.uint32).tobytes(),
                                np.asarray(backend_ids, dtype=np.uint32).tobytes(), size)
            self.table("rings")[ctypes.c_uint32(ring)] = ctypes.c_int(fd)
        finally:
            os.close(fd)            # rings[ring] holds it now

    def clear_ring(self, ring: int) -> None:
        """Free ring number ``ring`` (a service that is gone: its flows keep their backends)."""
        try:
            del self.table("rings")[ctypes.c_uint32(ring)]
        except KeyError:
            pass

    def read_ring(self, ring: int) -> np.ndarray | None:
        """Ring number ``ring`` as written (None: no ring there)."""
        import numpy as np  # noqa: PLC0415 -- after the prestart (see the top)

        try:
            inner_id = self.table("rings")[ctypes.c_uint32(ring)].value
        except KeyError:
            return None
        fd = bpflib.map_fd_by_id(inner_id)
        try:
            keys, values, n = read_all(fd, 4, 4)
        finally:
            os.close(fd)
        out = np.empty(n, dtype=np.uint32)
        out[np.frombuffer(keys, dtype=np.uint32)] = np.frombuffer(values, dtype=np.uint32)
        return out

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

    def set_tx_kernel(self, idx: int, kernel: bool) -> None:
        """ZF_TX_KERNEL for egress ifindex idx: XDP hands its packets to the kernel."""
        if not 0 < idx < self.sizes.max_ifindex:
            return
        flags = self.table("tx_flags")
        value = flags[flags.Key(idx)].value
        want = (value | TX_KERNEL) if kernel else (value & ~TX_KERNEL)
        if want != value:
            flags[flags.Key(idx)] = flags.Leaf(want)

    # ---- attach -------------------------------------------------------------

    def prog_id_of(self, mode: str) -> int:
        return self.program_id("tc" if mode == "tc" else "xdp")

    def attach(self, ifname: str, mode: str = "auto") -> Attachment:
        """Attach to one interface: tc or XDP by choose_hook (auto: tc on a virtual link,
        else native XDP, then generic); replaces what is there (a restarted daemon's own)."""
        ifindex(ifname)  # a clear error for a missing interface
        tries, why = choose_hook(ifname, mode)
        last = None
        virtio_nic = "native" in tries and virtio.is_virtio(ifname)
        if virtio_nic:
            tries, why = virtio_tries(ifname, mode, tries, why, virtio.refusal(ifname))
            # read before the attach: with XDP on, the driver counts its XDP queues in use too
            queue_note = virtio.attach_note(ifname)
        for m in tries:
            try:
                if m == "tc":
                    tc_attach(ifname, self.program("tc").fd)
                    xdp_detach(ifname)      # one hook at a time: a mode change moves it
                else:
                    bpflib.attach_xdp(ifname, self.program("xdp").fd, MODE_FLAGS[m])
                    tc_detach(ifname)
            except Exception as err:
                last = err
                continue
            if m == "generic" and len(tries) > 1:
                why += f"; no native XDP in this driver ({last})"
            if m == "native" and virtio_nic and queue_note:
                why += f"; {queue_note}"
            att = Attachment(ifname, m, self.prog_id_of(m), why)
            self.attached[ifname] = att
            return att
        raise DatapathError(f"cannot attach zfast to {ifname} ({mode} mode): {last}")

    def detach(self, ifname: str) -> None:
        att = self.attached.pop(ifname, None)
        detach_interface(ifname, att.mode if att else None)

    def detach_all(self) -> None:
        for ifname in list(self.attached):
            try:
                self.detach(ifname)
            except DatapathError:
                pass


def virtio_tries(ifname: str, mode: str, tries: list[str], why: str,
                 problems: list[str]) -> tuple[list[str], str]:
    """The modes to try on a virtio-net NIC whose driver would refuse native XDP for these
    problems (zfast.dataplane.virtio): native named in the project file is refused in one
    line; auto goes on to generic XDP, and why says what native needs."""
    if not problems:
        return tries, why
    if mode == "native":
        raise DatapathError(f"cannot attach zfast to {ifname} in native mode: virtio_net "
                            f"refuses XDP here: {'; '.join(problems)}")
    rest = [m for m in tries if m != "native"]
    return rest, why + f"; not native: virtio_net refuses XDP here ({'; '.join(problems)})"


def tc_attach(ifname: str, prog_fd: int) -> None:
    """Our direct-action filter at tc ingress (clsact made if missing), replacing ours:
    the filter (TC_HANDLE, TC_PRIO), which tc_attached reads back."""
    try:
        bpflib.tc_attach(ifindex(ifname), TC_HANDLE, TC_PRIO, prog_fd)
    except OSError as err:
        raise DatapathError(f"cannot attach the zfast program to {ifname} at tc ingress: "
                            f"{err}") from None


def tc_attached(ifname: str) -> int | None:
    """The id of the program of our filter at tc ingress of ifname, or None."""
    return bpflib.tc_prog_id(ifindex(ifname), TC_HANDLE, TC_PRIO) or None


def tc_detach(ifname: str) -> None:
    """Remove our filter from tc ingress; other filters and the qdisc stay."""
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        return
    bpflib.tc_detach(index, TC_HANDLE, TC_PRIO)


def xdp_detach(ifname: str, mode: str | None = None) -> None:
    for m in [mode] if mode else ["native", "generic"]:
        try:
            bpflib.remove_xdp(ifname, MODE_FLAGS[m])
        except Exception as err:
            if "No such device" in str(err):
                raise DatapathError(f"interface {ifname!r} does not exist") from None


def detach_interface(ifname: str, mode: str | None = None) -> None:
    """Remove zfast from ifname: the XDP program (in the given mode, or any) and our tc filter."""
    try:
        socket.if_nametoindex(ifname)  # gone (with its namespace, or its peer): nothing to do,
    except OSError:                    # and libbcc would print its own error for it
        raise DatapathError(f"interface {ifname!r} does not exist") from None
    if mode != "tc":
        xdp_detach(ifname, mode)
    tc_detach(ifname)


def attached_prog(ifname: str) -> tuple[int, str] | None:
    """(prog_id, mode) of what is on ifname: an XDP program, else zfast's tc filter; or None."""
    xdp = link_info(ifname).get("xdp")
    if xdp:
        mode = {1: "native", 2: "generic", 3: "offload"}.get(xdp.get("mode"), "unknown")
        return int(xdp.get("prog", {}).get("id", 0)), mode
    prog = tc_attached(ifname)
    return (prog, "tc") if prog is not None else None
