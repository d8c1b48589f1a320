"""The node's links as the kernel has them: which exist, up and with carrier, whether
this data plane's program is on each, what each received and lost after the program;
and the ports a redirect may go to.

Read cheaply, ten times a second on a balancer that may have a quarter of a CPU: each
read is a syscall or two (an ioctl, a netlink query through libbpf, /proc/net/dev),
asked in the daemon's own namespace, never a dump of every link parsed in Python.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass

from zfast.dataplane import bpflib
from zfast.dataplane.egress import kernel_drops, proc_net_dev, xdp_lost
from zfast.dataplane.loader import TC_HANDLE, TC_PRIO, Loaded

SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40


@dataclass(frozen=True)
class LinkState:
    """One configured interface, as one look at it found it."""
    name: str
    present: bool = True     # False: no such interface (any more); nothing else was read
    attached: bool = False   # this data plane's program is on it, on the hook it was put on
    up: bool = False
    carrier: bool = False
    rx_packets: int = 0      # received, ever (/proc/net/dev)
    xdp_lost: int = 0        # XDP frames the kernel lost there after zfast forwarded them, ever


def _link_flags(sock: socket.socket, name: str) -> int:
    ifreq = struct.pack("16sH14x", name.encode()[:15], 0)
    return struct.unpack_from("H", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq), 16)[0]


class LinkWatch:
    """The configured interfaces of one data plane, and its verdict counters: what the
    activity controller (zfast/controllers/activity.py) observes."""

    def __init__(self, dp: Loaded, interfaces: list[str]):
        self.dp = dp
        self.interfaces = interfaces

    def links(self) -> list[LinkState]:
        counts = proc_net_dev()
        states = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in self.interfaces:
                try:
                    index = socket.if_nametoindex(name)
                    flags = _link_flags(sock, name)
                except OSError:
                    states.append(LinkState(name, present=False))
                    continue
                states.append(LinkState(
                    name, attached=self._attached(name, index),
                    up=bool(flags & IFF_UP), carrier=bool(flags & IFF_RUNNING),
                    rx_packets=counts.get(name, {}).get("rx_packets", 0),
                    xdp_lost=xdp_lost(kernel_drops(name))))
        return states

    def reason_counters(self) -> dict[str, tuple[int, int]]:
        return self.dp.reason_counters()

    def _attached(self, name: str, index: int) -> bool:
        att = self.dp.attached.get(name)
        if att is None:
            return False
        if att.hook == "tc":
            return bpflib.tc_prog_id(index, TC_HANDLE, TC_PRIO) == att.prog_id
        return bpflib.xdp_prog_id(index) == att.prog_id


def refresh_tx_ports(dp: Loaded) -> None:
    """Every interface there is now may be a redirect target (one that appears later too)."""
    dp.set_tx_ports([idx for idx, _ in socket.if_nameindex()])
