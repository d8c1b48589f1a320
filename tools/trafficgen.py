#!/usr/bin/env python3
"""A traffic generator for kernels without pktgen: XDP + BPF_PROG_RUN live frames.

A small XDP program (tools/trafficgen.c) is run by BPF_PROG_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES, ``repeat`` frames per call: every run writes the
full headers from a template map, varies the source port and/or address to
make N flows, and bpf_redirect()s the frame to the sending veth, whose peer
receives it like traffic from a wire.  The peer must have NAPI on (an XDP
program attached, or ``ethtool -K PEER gro on``) or the veth drops the frames.

    trafficgen.py --ns NS --dev eth0 --dst-mac 02:..:01 --src 10.0.0.1 --dst 10.0.0.2 \\
                  --dport 5000 --flows 1000 --size 64 --duration 5

Importable: ``Generator(FlowSpec(...), ns=..., dev=...)`` then ``.run(seconds)``,
or ``.start()`` / ``.stop()`` in the background.  ``--pktgen`` drives the
kernel's pktgen (/proc/net/pktgen) instead, where that module exists.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zfast.dataplane.progrun import BPF_F_TEST_XDP_LIVE_FRAMES, run_xdp  # noqa: E402
from zfast.lab.netns import in_ns  # noqa: E402

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
PROTOS = ("udp", "tcp-syn")
VARY = ("port", "addr", "both")


class GenError(Exception):
    """Something the user can fix: one readable line."""


# --------------------------------------------------------------------------- frames

def _csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise GenError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise GenError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)") from None


@dataclass(frozen=True)
class FlowSpec:
    """What to send: one template frame, N flows made by varying the source."""
    src_mac: bytes
    dst_mac: bytes
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    dport: int = 9
    sport: int = 10000          # source port of flow 0
    flows: int = 1
    vary: str = "port"          # port | addr | both
    ports_per_addr: int = 100   # for vary=both
    size: int = 64              # frame bytes, without FCS
    proto: str = "udp"          # udp | tcp-syn

    def __post_init__(self):
        if self.src.version != self.dst.version:
            raise GenError(f"--src {self.src} and --dst {self.dst} are not the same IP version")
        if self.proto not in PROTOS:
            raise GenError(f"--proto {self.proto!r}: one of {', '.join(PROTOS)}")
        if self.vary not in VARY:
            raise GenError(f"--vary {self.vary!r}: one of {', '.join(VARY)}")
        if self.flows < 1:
            raise GenError("--flows must be >= 1")
        if not 1 <= self.dport <= 65535 or not 1 <= self.sport <= 65535:
            raise GenError("ports must be 1-65535")
        if self.sport + self.ports - 1 > 65535:
            raise GenError(f"{self.ports} source ports from {self.sport} go past 65535: "
                           f"lower --sport, or --vary addr/both")
        if self.size < self.hdr_len:
            raise GenError(f"--size {self.size} is smaller than the headers ({self.hdr_len} bytes)")
        if self.size > 3000:
            raise GenError(f"--size {self.size}: at most 3000 (a live frame fits a page)")

    @property
    def v6(self) -> bool:
        return self.src.version == 6

    @property
    def l3_len(self) -> int:
        return 40 if self.v6 else 20

    @property
    def l4_len(self) -> int:
        return 8 if self.proto == "udp" else 20

    @property
    def hdr_len(self) -> int:
        return 14 + self.l3_len + self.l4_len

    @property
    def ports(self) -> int:
        """Source ports per source address."""
        if self.vary == "port":
            return self.flows
        if self.vary == "addr":
            return 1
        return max(1, min(self.ports_per_addr, self.flows))

    # offsets the C program patches
    @property
    def sport_off(self) -> int:
        return 14 + self.l3_len

    @property
    def saddr_off(self) -> int:
        return 14 + (8 + 12 if self.v6 else 12)   # last 32-bit word of the source

    @property
    def ipcsum_off(self) -> int:
        return -1 if self.v6 else 14 + 10

    @property
    def l4csum_off(self) -> int:
        return 14 + self.l3_len + (6 if self.proto == "udp" else 16)

    @property
    def saddr_base(self) -> int:
        return int.from_bytes(self.src.packed[-4:], "big")

    def flow(self, i: int) -> tuple[ipaddress._BaseAddress, int]:
        """(source address, source port) of flow i (0 <= i < flows)."""
        i %= self.flows
        port = self.sport + i % self.ports
        last = (self.saddr_base + i // self.ports) & 0xFFFFFFFF
        src = ipaddress.ip_address(self.src.packed[:-4] + last.to_bytes(4, "big"))
        return src, port

    def frame(self, i: int = 0, src=None, sport: int | None = None) -> bytes:
        """The whole frame of flow i (or of the given source), checksums computed from scratch."""
        fsrc, fport = self.flow(i)
        src = fsrc if src is None else ipaddress.ip_address(src)
        sport = fport if sport is None else sport
        proto = IPPROTO_UDP if self.proto == "udp" else IPPROTO_TCP
        if self.proto == "udp":
            l4_total = self.size - 14 - self.l3_len
            payload = bytes(l4_total - 8)
            l4 = struct.pack("!HHHH", sport, self.dport, l4_total, 0)
        else:
            l4_total = 20
            payload = b""
            # SYN, data offset 5, window 64240, a fixed ISN
            l4 = struct.pack("!HHIIBBHHH", sport, self.dport, 0x7A660001, 0, 5 << 4, 0x02,
                             64240, 0, 0)
        if self.v6:
            pseudo = src.packed + self.dst.packed + struct.pack("!IxxxB", l4_total, proto)
        else:
            pseudo = src.packed + self.dst.packed + struct.pack("!xBH", proto, l4_total)
        c = _csum(pseudo + l4 + payload)
        if self.proto == "udp":
            c = c or 0xFFFF
            l4 = l4[:6] + struct.pack("!H", c)
        else:
            l4 = l4[:16] + struct.pack("!H", c) + l4[18:]
        if self.v6:
            l3 = struct.pack("!IHBB", 6 << 28, l4_total, proto, 64) + src.packed + self.dst.packed
            ethertype = ETH_P_IPV6
        else:
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_total, 0, 0x4000, 64, proto, 0,
                             src.packed, self.dst.packed)
            l3 = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
            ethertype = ETH_P_IP
        eth = self.dst_mac + self.src_mac + struct.pack("!H", ethertype)
        out = eth + l3 + l4 + payload
        return out.ljust(self.size, b"\0")

    def cflags(self) -> list[str]:
        return [f"-DHDR_LEN={self.hdr_len}", f"-DSPORT_OFF={self.sport_off}",
                f"-DSADDR_OFF={self.saddr_off}", f"-DIPCSUM_OFF={self.ipcsum_off}",
                f"-DL4CSUM_OFF={self.l4csum_off}", f"-DIS_UDP={int(self.proto == 'udp')}"]


# --------------------------------------------------------------------------- helpers

def dev_info(ns: str | None, dev: str) -> tuple[int, bytes]:
    """(ifindex, MAC) of dev as seen from namespace ns."""
    with in_ns(ns):
        try:
            idx = socket.if_nametoindex(dev)
        except OSError:
            raise GenError(f"interface {dev!r} does not exist in namespace {ns or '(current)'}") from None
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        SIOCGIFHWADDR = 0x8927
        res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", dev.encode()))
        mac = res[18:24]
    finally:
        s.close()
    return idx, mac


def _bcc_bpf():
    try:
        from bcc import BPF
    except ImportError as err:
        raise GenError("BCC's Python module is missing (Debian: python3-bpfcc)") from err
    return BPF


def online_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass
class GenResult:
    sent: int
    seconds: float
    per_cpu: dict[int, int] = field(default_factory=dict)

    @property
    def pps(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- generator

def compile_program(spec: FlowSpec, extra_cflags: list[str] | None = None):
    """(BPF object, XDP function) of trafficgen.c built for spec's frame layout."""
    BPF = _bcc_bpf()
    try:
        bpf = BPF(src_file=str(TOOLS / "trafficgen.c"),
                  cflags=spec.cflags() + (extra_cflags or []) + ["-Wno-unused-function"])
        return bpf, bpf.load_func("xdp_gen", BPF.XDP)
    except Exception as err:
        raise GenError(f"the kernel refused the generator program: {err}") from None


def configure(bpf, spec: FlowSpec, ifindex: int = 0, mult: int = 1) -> None:
    """Write spec (template frame, flows) into the program's gen_cfg; reset its counter."""
    cfg_t = bpf["gen_cfg"]
    cfg = cfg_t.Leaf()
    cfg.ifindex = ifindex
    cfg.flows = spec.flows
    cfg.ports = spec.ports
    cfg.sport_base = spec.sport
    cfg.saddr_base = spec.saddr_base
    cfg.mult = mult
    hdr = spec.frame(0)[:spec.hdr_len]
    ctypes.memmove(ctypes.addressof(cfg.hdr), hdr, len(hdr))
    cfg_t[cfg_t.Key(0)] = cfg
    cnt = bpf["gen_count"]
    zeros = cnt.getvalue(cnt.Key(0))
    for j in range(len(zeros)):
        zeros[j] = 0
    cnt[cnt.Key(0)] = zeros


class Generator:
    """The XDP generator program, loaded and configured for one FlowSpec on one veth."""

    def __init__(self, spec: FlowSpec, ns: str | None, dev: str, batch_size: int = 64):
        self.spec, self.ns, self.dev = spec, ns, dev
        self.batch_size = batch_size
        self.ifindex, _ = dev_info(ns, dev)
        self.bpf, self.fn = compile_program(spec)
        self.prog_fd = self.fn.fd
        configure(self.bpf, spec, self.ifindex)
        self.packet = spec.frame(0)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._t0 = self._c0 = 0
        self._pc0: list[int] = []

    def sent(self) -> int:
        """Frames the program has generated (all CPUs, since load)."""
        t = self.bpf["gen_count"]
        return sum(int(v) for v in t.getvalue(t.Key(0)))

    def sent_per_cpu(self) -> list[int]:
        t = self.bpf["gen_count"]
        return [int(v) for v in t.getvalue(t.Key(0))]

    def run_once(self, repeat: int) -> None:
        """One BPF_PROG_RUN of repeat live frames (the caller must be in self.ns)."""
        run_xdp(self.prog_fd, self.packet, ingress_ifindex=self.ifindex, repeat=repeat,
                flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=self.batch_size)

    # BPF_PROG_RUN with live frames sets up and tears down a page pool on every call,
    # which waits ~25 ms (an RCU grace period) whatever `repeat` is: calls must be long,
    # and a second thread on the same CPU sends while the first one waits.
    CALL_SECONDS = 0.3

    def _worker(self, cpu: int | None, rate: float | None, deadline: float) -> None:
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})   # 0: this thread
            with in_ns(self.ns):
                start = time.monotonic()
                done = 0
                # with a rate: one call per 0.1 s of traffic, the frames go out as a burst
                chunk = max(1, int(rate * 0.1)) if rate else 1 << 18
                while not self._stop.is_set():
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    if rate:
                        ahead = done / rate - (now - start)
                        if ahead > 0:
                            time.sleep(min(ahead, deadline - now))
                            continue
                    t0 = time.monotonic()
                    try:
                        self.run_once(chunk)
                    except OSError as err:
                        if err.errno == errno.EINTR:
                            continue
                        raise
                    done += chunk
                    if not rate:
                        dt = max(time.monotonic() - t0, 1e-4)
                        left = max(deadline - time.monotonic(), 0.05)
                        want = min(self.CALL_SECONDS, left)
                        chunk = int(min(max(chunk * want / dt, 4096), 1 << 24))
        except BaseException as err:  # reported by stop()/run()
            self._errors.append(err)
            self._stop.set()

    def start(self, duration: float = 1e9, rate: float | None = None,
              cpus: list[int] | None = None, threads_per_cpu: int | None = None) -> None:
        """Send in background threads, threads_per_cpu on each CPU of cpus (None: unpinned).

        threads_per_cpu defaults to 2 at full speed (one sends while the other waits
        for its call's set-up), 1 with a rate.
        """
        if self._threads:
            raise GenError("already running")
        self._stop.clear()
        self._errors.clear()
        if threads_per_cpu is None:
            threads_per_cpu = 1 if rate else 2
        slots = [c for c in (cpus if cpus else [None]) for _ in range(threads_per_cpu)]
        per = rate / len(slots) if rate else None
        self._t0, self._c0 = time.monotonic(), self.sent()
        self._pc0 = self.sent_per_cpu()
        deadline = self._t0 + duration
        self._threads = [threading.Thread(target=self._worker, args=(c, per, deadline),
                                          daemon=True, name=f"trafficgen-{c}") for c in slots]
        for th in self._threads:
            th.start()

    def stop(self) -> GenResult:
        self._stop.set()
        return self.wait()

    def wait(self) -> GenResult:
        for th in self._threads:
            th.join()
        self._threads = []
        elapsed = time.monotonic() - self._t0
        if self._errors:
            err = self._errors[0]
            raise GenError(f"generator failed: {err}") from err
        per = [a - b for a, b in zip(self.sent_per_cpu(), self._pc0)]
        return GenResult(sum(per), elapsed, {i: v for i, v in enumerate(per) if v})

    def run(self, duration: float, rate: float | None = None,
            cpus: list[int] | None = None, threads_per_cpu: int | None = None) -> GenResult:
        self.start(duration, rate, cpus, threads_per_cpu)
        return self.wait()

    def check_once(self) -> int:
        """One live frame; raises GenError with the reason when the kernel refuses."""
        try:
            with in_ns(self.ns):
                self.run_once(1)
        except OSError as err:
            raise GenError(f"BPF_PROG_RUN with live frames failed on {self.dev}: {err}") from None
        return self.sent()


# --------------------------------------------------------------------------- pktgen

PKTGEN_HINT = ("the kernel has no pktgen (CONFIG_NET_PKTGEN) or its module is not loaded "
               "(modprobe pktgen); run without --pktgen to use the XDP live-frames generator")


def pktgen_dir() -> Path:
    # thread-self: /proc/net follows the main thread's namespace, not this thread's
    return Path("/proc/thread-self/net/pktgen")


def run_pktgen(spec: FlowSpec, ns: str | None, dev: str, duration: float,
               cpus: list[int], rate: float | None = None) -> GenResult:
    """Drive the kernel's pktgen: one device per CPU thread, UDP only."""
    if spec.proto != "udp":
        raise GenError("--pktgen sends UDP only (pktgen has no TCP SYN mode)")
    with in_ns(ns):
        base = pktgen_dir()
        if not base.is_dir() and shutil.which("modprobe"):
            subprocess.run(["modprobe", "pktgen"], capture_output=True)
        if not base.is_dir():
            raise GenError(f"--pktgen: {base} does not exist: {PKTGEN_HINT}")
        (base / "pgctrl").write_text("reset\n")

        def pg(path: Path, cmd: str) -> None:
            path.write_text(cmd + "\n")
            result = path.read_text()
            if "Result: OK" not in result and "Result:" in result and path.name != "pgctrl":
                line = next(x for x in result.splitlines() if x.startswith("Result:"))
                raise GenError(f"pktgen refused {cmd!r} on {path.name}: {line}")

        devs = []
        src_lo, sp_lo = spec.flow(0)
        src_hi, sp_hi = spec.flow(spec.flows - 1)
        for cpu in cpus:
            thread = base / f"kpktgend_{cpu}"
            if not thread.exists():
                raise GenError(f"--pktgen: no pktgen thread for CPU {cpu} ({thread})")
            name = f"{dev}@{cpu}"
            pg(thread, "rem_device_all")
            pg(thread, f"add_device {name}")
            d = base / name
            # ratep paces each xmit, and a burst sends that many frames per xmit: a rate
            # wants bursts of one, or pktgen sends up to 32x as many (seen in a 6.1 guest)
            burst = 1 if rate else 32
            cmds = ["count 0", "clone_skb 0", f"burst {burst}", f"pkt_size {spec.size + 4}",
                    f"dst_mac {':'.join(f'{b:02x}' for b in spec.dst_mac)}",
                    f"udp_dst_min {spec.dport}", f"udp_dst_max {spec.dport}",
                    f"udp_src_min {sp_lo}", f"udp_src_max {max(sp_lo, min(sp_hi, 65535))}",
                    f"flows {spec.flows}", "flowlen 1", "flag UDPSRC_RND"]
            if spec.v6:
                cmds += [f"dst6 {spec.dst}", f"src6 {spec.src}"]
            else:
                cmds += [f"dst {spec.dst}", f"src_min {src_lo}", f"src_max {src_hi}"]
            if rate:
                cmds.append(f"ratep {int(rate / len(cpus))}")
            for c in cmds:
                pg(d, c)
            devs.append(d)
        starter = threading.Thread(target=lambda: (base / "pgctrl").write_text("start\n"),
                                   daemon=True)
        t0 = time.monotonic()
        starter.start()
        time.sleep(duration)
        (base / "pgctrl").write_text("stop\n")
        starter.join(5)
        elapsed = time.monotonic() - t0
        sent = 0
        for d in devs:
            for line in d.read_text().splitlines():
                if line.strip().startswith("pkts-sofar:"):
                    sent += int(line.split()[1])
        return GenResult(sent, elapsed)


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="XDP live-frames traffic generator (no pktgen needed). The receiving end "
                    "of --dev must have NAPI on: an XDP program attached, or GRO on.")
    ap.add_argument("--ns", help="namespace to send from (name in /run/netns or a path); "
                                 "default: the current one")
    ap.add_argument("--dev", required=True, help="sending interface (a veth)")
    ap.add_argument("--dst-mac", required=True, help="destination MAC (the peer's)")
    ap.add_argument("--src-mac", help="source MAC (default: --dev's)")
    ap.add_argument("--src", required=True, help="source IPv4/IPv6 address of flow 0")
    ap.add_argument("--dst", required=True, help="destination address")
    ap.add_argument("--dport", type=int, default=9)
    ap.add_argument("--sport", type=int, default=10000, help="source port of flow 0")
    ap.add_argument("--flows", type=int, default=1, help="number of distinct flows")
    ap.add_argument("--vary", choices=VARY, default="port",
                    help="what makes flows differ: source port, source address, or both")
    ap.add_argument("--ports-per-addr", type=int, default=100, help="with --vary both")
    ap.add_argument("--size", type=int,
                    help="frame size in bytes, no FCS (default 64, or the headers' size "
                         "if larger: 74 for IPv6 TCP)")
    ap.add_argument("--proto", choices=PROTOS, default="udp")
    ap.add_argument("--rate", type=float, help="target packets/s over all CPUs (approximate)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds")
    ap.add_argument("--cpus", help="CPUs to send from, e.g. 0,1 or all (default: one unpinned "
                                   "thread)")
    ap.add_argument("--batch-size", type=int, default=64, help="BPF_PROG_RUN batch_size")
    ap.add_argument("--pktgen", action="store_true",
                    help="use the kernel's pktgen (/proc/net/pktgen) instead of XDP")
    return ap


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    if text == "all":
        return online_cpus()
    try:
        cpus = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise GenError(f"--cpus {text!r}: a list like 0,1 or 'all'") from None
    bad = [c for c in cpus if c not in online_cpus()]
    if bad:
        raise GenError(f"--cpus: CPU {bad[0]} is not available (have {online_cpus()})")
    return cpus


def spec_from_args(args) -> FlowSpec:
    ifindex, mac = dev_info(args.ns, args.dev)
    try:
        src, dst = ipaddress.ip_address(args.src), ipaddress.ip_address(args.dst)
    except ValueError as err:
        raise GenError(str(err)) from None
    size = args.size
    if size is None:
        hdr = 14 + (40 if src.version == 6 else 20) + (8 if args.proto == "udp" else 20)
        size = max(64, hdr)
    return FlowSpec(src_mac=parse_mac(args.src_mac) if args.src_mac else mac,
                    dst_mac=parse_mac(args.dst_mac), src=src, dst=dst, dport=args.dport,
                    sport=args.sport, flows=args.flows, vary=args.vary,
                    ports_per_addr=args.ports_per_addr, size=size, proto=args.proto)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise GenError("needs root (BPF programs and namespaces)")
        spec = spec_from_args(args)
        cpus = parse_cpus(args.cpus)
        if args.pktgen:
            res = run_pktgen(spec, args.ns, args.dev, args.duration, cpus or [0], args.rate)
            print(f"pktgen: sent {res.sent} packets in {res.seconds:.2f} s: "
                  f"{res.pps / 1e6:.3f} Mpps")
            return 0
        gen = Generator(spec, args.ns, args.dev, batch_size=args.batch_size)
        gen.check_once()
        res = gen.run(args.duration, rate=args.rate, cpus=cpus)
    except GenError as err:
        print(f"trafficgen: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    cpu_note = ", ".join(f"cpu{c}: {n}" for c, n in res.per_cpu.items())
    print(f"sent {res.sent} packets in {res.seconds:.2f} s: {res.pps / 1e6:.3f} Mpps "
          f"({res.pps:.0f} pps; {spec.flows} flows, {spec.size} B, {spec.proto}; {cpu_note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
