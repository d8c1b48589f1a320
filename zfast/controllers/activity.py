"""The activity controller: is this node's data plane doing its job?

Checked every few heartbeats, cheaply, from netlink and the maps:
  * the zfast program is attached to every configured interface (XDP, or tc);
  * every interface is up with carrier (the uplink);
  * the program runs: when an interface received many packets, the verdict
    counters moved too;
  * no internal errors (drop_error: a map refused an update);
  * no XDP frame lost by the kernel after the program forwarded it (a redirect it could
    not hand on, a frame the driver failed to send: zfast.dataplane.egress.kernel_drops): packets
    zfast counted as forwarded and nobody received.
The daemon's own responsiveness is the heartbeat itself: a frozen daemon
sends none. The problems go out in every heartbeat; the election acts on them.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from dataclasses import dataclass, field

from zfast.dataplane import bpflib
from zfast.dataplane.loader import TC_HANDLE, TC_PRIO
from zfast.dataplane.egress import kernel_drops, proc_net_dev, xdp_lost

RX_WITHOUT_VERDICTS = 1000  # packets received with no verdict counted: the program is not running
SIOCGIFFLAGS = 0x8913
IFF_UP, IFF_RUNNING = 0x1, 0x40


def _link_flags(sock: socket.socket, name: str) -> int:
    ifreq = struct.pack("16sH14x", name.encode()[:15], 0)
    return struct.unpack_from("H", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq), 16)[0]


@dataclass
class Activity:
    """Ten checks a second on a balancer that may have a quarter of a CPU: each is a
    syscall or two (an ioctl, a netlink query through libbpf, /proc/net/dev), asked in
    the daemon's own namespace, never a dump of every link parsed in Python."""
    dp: object                  # zfast.dataplane.loader.Loaded
    interfaces: list[str]
    problems: list[str] = field(default_factory=list)
    _last: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        problems = []
        rx_total = 0
        xmit_errors = {}
        counts = proc_net_dev()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name in self.interfaces:
                try:
                    index = socket.if_nametoindex(name)
                    flags = _link_flags(sock, name)
                except OSError:
                    problems.append(f"{name} is gone")
                    continue
                if not self._attached(name, index):
                    problems.append(f"zfast is not attached to {name}")
                xmit_errors[name] = xdp_lost(kernel_drops(name))
                before = self._last.get("xmit", {}).get(name)
                if before is not None and xmit_errors[name] > before:
                    problems.append(f"{xmit_errors[name] - before} XDP frames the kernel lost at "
                                    f"{name} after zfast forwarded them")
                if not flags & IFF_UP:
                    problems.append(f"{name} is down")
                elif not flags & IFF_RUNNING:
                    problems.append(f"{name} has no carrier")
                rx_total += counts.get(name, {}).get("rx_packets", 0)
        counters = self.dp.reason_counters()
        verdicts = sum(p for p, _ in counters.values())
        errors = counters.get("drop_error", (0, 0))[0]
        last = self._last
        if last:
            if rx_total - last["rx"] > RX_WITHOUT_VERDICTS and verdicts == last["verdicts"]:
                problems.append("packets arrive but the program counts none")
            if errors > last["errors"]:
                problems.append(f"{errors - last['errors']} internal errors (drop_error)")
        self._last = {"rx": rx_total, "verdicts": verdicts, "errors": errors, "xmit": xmit_errors}
        self.problems = problems
        return problems

    def _attached(self, name: str, index: int) -> bool:
        """Is this data plane's own program on the interface, on the hook it was put on?"""
        att = self.dp.attached.get(name)
        if att is None:
            return False
        if att.hook == "tc":
            return bpflib.tc_prog_id(index, TC_HANDLE, TC_PRIO) == att.prog_id
        return bpflib.xdp_prog_id(index) == att.prog_id
