#!/usr/bin/env python3
"""Count the packets arriving on an interface (in a namespace), then drop them.

An XDP program (tools/sink.c) attached in native mode counts every frame in
per-CPU counters and drops it; this reads the counters through BCC.  On a veth
the attached program also turns its NAPI on, so the peer can XDP_REDIRECT to it.

    sink.py --ns NS --dev eth0 --interval 1 --duration 10

Importable: ``measure_pps(ns, dev, seconds)``, or ``Sink(ns, dev)`` with
``.counts()`` / ``.rate(seconds)`` / ``.close()``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zfast.lab.netns import in_ns  # noqa: E402

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class SinkError(Exception):
    pass


@dataclass
class Counts:
    packets: int
    bytes: int
    matched: int      # packets to the --match address
    at: float         # time.monotonic() when read


class Sink:
    """The counting XDP program attached to dev in ns; close() detaches it."""

    def __init__(self, ns: str | None, dev: str, mode: str = "native",
                 match: str | None = None):
        try:
            from bcc import BPF
        except ImportError as err:
            raise SinkError("BCC's Python module is missing (Debian: python3-bpfcc)") from err
        self.ns, self.dev, self.mode = ns, dev, mode
        cflags = ["-Wno-unused-function"]
        if match:
            addr = ipaddress.IPv4Address(match)
            cflags.append(f"-DMATCH_V4={int.from_bytes(addr.packed, 'little')}U")
        try:
            self.bpf = BPF(src_file=str(TOOLS / "sink.c"), cflags=cflags)
            self.fn = self.bpf.load_func("xdp_sink", BPF.XDP)
        except Exception as err:
            raise SinkError(f"the kernel refused the sink program: {err}") from None
        self._BPF = BPF
        with in_ns(ns):
            try:
                socket.if_nametoindex(dev)
            except OSError:
                raise SinkError(f"interface {dev!r} does not exist in namespace "
                                f"{ns or '(current)'}") from None
            try:
                BPF.attach_xdp(dev, self.fn, MODES[mode])
            except Exception as err:
                raise SinkError(f"cannot attach the sink to {dev} ({mode}): {err}") from None
        self.attached = True

    def counts(self) -> Counts:
        t = self.bpf["sink_count"]
        allv = t.getvalue(t.Key(0))
        match = t.getvalue(t.Key(1))
        return Counts(sum(v.packets for v in allv), sum(v.bytes for v in allv),
                      sum(v.packets for v in match), time.monotonic())

    def rate(self, seconds: float) -> float:
        """Packets per second arriving over the next `seconds`."""
        a = self.counts()
        time.sleep(seconds)
        b = self.counts()
        return (b.packets - a.packets) / (b.at - a.at)

    def close(self) -> None:
        if self.attached:
            with in_ns(self.ns):
                try:
                    self._BPF.remove_xdp(self.dev, MODES[self.mode])
                except Exception:
                    pass   # the interface (or its namespace) may be gone already
            self.attached = False

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_pps(ns: str | None, dev: str, seconds: float, mode: str = "native") -> float:
    """Attach a sink to dev, return the packets per second that arrive over `seconds`."""
    with Sink(ns, dev, mode) as sink:
        return sink.rate(seconds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Count (and drop) packets arriving on an "
                                             "interface with XDP; prints packets/s.")
    ap.add_argument("--ns", help="namespace of the interface (default: current)")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds per line")
    ap.add_argument("--duration", type=float, default=0, help="seconds in all (0: until ^C)")
    ap.add_argument("--mode", choices=sorted(MODES), default="native")
    ap.add_argument("--match", help="also count packets to this IPv4 destination")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("sink: error: needs root", file=sys.stderr)
        return 1
    try:
        sink = Sink(args.ns, args.dev, args.mode, args.match)
    except SinkError as err:
        print(f"sink: error: {err}", file=sys.stderr)
        return 1
    start = prev = sink.counts()
    try:
        while not args.duration or time.monotonic() - start.at < args.duration:
            time.sleep(args.interval)
            cur = sink.counts()
            dt = cur.at - prev.at
            extra = f", to {args.match}: {(cur.matched - prev.matched) / dt:.0f} pps" \
                if args.match else ""
            print(f"{(cur.packets - prev.packets) / dt:.0f} pps "
                  f"({(cur.packets - prev.packets) / dt / 1e6:.3f} Mpps, "
                  f"{(cur.bytes - prev.bytes) * 8 / dt / 1e6:.1f} Mbit/s{extra})", flush=True)
            prev = cur
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
    total = prev.packets - start.packets
    secs = prev.at - start.at
    if secs > 0:
        print(f"total {total} packets in {secs:.1f} s: {total / secs:.0f} pps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
