"""`zfast demo`: the main job on an embedded default topology.

Builds the pair lab (zfast/lab/topology.py build_pair: a client; an active and a
standby balancer sharing the public and the private network; three backends
with weights 1, 1, 2), runs real traffic over IPv4 and IPv6 through the VIPs
(new TCP connections, long-lived TCP streams, UDP), shows live per-backend
counters from the active node's API, changes a weight on the fly, then kills
the active balancer and shows the standby taking over without a stream
breaking, and tears everything down.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections import Counter

import click

from zfast.api import ApiError
from zfast.lab import probe, topology
from zfast.lab.netns import Topology, TopologyError, in_ns


class DemoError(Exception):
    pass


class _Traffic(threading.Thread):
    """New TCP connections and UDP datagrams (v4 and v6) at a steady pace until stopped."""

    def __init__(self, ns: str, per_second: int):
        super().__init__(daemon=True, name="demo-traffic")
        self.ns = ns
        self.per_second = per_second
        self.ok = Counter()
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        vips = [topology.VIP4, topology.VIP6]
        n = 0
        with in_ns(self.ns):
            while not self.stop.is_set():
                started = time.time()
                for _ in range(max(1, self.per_second // 10)):
                    vip = vips[n % 2]
                    n += 1
                    try:
                        if n % 5 == 0:
                            name = probe.udp_hello(vip, topology.UDP_PORT, timeout=1.0)
                        else:
                            name = probe.tcp_hello(vip, topology.TCP_PORT, timeout=2.0)
                        self.ok[name] += 1
                    except OSError:
                        self.failed += 1
                self.stop.wait(max(0.0, 0.1 - (time.time() - started)))


class _Streams(threading.Thread):
    """Long-lived connections pinged continuously; records each one's longest silence."""

    def __init__(self, streams: list[probe.Stream]):
        super().__init__(daemon=True, name="demo-streams")
        self.streams = streams
        self.last = {id(s): time.time() for s in streams}
        self.gap = {id(s): 0.0 for s in streams}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for s in self.streams:
                if s.ping():
                    now = time.time()
                    self.gap[id(s)] = max(self.gap[id(s)], now - self.last[id(s)])
                    self.last[id(s)] = now
            self.stop.wait(0.01)

    @property
    def broken(self) -> int:
        return sum(1 for s in self.streams if s.error)


def _table(stats: dict, prev: dict | None, dt: float) -> str:
    lines = [f"    {'service':<6} {'backend':<11} {'weight':>6} {'packets':>9} {'pps':>7}"]
    before = {(s["name"], b["address"]): b for s in (prev or {}).get("services", []) for b in s["backends"]}
    for svc in stats["services"]:
        for be in svc["backends"]:
            old = before.get((svc["name"], be["address"]))
            pps = (be["packets"] - old["packets"]) / dt if old and dt > 0 else 0.0
            lines.append(f"    {svc['name']:<6} {be['address']:<11} {be['weight']:>6} "
                         f"{be['packets']:>9} {pps:>7.0f}")
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
        say("1/5 building the lab: client -> active + standby balancers (tc on these veths) -> 3 backends "
            "(weights 1, 1, 2)")
        try:
            P = topology.build_pair(topo, 3, [1, 1, 2], name="demo")
            P.start_servers()
            active = P.start_node(0)
            P.wait_role(0, "active")
            standby = P.start_node(1)
            P.wait_role(1, "standby")
        except (TopologyError, RuntimeError, TimeoutError) as err:
            raise DemoError(f"could not build the lab: {err}") from None
        for i, api in enumerate((active, standby)):
            st = api.get("/status")
            itfs = ", ".join(f"{x['name']} ({x['mode']}, prog {x['prog_id']})" for x in st["interfaces"])
            click.echo(f"    {st['node']}: {st['role']:<7} on {itfs}")
        click.echo(f"    VIPs {topology.VIP4}, {topology.VIP6}; ports {topology.TCP_PORT}/tcp and "
                   f"{topology.UDP_PORT}/udp; heartbeat every {P.heartbeat_ms} ms")

        say("2/5 real traffic: TCP connections and UDP datagrams, 20 long-lived streams, IPv4 and IPv6")
        traffic = _Traffic(P.client, max(10, int(connections / max(duration, 1.0))))
        traffic.start()
        streams = [probe.Stream(P.client, vip, topology.TCP_PORT) for vip in (topology.VIP4, topology.VIP6) * 10]
        pinger = _Streams(streams)
        pinger.start()

        prev, t0, changed = None, time.time(), False
        phase_end = duration / 2
        while time.time() - t0 < phase_end:
            time.sleep(1.0)
            stats = active.get("/stats")
            click.echo(_table(stats, prev, stats["time"] - prev["time"] if prev else 0))
            st = standby.get("/status")
            rep = st["peer"]["replication"]["receiving"]
            click.echo(f"    client: {sum(traffic.ok.values())} answers, {traffic.failed} failed; "
                       f"standby holds {rep['installed']} replicated flows\n")
            prev = stats
            if not changed and time.time() - t0 > phase_end / 2:
                say("3/5 apply: backend 10.1.0.2 weight 0 (drain: keeps its flows, gets no new ones)")
                P.nodes[0].config_path.write_text(__import__("yaml").safe_dump(
                    P.project(0, weights=[0, 1, 2]), sort_keys=False))
                try:
                    out = active.post("/apply", {"config": P.nodes[0].config_path.read_text(),
                                                 "who": "zfast demo"})
                    click.echo("    " + "; ".join(out["changes"]))
                    time.sleep(0.5)
                    click.echo(f"    the standby follows through the shared store: revision "
                               f"{standby.get('/status')['revision']} (active: {out['revision']})")
                except ApiError as err:
                    click.echo(f"    apply failed: {err}")
                changed = True

        say("4/5 failover: the active balancer dies (daemon SIGKILLed, links down)")
        killed_at = time.time()
        P.kill(0)
        try:
            took = P.wait_role(1, "active", timeout=10)
        except TimeoutError as err:
            raise DemoError(str(err)) from None
        click.echo(f"    {P.nodes[1].name} is active {took * 1000:.0f} ms after the kill "
                   "(VIPs claimed from XDP, gratuitous ARP and unsolicited NA sent)")
        prev = None
        while time.time() - killed_at < max(3.0, duration / 2):
            time.sleep(1.0)
            stats = standby.get("/stats")
            click.echo(_table(stats, prev, stats["time"] - prev["time"] if prev else 0))
            click.echo(f"    client: {sum(traffic.ok.values())} answers, {traffic.failed} failed; "
                       f"streams broken: {pinger.broken} of {len(streams)}\n")
            prev = stats
        traffic.stop.set()
        pinger.stop.set()
        traffic.join(timeout=5)
        pinger.join(timeout=5)

        say("5/5 result")
        gaps = sorted(g * 1000 for g in pinger.gap.values())
        click.echo(f"    streams: {len(streams) - pinger.broken} of {len(streams)} survived the "
                   f"failover; longest silence per stream: median {statistics.median(gaps):.0f} ms, "
                   f"max {max(gaps):.0f} ms")
        click.echo(f"    new connections and datagrams: {sum(traffic.ok.values())} answered, "
                   f"{traffic.failed} failed (those in flight during the takeover)")
        for s in streams:
            s.close()
        standby_stats = standby.get("/stats")
        drops = {k: v for k, v in standby_stats["drops"].items() if v}
        click.echo(f"    drops on the new active: {drops or 'none'}")
        click.echo("    tearing down: nodes stopped, namespaces removed")
    click.echo("done")
