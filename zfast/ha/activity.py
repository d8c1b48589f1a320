"""The activity controller: is this node's data plane doing its job?

Checked every few heartbeats, cheaply, from netlink and the maps:
  * the zfast program is attached to every configured interface;
  * every interface is up with carrier (the uplink);
  * the program runs: when an interface received many packets, the verdict
    counters moved too;
  * no internal errors (drop_error: a map refused an update).
The daemon's own responsiveness is the heartbeat itself: a frozen daemon
sends none. The problems go out in every heartbeat; the election acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyroute2 import IPRoute

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
        with IPRoute() as ipr:
            links = {l.get_attr("IFLA_IFNAME"): l for l in ipr.get_links()}
        for name in self.interfaces:
            link = links.get(name)
            if link is None:
                problems.append(f"{name} is gone")
                continue
            xdp = link.get_attr("IFLA_XDP")
            prog = xdp.get_attr("IFLA_XDP_PROG_ID") if xdp else None
            if prog != self.dp.prog_id:
                problems.append(f"zfast is not attached to {name}")
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
        self._last = {"rx": rx_total, "verdicts": verdicts, "errors": errors}
        self.problems = problems
        return problems
