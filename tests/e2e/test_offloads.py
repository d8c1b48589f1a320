"""Senders as Linux makes them: veths and a bridge straight from `ip link add`.

A veth or bridge sends with TX checksum offload on: the receiver gets a partial checksum,
and a veth peer without NAPI drops XDP frames. zfast must forward both correctly (tc on
virtual links, bpf/hook.h) and count nothing that did not arrive. One module turns the
senders' offloads off on purpose and runs native XDP, so that path stays covered too,
with zfast itself giving its veth peers NAPI (zfast/dataplane/egress.py).

Exact counts at the receivers: every UDP datagram is answered by the backend that got it
(through the reverse NAT), and what the backends answered is what `zfast stats --json`
and /metrics count per backend.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections import Counter
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.kit import cli, lab, oracle, traffic
from zfast.lab import topology
from zfast.lab.netns import in_ns

WEIGHTS = [1, 1, 2]
PROM = "127.0.0.1:9464"
FAMILIES = {"v4": (topology.VIP4, "app", 0), "v6": (topology.VIP6, "app6", 1)}


@contextmanager
def _env(prefix: str, offloads: bool):
    """The lab with a node that serves /metrics too."""
    with lab.lab_env(prefix, WEIGHTS, start_node=False, offloads=offloads) as env:
        project = env.lab.project()
        project["telemetry"] = {"prometheus": PROM}
        env.api = lab.start_node(env.lab, project)
        yield env


@pytest.fixture(scope="module")
def default_env():
    with _env("zfoff", offloads=True) as env:
        yield env


def _features(ns: str, ifname: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", ifname],
                          capture_output=True, text=True, check=True).stdout


def _metrics(env) -> dict[tuple, float]:
    with in_ns(env.lab.topo.ns(env.lab.lb)):
        text = urllib.request.urlopen(f"http://{PROM}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _backend_packets(env, service: str) -> tuple[Counter, Counter]:
    """Per backend name: packets in `zfast stats --json`, and in /metrics."""
    st = cli.stats_json(env.state_dir)
    svc = next(s for s in st["services"] if s["name"] == service)
    stats = Counter({env.names[b["address"]]: b["packets"] for b in svc["backends"]})
    prom = Counter()
    for (name, labels), value in _metrics(env).items():
        d = dict(labels)
        if name == "zfast_packets_total" and d.get("service") == service:
            prom[env.names[d["backend"]]] = int(value)
    return stats, prom


def _csum_errors(ns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-az", "UdpInCsumErrors",
                          "TcpInCsumErrors", "Udp6InCsumErrors"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines()[1:] if line.split())


def _settled(env, service: str) -> tuple[Counter, Counter]:
    prev = None
    for _ in range(20):
        time.sleep(0.3)
        cur = _backend_packets(env, service)
        if cur == prev:
            return cur
        prev = cur
    return prev


def _udp_exact(env, vip: str, service: str, flows: int = 50, each: int = 20) -> Counter:
    """flows x each datagrams (a socket, so a source port, per flow); every one answered
    through the reverse NAT; the backends' answers equal the stats and /metrics deltas."""
    before_stats, before_prom = _settled(env, service)
    got, failures, resent = Counter(), [], 0
    for _ in range(each):
        answered, failed, again = traffic.udp_answers(env.lab.client, vip, topology.UDP_PORT, flows,
                                                      workers=flows, tries=1)
        got.update(answered)
        failures += failed
        resent += again
    after_stats, after_prom = _settled(env, service)
    assert not failures, f"{len(failures)} of {flows * each} datagrams unanswered: {failures[:5]}"
    assert sum(got.values()) == flows * each
    assert after_stats - before_stats == got, (dict(after_stats - before_stats), dict(got))
    assert after_prom - before_prom == got, (dict(after_prom - before_prom), dict(got))
    return got


# ---------------------------------------------------------------- links as Linux makes them

def test_the_lab_keeps_linux_defaults(default_env):
    env = default_env
    lb = env.lab
    for ns in (lb.client, *lb.backends):
        assert "tx-checksumming: on" in _features(lb.topo.ns(ns), "eth0"), ns
    assert "generic-receive-offload: off" in _features(lb.topo.ns(lb.switch), "lbp")
    st = cli.zfast("status", "--json", "--state-dir", str(env.state_dir))
    itfs = {i["name"]: i for i in json.loads(st.stdout)["interfaces"]}
    assert {n: (i["hook"], i["mode"]) for n, i in itfs.items()} == \
        {"pub0": ("tc", "tc"), "priv0": ("tc", "tc")}, itfs
    assert all("veth" in i["why"] and "partial checksums" in i["why"] for i in itfs.values())
    text = cli.zfast("status", "--state-dir", str(env.state_dir)).stdout
    assert "pub0" in text and "tc" in text and "veth" in text, text


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_tcp_connections_answered_and_spread_by_weight(default_env, fam):
    vip, _, family = FAMILIES[fam]
    count = 300
    spread = traffic.connections(default_env.lab.client, vip, topology.TCP_PORT,
                                 default_env.ports.take(count))
    assert not spread.failures, list(spread.failures.items())[:5]
    got = spread.backends
    assert sum(got.values()) == count
    # exactly where the Maglev table sends each 5-tuple (the table carries the weights)
    backends = [topology.backend_addrs(i)[family] for i in range(3)]
    client = topology.CLIENT4 if family == 0 else topology.CLIENT6
    table = list(zip(backends, WEIGHTS))
    for port, name in spread.by_port.items():
        assert default_env.names[oracle.expected_backend(table, client, port, vip, topology.TCP_PORT)] == name
    assert got["be3"] > got["be1"] and got["be3"] > got["be2"], got


@pytest.mark.parametrize("fam", sorted(FAMILIES))
def test_udp_from_50_flows_counted_exactly_where_it_arrived(default_env, fam):
    vip, service, _ = FAMILIES[fam]
    before = {ns: _csum_errors(default_env.lab.topo.ns(ns)) for ns in default_env.lab.backends}
    got = _udp_exact(default_env, vip, service)
    assert set(got) <= {"be1", "be2", "be3"} and len(got) >= 2, got
    after = {ns: _csum_errors(default_env.lab.topo.ns(ns)) for ns in default_env.lab.backends}
    assert after == before, f"checksum errors at the backends: {before} -> {after}"


def test_kernel_drops_are_shown_per_interface(default_env):
    st = cli.stats_json(default_env.state_dir)
    assert set(st["kernel_drops"]) == {"pub0", "priv0"}
    for counts in st["kernel_drops"].values():
        assert counts == {"xdp_redirect_errors": 0, "xdp_xmit_errors": 0, "tx_dropped": 0}, st
    kinds = {dict(labels)["kind"] for n, labels in _metrics(default_env) if n == "zfast_kernel_drops_total"}
    assert kinds == {"xdp_redirect_errors", "xdp_xmit_errors", "tx_dropped"}


# ---------------------------------------------------------------- offloads off, native XDP

@pytest.fixture(scope="module")
def xdp_env():
    with _env("zfxdp", offloads=False) as env:
        yield env


def _events(env, kind: str) -> list[dict]:
    out = cli.zfast("logs", "--json", "--state-dir", str(env.state_dir)).stdout
    return [e for e in map(json.loads, out.splitlines()) if e.get("kind") == kind]


def _gro(env, ns: str, ifname: str) -> bool:
    return "generic-receive-offload: on" in _features(env.lab.topo.ns(ns), ifname)


def test_native_xdp_gives_its_veth_peers_napi_and_forwards(xdp_env):
    env = xdp_env
    assert "tx-checksumming: off" in _features(env.lab.topo.ns(env.lab.client), "eth0")
    st = json.loads(cli.zfast("status", "--json", "--state-dir", str(env.state_dir)).stdout)
    assert {i["name"]: (i["hook"], i["mode"]) for i in st["interfaces"]} == \
        {"pub0": ("xdp", "native"), "priv0": ("xdp", "native")}, st["interfaces"]
    # the peers of pub0 (the client's eth0) and priv0 (the switch's lbp) had no NAPI
    fixed = {e["interface"]: e for e in _events(env, "egress")}
    assert {fixed[n]["action"] for n in ("pub0", "priv0")} == {"gro_on_peer"}, fixed
    assert _gro(env, env.lab.client, "eth0") and _gro(env, env.lab.switch, "lbp")
    for fam in sorted(FAMILIES):
        vip, service, _ = FAMILIES[fam]
        spread = traffic.connections(env.lab.client, vip, topology.TCP_PORT, env.ports.take(300))
        assert not spread.failures, list(spread.failures.items())[:5]
        _udp_exact(env, vip, service)


def test_a_peer_losing_napi_is_counted_then_repaired(xdp_env):
    """GRO turned off by hand on the switch side of priv0: XDP frames redirected into
    priv0 are lost (the kernel fails the redirect and counts it where the frames came in,
    at pub0) until zfast notices; the loss is counted per interface, in stats and
    /metrics, and is an event; zfast turns GRO on again and traffic flows."""
    env = xdp_env
    ns = env.lab.topo.ns(env.lab.switch)

    def lost() -> int:
        return cli.stats_json(env.state_dir)["kernel_drops"]["pub0"]["xdp_redirect_errors"]

    before = lost()
    subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", "lbp", "gro", "off"], check=True)
    # datagrams now: lost in the kernel after zfast redirected them
    answered, _, _ = traffic.udp_answers(env.lab.client, topology.VIP4, topology.UDP_PORT, 20, workers=20,
                                         timeout=0.5, tries=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _gro(env, env.lab.switch, "lbp"):
        time.sleep(0.5)
    assert _gro(env, env.lab.switch, "lbp"), "zfast did not give lbp its NAPI back"
    after = lost()
    assert after - before >= 20 - sum(answered.values()) > 0, (before, after, answered)
    prom = {dict(labels)["interface"]: v for (n, labels), v in _metrics(env).items()
            if n == "zfast_kernel_drops_total" and dict(labels)["kind"] == "xdp_redirect_errors"}
    assert prom["pub0"] == after
    errs = [e for e in _events(env, "kernel_drops") if e["interface"] == "pub0"]
    assert errs and errs[-1]["xdp_lost"] > 0, errs
    again = [e for e in _events(env, "egress") if e["interface"] == "priv0"]
    assert len(again) >= 2 and again[-1]["action"] == "gro_on_peer", again
    _udp_exact(env, topology.VIP4, "app", flows=10, each=5)
