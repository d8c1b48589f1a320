"""/metrics: served over HTTP, parsed with prometheus_client's own parser, the numbers
those of the stats dict; the Grafana dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from zfast.telemetry.prometheus import parse_addr, start_prometheus

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"

STATS = {
    "node": "lb-a", "time": 0.0,
    "services": [
        {"name": "app", "vip": "10.0.0.10", "packets": 30, "bytes": 3000, "backends": [
            {"address": "10.1.0.2", "packets": 10, "bytes": 1000, "weight": 1, "healthy": True},
            {"address": "10.1.0.3", "packets": 20, "bytes": 2000, "weight": 2, "healthy": False}]},
        {"name": "app6", "vip": "fd00::10", "packets": 5, "bytes": 500, "backends": [
            {"address": "fd01::2", "packets": 5, "bytes": 500, "weight": 1, "healthy": True}]}],
    "public_ports": [{"port": 2222, "proto": "tcp", "address": "203.0.113.10", "service": "app",
                      "packets": 17, "allowed": 9, "denied": 8, "rate_limited": 3}],
    "drops": {"drop_malformed": 4, "drop_fw_denied": 5},
    "verdicts": {"redirect": {"packets": 35, "bytes": 3500},
                 "drop_malformed": {"packets": 4, "bytes": 240}},
    "flows": 12,
}
STATUS = {"node": "lb-a", "project": "demo", "role": "standby", "revision": 7}


def scrape(server) -> dict[tuple, float]:
    text = urllib.request.urlopen(server.url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def server():
    srv = start_prometheus("127.0.0.1:0", lambda: STATS, lambda: STATUS,
                           extra=lambda: {"instances": {"lb-a": {"cpu_seconds": 1.5,
                                                                  "memory_bytes": 1 << 20}},
                                          "maps": {"flows": {"entries": 12, "max": 65536}}})
    yield srv
    srv.close()


def test_metrics_parse_and_match_the_stats(server):
    m = scrape(server)
    assert m[("zfast_packets_total", (("backend", "10.1.0.2"), ("service", "app")))] == 10
    assert m[("zfast_packets_total", (("backend", "10.1.0.3"), ("service", "app")))] == 20
    assert m[("zfast_bytes_total", (("backend", "fd01::2"), ("service", "app6")))] == 500
    assert m[("zfast_service_packets_total", (("service", "app"),))] == 30
    assert m[("zfast_backend_healthy", (("backend", "10.1.0.3"), ("service", "app")))] == 0
    assert m[("zfast_backend_weight", (("backend", "10.1.0.3"), ("service", "app")))] == 2
    port = (("address", "203.0.113.10"), ("port", "2222"), ("proto", "tcp"))
    verdicts = {v: m[("zfast_public_port_packets_total", tuple(sorted(port + (("verdict", v),))))]
                for v in ("allowed", "denied", "rate_limited")}
    assert verdicts == {"allowed": 9, "denied": 5, "rate_limited": 3}
    assert sum(verdicts.values()) == 17
    assert m[("zfast_drops_total", (("reason", "malformed"),))] == 4
    assert m[("zfast_drops_total", (("reason", "fw_denied"),))] == 5
    assert m[("zfast_verdict_packets_total", (("reason", "redirect"),))] == 35
    assert m[("zfast_flows", ())] == 12
    assert m[("zfast_map_max_entries", (("map", "flows"),))] == 65536
    assert m[("zfast_instance_cpu_seconds_total", (("instance", "lb-a"),))] == 1.5
    assert {r: m[("zfast_role", (("role", r),))] for r in ("active", "standby", "solo")} == \
        {"active": 0, "standby": 1, "solo": 0}
    assert m[("zfast_info", (("node", "lb-a"), ("project", "demo")))] == 1
    assert m[("zfast_revision", ())] == 7
    assert m[("zfast_up", ())] == 1


def test_stats_that_fail_give_up_0_and_still_the_role():
    def broken():
        raise ConnectionError("maps gone")

    srv = start_prometheus("127.0.0.1:0", broken, lambda: {"role": "active"})
    try:
        m = scrape(srv)
    finally:
        srv.close()
    assert m[("zfast_up", ())] == 0
    assert m[("zfast_role", (("role", "active"),))] == 1
    assert not any(name == "zfast_packets_total" for name, _ in m)


def test_close_frees_the_port(server):
    port = server.port
    server.close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_parse_addr():
    assert parse_addr("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_addr("[::1]:9469") == ("::1", 9469)
    assert parse_addr(":9469") == ("0.0.0.0", 9469)
    assert parse_addr("9469") == ("127.0.0.1", 9469)
    for bad in ("127.0.0.1", "::1:9469", "host.example:80", "127.0.0.1:70000", "[::1]9469"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_the_dashboard_uses_metrics_that_exist(server):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["schemaVersion"] >= 30 and dash["uid"]
    exported = {name for name, _ in scrape(server)}
    used = set()
    titles = []
    for panel in dash["panels"]:
        titles.append(panel["title"])
        for target in panel.get("targets", []):
            for word in __import__("re").findall(r"\bzfast_[a-z_]+", target["expr"]):
                used.add(word)
    assert used, "no zfast metric in the dashboard"
    assert used <= exported, used - exported
    for want in ("zfast_packets_total", "zfast_drops_total", "zfast_public_port_packets_total",
                 "zfast_role"):
        assert want in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
