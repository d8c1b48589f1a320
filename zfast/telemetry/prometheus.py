"""Prometheus exposition of a node: ``/metrics`` on ``telemetry.prometheus`` (host:port).

A custom collector reads the counters (``Node.stats()``, the same numbers as ``zfast
stats``) and the status when Prometheus scrapes, and takes from the statistics
controller's last sample only what stats() lacks (flows, instances, maps): a sample is
up to a tick old, and stays the last good one while ticks fail. Nothing is counted in
Python per packet. Metrics (counters end in ``_total``):

    zfast_packets_total{service,backend}          packets clients sent, per backend
    zfast_bytes_total{service,backend}            bytes, per backend
    zfast_service_packets_total{service}          per service (each packet counted once)
    zfast_service_bytes_total{service}
    zfast_backend_healthy{service,backend}        1 healthy, 0 not
    zfast_backend_weight{service,backend}
    zfast_public_port_packets_total{address,port,proto,verdict}   verdict: allowed | denied
                                                  | rate_limited (they add up to the port's packets)
    zfast_drops_total{reason}                     packets dropped, reason without "drop_"
    zfast_verdict_packets_total{reason}           every verdict reason of the data plane
    zfast_verdict_bytes_total{reason}
    zfast_kernel_drops_total{interface,kind}      what the kernel dropped after the program
                                                  forwarded: kind xdp_redirect_errors (counted
                                                  where frames came in), xdp_xmit_errors (where
                                                  they were to leave), tx_dropped (skbs)
    zfast_flows                                   entries in the flow table (when known)
    zfast_map_entries{map} / zfast_map_max_entries{map}
    zfast_instance_cpu_seconds_total{instance} / zfast_instance_memory_bytes{instance}
    zfast_role{role}                              1 for the node's role (active, standby,
                                                  solo), 0 for the others
    zfast_info{node,project}                      1; zfast_revision: the applied revision
    zfast_up                                      1 when the stats could be read
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import CollectorRegistry

ROLES = ("active", "standby", "solo")
DEFAULT_PORT = 9469


def parse_addr(text: str) -> tuple[str, int]:
    """"host:port", "[v6]:port", ":port" or "port" -> (host, port); ValueError says why."""
    text = str(text).strip()
    if text.isdigit():
        host, port = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r}: give [address]:port")
        port = rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r}: give host:port (e.g. 127.0.0.1:{DEFAULT_PORT})")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets: [{host}]:{port}")
        host = host or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: {port!r} is not a port (0-65535)")
    if host not in ("localhost",):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


class ZfastCollector:
    """Reads stats() and status() at each scrape. extra(): optional, returns more of a sample
    ({"flows", "instances", "maps"}, e.g. StatisticsController.latest) when stats() lacks them."""

    def __init__(self, stats: Callable[[], dict], status: Callable[[], dict] | None = None,
                 extra: Callable[[], dict | None] | None = None):
        self.stats, self.status, self.extra = stats, status, extra
        self.errors = 0

    def describe(self):
        return []   # no describe at registration: the collector only runs at scrape time

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("zfast_up", "1 when the node's counters could be read")
        try:
            st = self.stats() or {}
            more = (self.extra() if self.extra else None) or {}
        except Exception:
            self.errors += 1
            up.add_metric([], 0)
            yield up
            yield from self._status()
            return
        up.add_metric([], 1)
        yield up
        yield from self._services(st)
        yield from self._ports(st)
        yield from self._verdicts(st)
        yield from self._resources({**more, **{k: v for k, v in st.items() if k in
                                               ("flows", "instances", "maps")}})
        yield from self._status()

    @staticmethod
    def _services(st: dict) -> Iterator[Metric]:
        packets = CounterMetricFamily("zfast_packets", "Packets clients sent to a service, "
                                      "per backend they were sent to", labels=["service", "backend"])
        nbytes = CounterMetricFamily("zfast_bytes", "Bytes clients sent to a service, per backend",
                                     labels=["service", "backend"])
        spackets = CounterMetricFamily("zfast_service_packets", "Packets clients sent to a "
                                       "service's VIP and ports, counted once", labels=["service"])
        sbytes = CounterMetricFamily("zfast_service_bytes", "Bytes clients sent to a service",
                                     labels=["service"])
        healthy = GaugeMetricFamily("zfast_backend_healthy", "1 when the backend is healthy",
                                    labels=["service", "backend"])
        weight = GaugeMetricFamily("zfast_backend_weight", "Configured weight of the backend",
                                   labels=["service", "backend"])
        for svc in st.get("services", ()):
            name = svc["name"]
            spackets.add_metric([name], svc["packets"])
            sbytes.add_metric([name], svc["bytes"])
            for be in svc.get("backends", ()):
                labels = [name, str(be["address"])]
                packets.add_metric(labels, be["packets"])
                nbytes.add_metric(labels, be["bytes"])
                if "healthy" in be:
                    healthy.add_metric(labels, 1 if be["healthy"] else 0)
                if "weight" in be:
                    weight.add_metric(labels, be["weight"])
        yield from (packets, nbytes, spackets, sbytes, healthy, weight)

    @staticmethod
    def _ports(st: dict) -> Iterator[Metric]:
        fam = CounterMetricFamily("zfast_public_port_packets", "Packets to a public port by "
                                  "firewall verdict", labels=["address", "port", "proto", "verdict"])
        for pp in st.get("public_ports", ()):
            labels = [str(pp.get("address", "")), str(pp["port"]), pp["proto"]]
            limited = pp.get("rate_limited", 0)
            fam.add_metric(labels + ["allowed"], pp.get("allowed", 0))
            # stats' "denied" includes the rate-limited ones; here each packet has one verdict
            fam.add_metric(labels + ["denied"], max(0, pp.get("denied", 0) - limited))
            fam.add_metric(labels + ["rate_limited"], limited)
        yield fam

    @staticmethod
    def _verdicts(st: dict) -> Iterator[Metric]:
        drops = CounterMetricFamily("zfast_drops", "Packets the data plane dropped, by reason",
                                    labels=["reason"])
        for reason, packets in st.get("drops", {}).items():
            drops.add_metric([reason.removeprefix("drop_")], packets)
        vp = CounterMetricFamily("zfast_verdict_packets", "Packets by data plane verdict reason",
                                 labels=["reason"])
        vb = CounterMetricFamily("zfast_verdict_bytes", "Bytes by data plane verdict reason",
                                 labels=["reason"])
        for reason, v in st.get("verdicts", {}).items():
            vp.add_metric([reason], v["packets"])
            vb.add_metric([reason], v["bytes"])
        # after us: what the kernel dropped (zfast.dataplane.egress), never silent
        kernel = CounterMetricFamily("zfast_kernel_drops", "Packets the kernel dropped after the "
                                     "program forwarded them", labels=["interface", "kind"])
        for ifname, counts in st.get("kernel_drops", {}).items():
            for kind, n in counts.items():
                kernel.add_metric([ifname, kind], n)
        yield from (drops, vp, vb, kernel)

    @staticmethod
    def _resources(st: dict) -> Iterator[Metric]:
        if st.get("flows") is not None:
            flows = GaugeMetricFamily("zfast_flows", "Entries in the flow table")
            flows.add_metric([], st["flows"])
            yield flows
        entries = GaugeMetricFamily("zfast_map_entries", "Entries in a BPF map", labels=["map"])
        most = GaugeMetricFamily("zfast_map_max_entries", "Capacity of a BPF map", labels=["map"])
        for name, m in (st.get("maps") or {}).items():
            if m.get("entries") is not None:
                entries.add_metric([name], m["entries"])
            if m.get("max") is not None:
                most.add_metric([name], m["max"])
        cpu = CounterMetricFamily("zfast_instance_cpu_seconds", "CPU time of an instance",
                                  labels=["instance"])
        mem = GaugeMetricFamily("zfast_instance_memory_bytes", "Memory of an instance",
                                labels=["instance"])
        for name, r in (st.get("instances") or {}).items():
            if r.get("cpu_seconds") is not None:
                cpu.add_metric([name], r["cpu_seconds"])
            if r.get("memory_bytes") is not None:
                mem.add_metric([name], r["memory_bytes"])
        yield from (entries, most, cpu, mem)

    def _status(self) -> Iterator[Metric]:
        if self.status is None:
            return
        try:
            status = self.status() or {}
        except Exception:
            self.errors += 1
            return
        role = GaugeMetricFamily("zfast_role", "1 for the node's current role", labels=["role"])
        current = status.get("role")
        for r in ROLES + ((current,) if current and current not in ROLES else ()):
            role.add_metric([r], 1 if r == current else 0)
        yield role
        info = GaugeMetricFamily("zfast_info", "The node", labels=["node", "project"])
        info.add_metric([str(status.get("node", "")), str(status.get("project", ""))], 1)
        yield info
        if status.get("revision") is not None:
            rev = GaugeMetricFamily("zfast_revision", "Revision of the project the maps hold")
            rev.add_metric([], status["revision"])
            yield rev


class PrometheusServer:
    """The running endpoint: .address ("host:port" as bound), .url, .close()."""

    def __init__(self, httpd, thread: threading.Thread, registry: CollectorRegistry,
                 collector: ZfastCollector):
        self._httpd, self._thread = httpd, thread
        self.registry, self.collector = registry, collector
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"http://{self.address}/metrics"

    def close(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        self._httpd = None


def start_prometheus(addr: str, stats: Callable[[], dict], status: Callable[[], dict] | None = None,
                     extra: Callable[[], dict | None] | None = None) -> PrometheusServer:
    """Serve /metrics on addr ("127.0.0.1:9469"; port 0 picks a free one) in a daemon thread.
    OSError (address in use, not ours) and ValueError (a bad addr) reach the caller."""
    host, port = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    collector = ZfastCollector(stats, status, extra)
    registry.register(collector)
    httpd, thread = start_http_server(port, host, registry=registry)
    return PrometheusServer(httpd, thread, registry, collector)
