"""The activity controller: is this node's data plane doing its job?

Checked every few heartbeats, cheaply, from netlink and the maps:
  * the zfast program is attached to every configured interface (XDP, or tc);
  * every interface is up with carrier (the uplink);
  * the program runs: when an interface received many packets, the verdict
    counters moved too;
  * no internal errors (drop_error: a map refused an update);
  * no XDP frame lost by the kernel after the program forwarded it (a redirect it could
    not hand on, a frame the driver failed to send: zfast.egress.kernel_drops): packets
    zfast counted as forwarded and nobody received.
The daemon's own responsiveness is the heartbeat itself: a frozen daemon
sends none. The problems go out in every heartbeat; the election acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyroute2 import IPRoute

from zfast.datapath import TC_NAME, tc_filters
from zfast.egress import kernel_drops, xdp_lost

RX_WITHOUT_VERDICTS = 1000  # packets received with no verdict counted: the program is not running


@dataclass
class Activity:
    dp: object                  # zfast.datapath.Loaded
    interfaces: list[str]
    problems: list[str] = field(default_factory=list)
    _last: dict = field(default_factory=dict)

    def check(self) -> list[str]:
        problems = []
        rx_total = 0
        xmit_errors = {}
        with IPRoute() as ipr:
            links = {l.get_attr("IFLA_IFNAME"): l for l in ipr.get_links()}
            for name in self.interfaces:
                link = links.get(name)
                if link is None:
                    problems.append(f"{name} is gone")
                    continue
                if not self._attached(ipr, name, link):
                    problems.append(f"zfast is not attached to {name}")
                xmit_errors[name] = xdp_lost(kernel_drops(name))
                before = self._last.get("xmit", {}).get(name)
                if before is not None and xmit_errors[name] > before:
                    problems.append(f"{xmit_errors[name] - before} XDP frames the kernel lost at "
                                    f"{name} after zfast forwarded them")
                if link.get_attr("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
                    problems.append(f"{name} is {link.get_attr('IFLA_OPERSTATE', '?').lower()}")
                stats = link.get_attr("IFLA_STATS64")
                if stats:
                    rx_total += stats.get("rx_packets", 0)
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

    def _attached(self, ipr: IPRoute, name: str, link) -> bool:
        """Is this data plane's own program on the interface, on the hook it was put on?"""
        att = self.dp.attached.get(name)
        if att is None:
            return False
        if att.hook == "tc":
            return f"{TC_NAME}-{att.prog_id}" in tc_filters(ipr, link["index"])
        xdp = link.get_attr("IFLA_XDP")
        return (xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None) == att.prog_id
