"""`zfast demo`: the main job on an embedded default topology.

Builds the lab (zfast/lab.py: a client, one balancer, three backends with
weights 1, 1, 2), runs real TCP and UDP traffic over IPv4 and IPv6 through the
VIPs, shows live per-backend counters from the node's API, drains one backend
and brings it back half-way (hitless reconfiguration), then tears it all down.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import click

from zfast import lab, probe
from zfast.netns import Topology, TopologyError, in_ns


class DemoError(Exception):
    pass


class _Traffic(threading.Thread):
    """Opens TCP connections (v4 and v6) and sends UDP datagrams until stopped."""

    def __init__(self, ns: str, per_second: int):
        super().__init__(daemon=True, name="demo-traffic")
        self.ns = ns
        self.per_second = per_second
        self.ok = Counter()
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        vips = [lab.VIP4, lab.VIP6]
        n = 0
        with in_ns(self.ns):
            while not self.stop.is_set():
                started = time.time()
                for _ in range(self.per_second // 10 or 1):
                    vip = vips[n % 2]
                    n += 1
                    try:
                        if n % 5 == 0:
                            name = probe.udp_hello(vip, lab.UDP_PORT, timeout=1.0)
                        else:
                            name = probe.tcp_hello(vip, lab.TCP_PORT, timeout=2.0)
                        self.ok[name] += 1
                    except OSError:
                        self.failed += 1
                self.stop.wait(max(0.0, 0.1 - (time.time() - started)))


def _table(stats: dict, prev: dict | None, dt: float, traffic: _Traffic) -> str:
    lines = [f"{'service':<8} {'backend':<12} {'weight':>6} {'packets':>10} {'pps':>8}"]
    before = {(s["name"], b["address"]): b for s in (prev or {}).get("services", []) for b in s["backends"]}
    for svc in stats["services"]:
        for be in svc["backends"]:
            old = before.get((svc["name"], be["address"]))
            pps = (be["packets"] - old["packets"]) / dt if old and dt > 0 else 0.0
            lines.append(f"{svc['name']:<8} {be['address']:<12} {be['weight']:>6} {be['packets']:>10} {pps:>8.0f}")
    seen = ", ".join(f"{k}: {v}" for k, v in sorted(traffic.ok.items()))
    lines.append(f"client: {sum(traffic.ok.values())} answers ({seen}), {traffic.failed} failed")
    return "\n".join(lines)


def run(duration: float = 20.0, connections: int = 300) -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo builds network namespaces and loads XDP: run it as root")
    say = lambda text: click.echo(click.style(text, bold=True))  # noqa: E731
    try:
        topo = Topology("zfdemo")
    except TopologyError as err:
        raise DemoError(str(err)) from None
    with topo:
        say("1/4 building the lab: client -> balancer (XDP) -> 3 backends, weights 1, 1, 2")
        try:
            L = lab.build(topo, 3, [1, 1, 2], name="demo")
            L.start_servers()
            api = L.start_node()
        except (TopologyError, RuntimeError) as err:
            raise DemoError(f"could not build the lab: {err}") from None
        status = api.get("/status")
        for itf in status["interfaces"]:
            click.echo(f"    {itf['name']}: XDP {itf['mode']} mode, prog {itf['prog_id']}")
        click.echo(f"    VIPs {lab.VIP4} and {lab.VIP6}, ports {lab.TCP_PORT}/tcp and {lab.UDP_PORT}/udp")

        say(f"2/4 real traffic for {duration:.0f} s: TCP connections and UDP datagrams, IPv4 and IPv6")
        traffic = _Traffic(L.client, max(10, int(connections / max(duration, 1.0))))
        traffic.start()
        prev, t0, changed, restored = None, time.time(), False, False
        while time.time() - t0 < duration:
            time.sleep(1.0)
            stats = api.get("/stats")
            dt = stats["time"] - prev["time"] if prev else 0
            click.echo(_table(stats, prev, dt, traffic) + "\n")
            prev = stats
            elapsed = time.time() - t0
            if not changed and elapsed > duration / 3:
                say("    apply: backend 10.1.0.2 weight 0 (drain: keeps its flows, gets no new ones)")
                L.write_config(L.project(weights=[0, 1, 2]))
                from zfast.api import ApiError
                try:
                    out = api.post("/apply", {"config": L.config_path.read_text()})
                    click.echo("    " + "; ".join(out["changes"]))
                except ApiError as err:
                    click.echo(f"    apply failed: {err}")
                changed = True
            elif changed and not restored and elapsed > 2 * duration / 3:
                say("    apply: backend 10.1.0.2 back to weight 1")
                L.write_config(L.project(weights=[1, 1, 2]))
                out = api.post("/apply", {"config": L.config_path.read_text()})
                click.echo("    " + "; ".join(out["changes"]))
                restored = True
        traffic.stop.set()
        traffic.join(timeout=5)

        say("3/4 result")
        stats = api.get("/stats")
        total = sum(traffic.ok.values())
        click.echo(f"    {total} answers, {traffic.failed} failed; per backend: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(traffic.ok.items())))
        drops = {k: v for k, v in stats["drops"].items() if v}
        click.echo(f"    drops: {drops or 'none'}")
        say("4/4 tearing down: node stopped, namespaces removed")
        L.stop_node()
    click.echo("done")
