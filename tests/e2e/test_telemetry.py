"""Telemetry end to end: the statistics controller and /metrics against a real node.

The lab (zfast/lab/topology.py: client, balancer, three backends of weights 1, 1, 2) runs a real
`zfast up`; the test's own StatisticsController samples the node's /stats through its API
and its own Prometheus endpoint serves them. The test sends exactly N UDP datagrams and
N TCP connections and checks that the stored samples grew by exactly what was sent, per
service and per backend, and that /metrics (parsed with prometheus_client's parser) says
the same numbers.

What "exactly what was sent" is: UDP, every datagram the client sent, by the backend that
answered it (a resent datagram has the same 5-tuple, so the same backend); TCP, the
segments the client's namespace sent (its /proc/net/snmp Tcp OutSegs + RetransSegs: the
only TCP it speaks is to the VIP) and, per backend, the segments each backend's namespace
received (InSegs: no one else talks TCP to the backends).

Needs root: without it the test fails, it does not skip.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.kit import lab, traffic
from zfast.api import Client
from zfast.controllers import statistics
from zfast.controllers.statistics import StatisticsController
from zfast.lab import topology
from zfast.lab.netns import in_ns
from zfast.paths import pin_dir
from zfast.telemetry.prometheus import start_prometheus

WEIGHTS = (1, 1, 2)
N_UDP = 300
N_TCP = 200


@pytest.fixture(scope="module")
def env():
    with lab.lab_env("zftel", WEIGHTS) as e:
        yield e


def snmp(ns: str) -> dict[str, int]:
    """The namespace's /proc/net/snmp as {"Tcp.OutSegs": n, "Udp.InDatagrams": n, ...}."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                          capture_output=True, text=True).stdout.splitlines()
    out = {}
    for head, values in zip(text[::2], text[1::2]):
        proto, names = head.split(":", 1)
        _, nums = values.split(":", 1)
        for k, v in zip(names.split(), nums.split()):
            out[f"{proto}.{k}"] = int(v)
    return out


def udp_exact(ns: str, vip: str, port: int, count: int, tries: int = 5) -> tuple[Counter, list[str]]:
    """count datagrams, each from its own socket: {backend name: datagrams sent to it}
    (resends included), and what failed."""
    sent, failures = Counter(), []
    lock = threading.Lock()

    def one(i):
        with in_ns(ns):
            s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.settimeout(1.0)
            for attempt in range(1, tries + 1):
                s.sendto(f"q{i}".encode(), (vip, port))
                try:
                    data, _ = s.recvfrom(2048)
                except socket.timeout:
                    continue
                with lock:
                    sent[data.decode().split(" ")[0]] += attempt
                return
        with lock:
            failures.append(f"datagram {i}: no answer after {tries} tries")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))
    return sent, failures


def settle(ctl: StatisticsController, tries: int = 30) -> dict[str, int]:
    """Tick until two samples in a row agree on every packet counter (the last FIN/ACKs in);
    the stored latest sample then."""
    prev = None
    for _ in range(tries):
        time.sleep(0.3)
        ctl.tick()
        _, cur = ctl.stored_latest()
        now = {k: v for k, v in cur.items() if k.endswith("/packets")}
        if now == prev:
            return cur
        prev = now
    raise AssertionError("counters kept moving")


def delta(after: dict, before: dict, name: str) -> int:
    return after.get(name, 0) - before.get(name, 0)


def scrape(url: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def flows_fill(node: str):
    """map_fill of the node's pinned flow table, read with BPF_MAP_LOOKUP_BATCH."""
    from bcc.libbcc import lib  # noqa: PLC0415 -- bcc maps LLVM: for this test only
    fd = lib.bpf_obj_get(str(pin_dir(node) / "flows").encode())
    assert fd >= 0, "cannot open the pinned flows map"

    def fill():
        return {"flows": statistics.count_entries(fd)}

    fill.close = lambda: os.close(fd)
    return fill


def test_counters_match_what_was_sent(env, tmp_path):
    state_dir = env.state_dir
    names = env.names                           # backend address -> be1..be3
    address = {name: a for a, name in names.items() if ipaddress.ip_address(a).version == 4}
    address6 = {name: str(ipaddress.ip_address(a)) for a, name in names.items()
                if ipaddress.ip_address(a).version == 6}
    fill = flows_fill(env.lab.node_name)
    ctl = StatisticsController(collect=lambda: Client(state_dir).get("/stats"),
                               path=tmp_path / "stats.sqlite", map_fill=fill, map_fill_interval=0)
    prom = start_prometheus("127.0.0.1:0", stats=lambda: Client(state_dir).get("/stats"),
                            status=lambda: Client(state_dir).get("/status"),
                            extra=ctl.latest)
    try:
        base = settle(ctl)

        # ---- UDP: exactly N_UDP datagrams to each VIP
        by_backend4, failures4 = udp_exact(env.lab.client, topology.VIP4, topology.UDP_PORT, N_UDP)
        by_backend6, failures6 = udp_exact(env.lab.client, topology.VIP6, topology.UDP_PORT, N_UDP)
        assert not failures4 and not failures6, (failures4 + failures6)[:5]
        after_udp = settle(ctl)
        print(f"\nudp v4 {dict(by_backend4)}, v6 {dict(by_backend6)}")
        sent4, sent6 = sum(by_backend4.values()), sum(by_backend6.values())
        assert sent4 >= N_UDP and sent6 >= N_UDP
        assert delta(after_udp, base, "service/app/packets") == sent4
        assert delta(after_udp, base, "service/app6/packets") == sent6
        for name, a in address.items():
            assert delta(after_udp, base, f"backend/app/{a}/packets") == by_backend4.get(name, 0), name
        for name, a in address6.items():
            assert delta(after_udp, base, f"backend/app6/{a}/packets") == by_backend6.get(name, 0), name

        # ---- TCP: exactly N_TCP connections, every segment the client sent counted
        client0 = snmp(env.lab.client)
        backends0 = {f"be{i + 1}": snmp(ns) for i, ns in enumerate(env.lab.backends)}
        spread = traffic.connections(env.lab.client, topology.VIP4, topology.TCP_PORT, env.ports.take(N_TCP))
        assert not spread.failures, list(spread.failures.items())[:5]
        assert sum(spread.backends.values()) == N_TCP
        after_tcp = settle(ctl)
        client1 = snmp(env.lab.client)
        segments = (client1["Tcp.OutSegs"] - client0["Tcp.OutSegs"]
                    + client1["Tcp.RetransSegs"] - client0["Tcp.RetransSegs"])
        received = {f"be{i + 1}": snmp(ns)["Tcp.InSegs"] - backends0[f"be{i + 1}"]["Tcp.InSegs"]
                    for i, ns in enumerate(env.lab.backends)}
        print(f"tcp: {N_TCP} connections -> {dict(spread.backends)}, client sent {segments} "
              f"segments, backends received {received}")
        assert delta(after_tcp, after_udp, "service/app/packets") == segments
        for name, a in address.items():
            got = delta(after_tcp, after_udp, f"backend/app/{a}/packets")
            assert got == received[name], (name, got, received[name])
            assert 3 * spread.backends[name] <= got <= 10 * spread.backends[name]
        assert delta(after_tcp, after_udp, "service/app6/packets") == 0

        # ---- the summary (zfast stats --since) gives the same totals
        since = time.time() - 3600
        summary = ctl.summary(since)
        col = ctl.series(since, names=["service/app/packets"])["service/app/packets"]
        app = next(s for s in summary["services"] if s["name"] == "app")
        assert app["packets"] == col[-1] - col[0] >= sent4 + segments
        assert app["pps"] > 0 and app["max_pps"] >= app["p99_pps"] >= app["p50_pps"] >= 0

        # ---- /metrics: the same numbers, parsed with the official parser
        m = scrape(prom.url)
        _, stored = ctl.stored_latest()
        assert m[("zfast_service_packets_total", (("service", "app"),))] == stored["service/app/packets"]
        assert m[("zfast_service_packets_total", (("service", "app6"),))] == stored["service/app6/packets"]
        for svc, addrs in (("app", address), ("app6", address6)):
            for a in addrs.values():
                key = (("backend", a), ("service", svc))
                assert m[("zfast_packets_total", key)] == stored[f"backend/{svc}/{a}/packets"]
                assert m[("zfast_bytes_total", key)] == stored[f"backend/{svc}/{a}/bytes"]
        prom_udp = {name: m[("zfast_packets_total", (("backend", a), ("service", "app")))]
                    - base[f"backend/app/{a}/packets"] for name, a in address.items()}
        assert sum(prom_udp.values()) == sent4 + segments
        assert m[("zfast_role", (("role", "solo"),))] == 1
        assert m[("zfast_role", (("role", "active"),))] == 0
        assert m[("zfast_up", ())] == 1
        # the flow table: the UDP and TCP flows of the test are in it
        flows, most = ctl.latest()["maps"]["flows"]["entries"], ctl.latest()["maps"]["flows"]["max"]
        assert m[("zfast_flows", ())] == flows
        assert 2 * N_UDP <= flows <= most, (flows, most)
        for reason, packets in ctl.latest()["drops"].items():
            assert m[("zfast_drops_total", (("reason", reason.removeprefix("drop_")),))] == packets
    finally:
        prom.close()
        ctl.stop()
        fill.close()
