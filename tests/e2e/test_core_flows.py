"""`zfast core up` end to end: the flow table follows the number of flows.

One core service in a namespace of its own ("host", holding the public and private
bridges), a client on the public bridge and two echo backends on the private one, as in
test_core.py but with its own project, state dir, bridges and subnets (both can exist).

Filling a 64k flow table with 200k flows (tools/trafficgen.py: UDP live frames into a
public UDP port) makes the scaling controller grow it to 256k, by a rolling replacement of
the pair, with no established TCP stream broken; after the load stops, the idle-flow sweep
empties the table and, after the cooldown, the table shrinks back to 64k the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.kit.cli import REPO
from tests.e2e.kit.core import Core as KitCore
from tests.e2e.kit.core import plug, start_core
from tests.e2e.kit.traffic import Pinger
from zfast.api import ApiError
from zfast.lab.netns import Topology, in_ns
from zfast.lab.probe import Stream, streams_alive, udp_hello

PROJECT = "coreflows"
STATE = Path("/run/zfast/test-core-flows")
PUB_BRIDGE, PRIV_BRIDGE = "zfpub1", "zfpriv1"
PUBLIC_VIP, TCP_PORT, UDP_PORT = "10.234.0.10", 2222, 5353
CLIENT = "10.234.0.100"
GEN_SOURCES = ("10.234.0.100", "10.234.0.101", "10.234.0.102", "10.234.0.103")
BACKENDS = ("10.235.0.2", "10.235.0.3")
STREAMS = 16
SMALL, BIG = 65536, 262144
FLOWS = 200_000            # distinct 5-tuples: 400k entries (forward + reply)
RATE = 20_000             # packets/s: ~3x more new flows a second than a 64k table holds between sweeps
COOLDOWN_S = 15
IDLE_S = 6


def _config() -> dict:
    return {
        "project": PROJECT,
        "services": [{"name": "app", "vip": "10.235.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080},
                                {"port": 53, "proto": "udp", "target_port": 5353}],
                      "backends": [{"address": a} for a in BACKENDS]}],
        "public_ports": [{"port": TCP_PORT, "proto": "tcp", "address": PUBLIC_VIP,
                          "service": "app", "target_port": 8080},
                         {"port": UDP_PORT, "proto": "udp", "address": PUBLIC_VIP,
                          "service": "app", "target_port": 5353}],
        "datapath": {"max_services": 4, "max_backends": 16, "flow_idle_s": IDLE_S},
        "core": {"public": {"bridge": PUB_BRIDGE, "subnet": "10.234.0.0/24"},
                 "private": {"bridge": PRIV_BRIDGE, "subnet": "10.235.0.0/24",
                             "gateway": "10.235.0.254"},
                 "balancer": {"cpu": 0.5, "memory": "256Mi", "flow_table": SMALL,
                              "scale": {"cpu": [0.25, 1], "memory": ["128Mi", "1Gi"],
                                        "flow_table": [SMALL, BIG], "cooldown_s": COOLDOWN_S}}},
    }


class Core(KitCore):
    def active_mac(self) -> str | None:
        try:
            active = [i for i in self.status()["instances"] if i["role"] == "active"]
        except ApiError:
            return None
        if len(active) != 1:
            return None
        out = subprocess.run(["ip", "-n", active[0]["netns"], "-j", "link", "show", "pub0"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout)[0]["address"]


@pytest.fixture(scope="module")
def core():
    assert os.geteuid() == 0, "the core tests need root (namespaces, cgroups, XDP)"
    subprocess.run(["rm", "-rf", str(STATE)])
    with Topology(prefix="zfcf") as topo:
        host = topo.add_ns("host")
        cfg = STATE.parent / "test-core-flows.yaml"
        err = STATE.parent / "test-core-flows.err"
        STATE.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(_config()))
        proc = start_core(topo, host, cfg, STATE, err, PRIV_BRIDGE)
        for i, ip in enumerate(BACKENDS, 1):
            ns = plug(topo, host, f"be{i}", f"bh{i}", PRIV_BRIDGE, [f"{ip}/24"], "10.235.0.254")
            # The streams' TCP echo at normal priority; the UDP echo (which the generator
            # floods) in a process of its own at the lowest, so it cannot starve them.
            topo.popen(ns, [sys.executable, "-m", "zfast.lab.echo", "--name", f"be{i}", "--port", "8080"])
            topo.popen(ns, ["nice", "-n", "19", sys.executable, "-m", "zfast.lab.echo",
                            "--name", f"be{i}", "--port", "8081", "--udp-port", "5353"])
        plug(topo, host, "cli", "ch", PUB_BRIDGE, [f"{a}/24" for a in GEN_SOURCES])
        topo.gro_on(host, "ch")      # the generator's frames arrive on ch by XDP redirect
        c = Core(STATE, topo, proc, topo.ns("cli"))
        c.wait_pair(90)
        yield c
    assert proc.returncode == 0, err.read_text()[-2000:]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"zfc-{PROJECT}" not in left, f"instances left behind: {left}"


class Load:
    """tools/trafficgen.py sending FLOWS UDP flows at the active instance, in a loop; sent
    again at the new active's MAC after a failover (the VIP moves, and so does the MAC)."""

    def __init__(self, core: Core):
        self.core = core
        self.stop_ = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.mac: str | None = None
        self.starts: list[tuple[float, str]] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _spawn(self, mac: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tools" / "trafficgen.py"), "--ns", self.core.cli,
             "--dev", "eth0", "--dst-mac", mac, "--src", CLIENT, "--dst", PUBLIC_VIP,
             "--dport", str(UDP_PORT), "--sport", "10000", "--flows", str(FLOWS),
             "--vary", "both", "--ports-per-addr", str(FLOWS // len(GEN_SOURCES)),
             "--proto", "udp", "--rate", str(RATE), "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def _halt(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _run(self) -> None:
        while not self.stop_.is_set():
            mac = self.core.active_mac()
            if mac and (mac != self.mac or self.proc is None or self.proc.poll() is not None):
                if self.proc is not None and self.proc.poll() is not None and mac == self.mac:
                    self.failures.append(f"trafficgen exited {self.proc.returncode}: "
                                         f"{self.proc.stderr.read()[-500:]}")
                self._halt()
                self.mac = mac
                self.proc = self._spawn(mac)
                self.starts.append((time.monotonic(), mac))
            self.stop_.wait(0.5)
        self._halt()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_.set()
        self.thread.join(30)


def _flow_table_events(core: Core) -> list[dict]:
    return [e for e in core.events("scale") if e.get("resource") == "flow_table"]


def _wait_event(core: Core, match, timeout: float, what: str, during=None) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [e for e in _flow_table_events(core) if match(e)]
        if found:
            return found[-1]
        if during:
            during()
        time.sleep(0.5)
    st = core.status()
    raise AssertionError(f"no {what} in {timeout} s; flow-table events "
                         f"{_flow_table_events(core)}; scaling {st['controllers']['scaling']}; "
                         f"resizing {st['resizing']}; instances {st['instances']}")


def _wait_resized(core: Core, size: int, timeout: float, during=None) -> dict:
    """Until no resize is under way, both instances have `size` entries, and the pair is
    whole: an active and a standby, both healthy."""
    def done(st: dict) -> bool:
        inst = st["instances"]
        return (st["resizing"] is None and len(inst) == 2
                and all(i["flow_table"] == size for i in inst)
                and sorted(i["role"] or "-" for i in inst) == ["active", "standby"]
                and all(i["healthy"] for i in inst))
    st = core.wait_status(done, timeout, f"the resize to {size} is not done", during, step=0.3)
    return {i["name"]: i for i in st["instances"]}


def test_200k_flows_grow_the_flow_table_hitless_and_it_shrinks_back_after_the_cooldown(core):
    core.wait_pair(90)
    assert udp_hello_in(core.cli, PUBLIC_VIP, UDP_PORT) in ("be1", "be2")
    start = {i["name"]: i for i in core.status()["instances"]}
    assert all(i["flow_table"] == SMALL for i in start.values()), start
    before = len(_flow_table_events(core))
    streams = [Stream(core.cli, PUBLIC_VIP, TCP_PORT) for _ in range(STREAMS)]
    assert not streams_alive(streams)
    timings: dict[str, float] = {}

    def no_broken_stream():
        broken = [s.error for s in streams if s.error]
        assert not broken, f"{len(broken)} stream(s) broke: {broken}"

    with Pinger(streams, pause=0.1) as pinger:
        # 1. 200k flows into the 64k table: it grows to 256k, pair replaced one by one.
        t0 = time.monotonic()
        with Load(core) as load:
            up = _wait_event(core, lambda e: e.get("old") == SMALL and e.get("new") == BIG
                             and "reason" in e, 60, f"scale event flow_table {SMALL} -> {BIG}",
                             during=no_broken_stream)
            t_up = time.monotonic()
            timings["load to grow decision"] = t_up - t0
            assert up["fill_p50"] > 0.85, up
            pair = _wait_resized(core, BIG, 120, during=no_broken_stream)
            timings["grow resize"] = time.monotonic() - t_up
            assert not load.failures, load.failures
        # the instances were replaced (a BPF map's size is fixed)
        assert all(pair[n]["restarts"] > start[n]["restarts"] for n in pair), (start, pair)
        done = [e for e in _flow_table_events(core)[before:] if e.get("action") == "resized"]
        assert done and done[-1]["old"] == SMALL and done[-1]["new"] == BIG, done
        pinger.wait_rounds(3)
        no_broken_stream()

        # 2. No load: the sweep empties the table; after the cooldown it shrinks back.
        t_stop = time.monotonic()
        down = _wait_event(core, lambda e: e.get("old") == BIG and e.get("new") == SMALL
                           and "reason" in e, 90, f"scale event flow_table {BIG} -> {SMALL}",
                           during=no_broken_stream)
        t_down = time.monotonic()
        timings["load stop to shrink decision"] = t_down - t_stop
        assert down["flows_max"] < SMALL // 2, down
        _wait_resized(core, SMALL, 120, during=no_broken_stream)
        timings["shrink resize"] = time.monotonic() - t_down
        pinger.wait_rounds(3)
    no_broken_stream()
    assert not streams_alive(streams, rounds=3), "a stream broke"
    events = _flow_table_events(core)[before:]
    resized = [e for e in events if e.get("action") == "resized"]
    assert [(e["old"], e["new"]) for e in resized] == [(SMALL, BIG), (BIG, SMALL)], events
    # the shrink is not decided before the cooldown after the grow
    assert t_down - t_up >= COOLDOWN_S
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + "; resize events: " + ", ".join(f"{e['old']}->{e['new']} {e['seconds']} s" for e in resized))
    for s in streams:
        s.close()


def udp_hello_in(ns: str, host: str, port: int) -> str:
    with in_ns(ns):
        return udp_hello(host, port)
