"""The activity controller: is this node's data plane doing its job?

Checked every few heartbeats, from what a link source observes (the node's is
zfast.dataplane.links.LinkWatch: netlink and the maps, cheaply):
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

Every verdict compares one check's observations with the previous check's, so the
controller needs no clock: the pair calls check() on its own period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from zfast.dataplane.links import LinkState

RX_WITHOUT_VERDICTS = 1000  # packets received with no verdict counted: the program is not running


class LinkSource(Protocol):
    """What one check observes, in this order."""

    def links(self) -> list[LinkState]:
        """Each configured interface, as it is now."""

    def reason_counters(self) -> dict[str, tuple[int, int]]:
        """The program's verdict counters: reason -> (packets, bytes), ever."""


@dataclass
class Activity:
    source: LinkSource
    problems: list[str] = field(default_factory=list)
    _last: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        problems = []
        rx_total = 0
        xmit_errors = {}
        for link in self.source.links():
            name = link.name
            if not link.present:
                problems.append(f"{name} is gone")
                continue
            if not link.attached:
                problems.append(f"zfast is not attached to {name}")
            xmit_errors[name] = link.xdp_lost
            before = self._last.get("xmit", {}).get(name)
            if before is not None and xmit_errors[name] > before:
                problems.append(f"{xmit_errors[name] - before} XDP frames the kernel lost at "
                                f"{name} after zfast forwarded them")
            if not link.up:
                problems.append(f"{name} is down")
            elif not link.carrier:
                problems.append(f"{name} has no carrier")
            rx_total += link.rx_packets
        counters = self.source.reason_counters()
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
