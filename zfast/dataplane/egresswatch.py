"""Every port an XDP program redirects to must take its frames (zfast.dataplane.egress):
each port checked again when links change, when the kernel loses XDP frames at one of
the node's interfaces (the symptom of a peer that lost its NAPI), and every
EGRESS_RECHECK_S (GRO may be turned off by hand). A port that cannot take them gets its
egress through the kernel instead.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from zfast.dataplane import egress
from zfast.dataplane.loader import Loaded

EGRESS_RECHECK_S = 10.0   # egress ports' NAPI checked again (GRO may be turned off by hand)


class EgressWatch:
    """The rise of the loss is an event; so is what zfast did about a port (GRO turned on
    at the peer every time; the kernel's forwarding when that starts)."""

    def __init__(self, interfaces: list[str], on_event: Callable[..., None]):
        self.interfaces = interfaces       # the node's own: where the kernel's loss is read
        self.on_event = on_event           # the node's event log: on_event(kind, **fields)
        self.ports: dict[str, egress.TargetCheck] = {}   # per port, while XDP redirects
        self._seen: tuple = ()
        self._next = 0.0
        self._lost: dict[str, int] = {}

    def kernel_drops(self) -> dict[str, dict[str, int]]:
        """What the kernel dropped after the program, per interface of the node."""
        return {name: egress.kernel_drops(name) for name in self.interfaces}

    def check(self, dp: Loaded) -> None:
        rising = False
        for name, drops in self.kernel_drops().items():
            lost, before = egress.xdp_lost(drops), self._lost.get(name)
            if before is not None and lost > before:
                rising = True
                self.on_event("kernel_drops", interface=name, xdp_lost=lost - before, **drops)
            self._lost[name] = lost
        ports = tuple(socket.if_nameindex())
        xdp = any(a.hook == "xdp" for a in dp.attached.values())
        if xdp and (rising or ports != self._seen or time.monotonic() >= self._next):
            self._seen, self._next = ports, time.monotonic() + EGRESS_RECHECK_S
            for idx, name in ports:
                check = egress.check_xdp_target(name)
                dp.set_tx_kernel(idx, not check.xdp_ok)
                before = self.ports.get(name)
                if check.action == "gro_on_peer" or (check.action and (
                        before is None or before.action != check.action)):
                    self.on_event("egress", interface=name, action=check.action,
                                  detail=check.detail)
                self.ports[name] = check

    def status(self, ifname: str) -> dict:
        """For `zfast status`: what was done about the port, if anything."""
        check = self.ports.get(ifname)
        return {"egress": check.detail} if check is not None and check.action else {}
