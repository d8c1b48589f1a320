"""Health checks end to end: a backend whose server stops leaves the rotation within
interval x fall, comes back within interval x rise after it returns, and gets no new
connection meanwhile; HTTP checks (a 500 is unhealthy even while the backend serves); the
rule for established flows of an unhealthy backend; all down fails open; an apply keeps what
the checks found.

One lab for the module (client, balancer, three backends). Each backend runs the echo server
(TCP 8080, services app and app6, tcp checks) and a small HTTP server (8081, service web on
VIP port 8000, http checks of /health, whose status code a file per backend sets).

The node is `zfast up` with the health controller wired in the way zfast.controllers.health
documents for zfast.node.daemon.Node: tests/e2e/kit/health_node.py is that node (once Node
wires the controller itself its subclass does nothing). Needs root: without it every test
fails, none skips.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.kit import cli, lab, maps, oracle, traffic
from tests.e2e.kit.waiting import wait_tcp
from zfast.api import Client
from zfast.lab import topology
from zfast.lab.netns import Topology, in_ns
from zfast.paths import pin_dir

INTERVAL_MS, FALL, RISE = 200, 3, 2
INTERVAL = INTERVAL_MS / 1000
SLACK = 0.3                      # scheduling slack on a busy 2-core machine
OUT_BOUND = INTERVAL * FALL + SLACK
IN_BOUND = INTERVAL * RISE + SLACK
WEB_PORT, WEB_TARGET = 8000, 8081
TCP_HEALTH = {"kind": "tcp", "interval_ms": INTERVAL_MS, "fall": FALL, "rise": RISE}
HTTP_HEALTH = {"kind": "http", "interval_ms": INTERVAL_MS, "fall": FALL, "rise": RISE,
               "path": "/health"}

# An HTTP server that says who it is; GET /health answers with the code in a file.
HTTP_SERVER = r'''
import http.server, socket, socketserver, sys
name, port, status_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive unless the client says close
    def do_GET(self):
        code = 200
        if self.path == "/health":
            try:
                code = int(open(status_file).read().strip() or 200)
            except (OSError, ValueError):
                pass
        body = (name + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

Server(("::", port), Handler).serve_forever()
'''


# ---------------------------------------------------------------- the lab

@dataclass
class Env:
    lab: topology.Lab
    api: Client
    ports: traffic.PortPool
    names: dict[str, str]
    status_dir: Path
    http_servers: list = field(default_factory=list)

    def set_http_status(self, i: int, code: int) -> None:
        path = self.status_dir / f"be{i + 1}.status"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{code}\n")
        tmp.rename(path)


def project(L: topology.Lab, web_weights=(1, 1, 1)) -> dict:
    p = L.project()
    for svc in p["services"]:
        svc["health"] = dict(TCP_HEALTH)
    p["services"].append({
        "name": "web", "vip": topology.VIP4,
        "ports": [{"port": WEB_PORT, "proto": "tcp", "target_port": WEB_TARGET}],
        "backends": [{"address": a, "weight": w} for a, w in zip(L.backend4, web_weights)],
        "health": dict(HTTP_HEALTH)})
    return p


def start_echo(L: topology.Lab, i: int):
    return L.topo.popen(L.backends[i], [sys.executable, "-m", "zfast.lab.echo", "--name",
                                        f"be{i + 1}", "--port", str(topology.TARGET_TCP),
                                        "--udp-port", str(topology.TARGET_UDP)],
                        stdout=open("/dev/null", "w"))


def wait_accepts(L: topology.Lab, address: str, port: int, timeout: float = 20.0) -> float:
    """Until address:port accepts a connection from the balancer's namespace; when it did."""
    wait_tcp(L.topo.ns(L.lb), address, port, timeout, every=0.01)
    return time.monotonic()


def start_node(L: topology.Lab, timeout: float = 120.0) -> Client:
    L.write_config(project(L))
    # -m from the repo root: tests.e2e.kit is importable there
    L.node_proc = L.topo.popen(L.lb, [sys.executable, "-m", "tests.e2e.kit.health_node",
                                      str(L.config_path)], cwd=cli.REPO)
    return topology.wait_answering(L.node_proc, L.state_dir, timeout, "the health node")


@pytest.fixture(scope="module")
def env():
    assert os.geteuid() == 0, lab.NEED_ROOT
    status_dir = Path(tempfile.mkdtemp(prefix="zfhc-"))
    with Topology(prefix="zfhc") as topo:
        L = topology.build(topo, 3, [1, 1, 1])
        try:
            L.start_servers()
            e = Env(L, None, traffic.PortPool(), lab.backend_names(L), status_dir)
            for i, ns in enumerate(L.backends):
                e.set_http_status(i, 200)
                e.http_servers.append(topo.popen(ns, [
                    sys.executable, "-c", HTTP_SERVER, f"be{i + 1}", str(WEB_TARGET),
                    str(status_dir / f"be{i + 1}.status")]))
            lab.wait_servers(L)
            for address in L.backend4:
                wait_accepts(L, address, WEB_TARGET)
            e.api = start_node(L)
            wait_all_healthy(e)
            yield e
        finally:
            try:
                L.stop_node()
            finally:
                if pin_dir(L.node_name).exists():
                    cli.zfast("down", "--state-dir", str(L.state_dir))
                shutil.rmtree(L.state_dir, ignore_errors=True)
                shutil.rmtree(status_dir, ignore_errors=True)


# ---------------------------------------------------------------- reading the node

def health_map(api: Client) -> dict[tuple[str, str], bool]:
    st = api.get("/stats")
    return {(s["name"], b["address"]): b["healthy"] for s in st["services"] for b in s["backends"]}


def wait_health(api: Client, service: str, address: str, healthy: bool,
                timeout: float = 10.0) -> tuple[float, float]:
    """Poll /stats until the backend's `healthy` is `healthy`. Returns (sent, seen): when the
    last poll that still disagreed was sent (the maps changed after it) and when the agreeing
    answer came (they had changed before it)."""
    deadline = time.monotonic() + timeout
    disagree_sent = time.monotonic()
    while True:
        sent = time.monotonic()
        got = health_map(api)[(service, address)]
        seen = time.monotonic()
        if got == healthy:
            return disagree_sent, seen
        disagree_sent = sent
        if seen > deadline:
            raise AssertionError(f"{service} {address} not healthy={healthy} after {timeout} s: "
                                 f"{api.get('/status')['controllers'].get('health')}")
        time.sleep(0.02)


def wait_all_healthy(e: Env, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        bad = [k for k, v in health_map(e.api).items() if not v]
        if not bad:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still unhealthy after {timeout} s: {bad}")
        time.sleep(0.05)


def oracle_misses(e: Env, by_port: dict[int, str], table: list[tuple[str, int]], client: str,
                  vip: str, port: int) -> dict:
    misses = {}
    for sport, name in by_port.items():
        want = e.names[oracle.expected_backend(table, client, sport, vip, port)]
        if want != name:
            misses[sport] = (name, want)
    return misses


# ---------------------------------------------------------------- traffic

@dataclass
class Attempt:
    start: float
    end: float
    backend: str | None
    error: str | None = None


class Background:
    """Short connections one after another from the client, each from a fresh source port,
    recording when each started and ended and who answered."""

    def __init__(self, e: Env, vip: str, port: int, pause: float = 0.01, http: bool = False):
        self.e, self.vip, self.port, self.pause, self.http = e, vip, port, pause, http
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            sport = self.e.ports.take(1)[0]
            t0 = time.monotonic()
            try:
                if self.http:
                    name = http_get(self.e.lab.client, self.vip, self.port, sport, timeout=2.0)
                else:
                    name = traffic.hello_from(self.e.lab.client, self.vip, self.port, sport,
                                              timeout=2.0, reset=True)
                self.attempts.append(Attempt(t0, time.monotonic(), name))
            except OSError as err:
                self.attempts.append(Attempt(t0, time.monotonic(), None,
                                             f"{type(err).__name__}: {err}"))
            self._stop.wait(self.pause)


def http_get(ns: str, host: str, port: int, sport: int, timeout: float = 5.0) -> str:
    """GET / from source port sport; the body (the backend's name)."""
    with in_ns(ns):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.bind(("", sport))
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"answer {head[:40]!r}")
    return body.decode().strip()


def http_spread(e: Env, sports, workers: int = 16) -> traffic.Spread:
    return traffic.spread(sports, lambda sport: http_get(e.lab.client, topology.VIP4, WEB_PORT, sport),
                          workers)


class KeepAlive:
    """One HTTP/1.1 connection that asks again and again."""

    def __init__(self, e: Env, sport: int):
        with in_ns(e.lab.client):
            self.sock = socket.socket()
        self.sock.settimeout(3)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", sport))
        self.sock.connect((topology.VIP4, WEB_PORT))
        self.file = self.sock.makefile("rb")

    def get(self) -> str:
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        status = self.file.readline()
        if not status:
            raise ConnectionError("closed")
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b"\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return self.file.read(length).decode().strip()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- 1: the acceptance

def test_stopped_server_out_within_fall_and_back_within_rise(env):
    e, L = env, env.lab
    be1_4, be1_6 = L.backend4[0], L.backend6[0]
    full = [(a, 1) for a in L.backend4]
    without = [(a, 1) for a in L.backend4[1:]]
    before = traffic.connections(L.client, topology.VIP4, topology.TCP_PORT, e.ports.take(60), reset=True)
    assert not before.failures and set(before.backends) == {"be1", "be2", "be3"}

    with Background(e, topology.VIP4, topology.TCP_PORT) as bg:
        time.sleep(0.3)
        L.servers[0].kill()
        L.servers[0].wait()
        t_kill = time.monotonic()
        out_sent, t_out = wait_health(e.api, "app", be1_4, False)
        _, t_out6 = wait_health(e.api, "app6", str(be1_6), False)
        out_s, out6_s = t_out - t_kill, t_out6 - t_kill
        # no new connection is sent to it once it is out: 100 of them, every one answered by
        # the backend the table without be1 names
        time.sleep(max(0.0, t_kill + OUT_BOUND - time.monotonic()))
        after = traffic.connections(L.client, topology.VIP4, topology.TCP_PORT, e.ports.take(100), reset=True)
        after6 = traffic.connections(L.client, topology.VIP6, topology.TCP_PORT, e.ports.take(100), reset=True)
        time.sleep(0.3)
        L.servers[0] = start_echo(L, 0)
        t_listen = wait_accepts(L, be1_4, topology.TARGET_TCP)
        in_sent, t_in = wait_health(e.api, "app", be1_4, True)
        in_s = t_in - t_listen
        time.sleep(0.3)
    back = traffic.connections(L.client, topology.VIP4, topology.TCP_PORT, e.ports.take(100), reset=True)

    failed = [a for a in bg.attempts if a.error]
    window = [a for a in bg.attempts if t_kill <= a.start < t_out]
    print(f"\nbe1 stopped: out of app after {out_s * 1000:.0f} ms, of app6 after "
          f"{out6_s * 1000:.0f} ms (bound {OUT_BOUND * 1000:.0f}); back {in_s * 1000:.0f} ms "
          f"after it listened (bound {IN_BOUND * 1000:.0f}); during the failure window "
          f"{len([a for a in window if a.error])} of {len(window)} new connections failed "
          f"(e.g. {failed[0].error if failed else '-'}); {len(bg.attempts)} in all")

    assert out_s <= OUT_BOUND, f"out after {out_s:.3f} s, bound {OUT_BOUND:.3f} s"
    assert out6_s <= OUT_BOUND, f"app6: out after {out6_s:.3f} s, bound {OUT_BOUND:.3f} s"
    assert in_s <= IN_BOUND, f"back after {in_s:.3f} s, bound {IN_BOUND:.3f} s"
    assert not after.failures, f"{len(after.failures)} of 100 failed: {list(after.failures.values())[:3]}"
    assert not after6.failures, f"v6: {len(after6.failures)} of 100 failed"
    assert "be1" not in after.backends and "be1" not in after6.backends
    assert not oracle_misses(e, after.by_port, without, topology.CLIENT4, topology.VIP4, topology.TCP_PORT)
    # background: only connections begun before it was out may fail; none reached be1 from
    # the moment it was out until the maps took it back (after in_sent)
    late = [a for a in failed if a.start >= t_out]
    assert not late, f"{len(late)} connections failed after be1 was out: {late[:3]}"
    sneaked = [a for a in bg.attempts if a.backend == "be1" and a.start >= t_kill
               and a.end < in_sent]
    assert not sneaked, f"{len(sneaked)} connections reached be1 while it was out: {sneaked[:3]}"
    # back in: new connections reach it again, exactly where the full table says
    assert not back.failures and back.backends["be1"] > 10, dict(back.backends)
    assert not oracle_misses(e, back.by_port, full, topology.CLIENT4, topology.VIP4, topology.TCP_PORT)
    wait_all_healthy(e)


# ---------------------------------------------------------------- 2: http checks

def test_http_500_is_unhealthy_even_while_the_backend_serves(env):
    e, L = env, env.lab
    be2 = L.backend4[1]
    without = [(L.backend4[0], 1), (L.backend4[2], 1)]
    try:
        with Background(e, topology.VIP4, WEB_PORT, http=True) as bg:
            time.sleep(0.2)
            e.set_http_status(1, 500)
            t_bad = time.monotonic()
            _, t_out = wait_health(e.api, "web", be2, False)
            time.sleep(max(0.0, t_bad + OUT_BOUND - time.monotonic()))
            spread = http_spread(e, e.ports.take(100))
            e.set_http_status(1, 200)
            t_good = time.monotonic()
            in_sent, t_in = wait_health(e.api, "web", be2, True)
            back = http_spread(e, e.ports.take(100))  # deterministic: be2 has its share again
            time.sleep(0.3)
        st = e.api.get("/status")["controllers"]["health"]
        hm = health_map(e.api)
    finally:
        e.set_http_status(1, 200)
    print(f"\nbe2 answers 500: out after {(t_out - t_bad) * 1000:.0f} ms, back "
          f"{(t_in - t_good) * 1000:.0f} ms after 200 again")
    assert t_out - t_bad <= OUT_BOUND
    assert t_in - t_good <= IN_BOUND
    # be2 still served HTTP all along, and its tcp checks (service app) stayed good
    assert http_get_direct(L, be2) == "be2"
    assert hm[("app", be2)] is True
    assert not spread.failures and "be2" not in spread.backends, dict(spread.backends)
    assert not oracle_misses(e, spread.by_port, without, topology.CLIENT4, topology.VIP4, WEB_PORT)
    sneaked = [a for a in bg.attempts if a.backend == "be2" and t_out <= a.start
               and a.end < in_sent]
    assert not sneaked, f"{len(sneaked)} requests reached be2 while it was out"
    # be2 still answers, so no request fails, but for one on its way to be2 when be2 goes
    # DOWN: its flow is balanced again at its next packet and the new backend resets it
    # (docs/datapath.md, Decisions: "a backend that fails its checks while it still serves
    # loses its connections too")
    failed = [a for a in bg.attempts if a.error]
    at_the_switch = [a for a in failed if a.start <= t_out and a.end >= t_bad]
    assert failed == at_the_switch and len(failed) <= 1, f"requests failed: {failed}"
    assert not back.failures and back.backends["be2"] > 0, dict(back.backends)
    assert st["healthy"] and st["targets"] == 9 and st["down"] == []


def http_get_direct(L: topology.Lab, address: str) -> str:
    with in_ns(L.topo.ns(L.lb)):
        s = socket.create_connection((address, WEB_TARGET), timeout=3)
    with s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode().strip()


# ---------------------------------------------------------------- 3: established flows

def _sport_for(e: Env, name: str) -> int:
    table = [(a, 1) for a in e.lab.backend4]
    while True:
        sport = e.ports.take(1)[0]
        if e.names[oracle.expected_backend(table, topology.CLIENT4, sport, topology.VIP4, WEB_PORT)] == name:
            return sport


def test_established_flows_of_an_unhealthy_backend_move(env):
    """The documented rule: a DOWN backend's established flows are balanced again at their
    next packet; a TCP connection then meets a backend that does not know it (reset), a
    flow on a healthy backend carries on."""
    e, L = env, env.lab
    moved_sport, kept_sport = _sport_for(e, "be3"), _sport_for(e, "be1")
    moving, staying = KeepAlive(e, moved_sport), KeepAlive(e, kept_sport)
    try:
        assert moving.get() == "be3" and staying.get() == "be1"
        e.set_http_status(2, 500)
        wait_health(e.api, "web", L.backend4[2], False)
        flows = maps.flow_backends(L.node_name)
        assert flows[(topology.CLIENT4, moved_sport, topology.VIP4, WEB_PORT)] == L.backend4[2]
        try:
            answer = moving.get()
        except OSError as err:
            answer = f"{type(err).__name__}"
        print(f"\nestablished flow on be3 after be3 went down: {answer}")
        assert answer in ("ConnectionResetError", "ConnectionError", "BrokenPipeError"), (
            f"the connection carried on ({answer!r}): the flow was not moved")
        flows = maps.flow_backends(L.node_name)
        new = flows[(topology.CLIENT4, moved_sport, topology.VIP4, WEB_PORT)]
        assert new in (L.backend4[0], L.backend4[1]), f"the flow still goes to {new}"
        assert staying.get() == "be1" and staying.get() == "be1"
    finally:
        moving.close()
        staying.close()
        e.set_http_status(2, 200)
    wait_health(e.api, "web", L.backend4[2], True)


# ---------------------------------------------------------------- 4: all down

def test_all_down_fails_open(env):
    e, L = env, env.lab
    full = [(a, 1) for a in L.backend4]
    try:
        for i in range(3):
            e.set_http_status(i, 500)
        for address in L.backend4:
            wait_health(e.api, "web", address, False)
        svc = next(s for s in e.api.get("/stats")["services"] if s["name"] == "web")
        spread = http_spread(e, e.ports.take(60))
    finally:
        for i in range(3):
            e.set_http_status(i, 200)
    assert svc["fail_open"] is True
    assert not any(b["healthy"] for b in svc["backends"])
    assert not spread.failures and set(spread.backends) == {"be1", "be2", "be3"}
    assert not oracle_misses(e, spread.by_port, full, topology.CLIENT4, topology.VIP4, WEB_PORT)
    for address in L.backend4:
        wait_health(e.api, "web", address, True)
    svc = next(s for s in e.api.get("/stats")["services"] if s["name"] == "web")
    assert svc["fail_open"] is False
    events = [ev for ev in node_events(L) if ev["kind"] == "backend" and ev["service"] == "web"]
    assert any("fail open" in c for ev in events for c in ev["changes"]), events[-3:]


def node_events(L: topology.Lab) -> list[dict]:
    p = cli.zfast("logs", "--json", "--state-dir", str(L.state_dir))
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------- 5: apply keeps health

def _apply(e: Env, web_weights, name: str) -> None:
    path = e.lab.write_config(project(e.lab, web_weights), e.lab.state_dir / name)
    p = cli.zfast("apply", "-c", str(path), "--state-dir", str(e.lab.state_dir))
    assert p.returncode == 0, f"zfast apply failed: {p.stderr}"


def test_apply_keeps_a_down_backend_out_and_a_drained_one_drained(env):
    e, L = env, env.lab
    be1, be2, be3 = L.backend4
    try:
        e.set_http_status(2, 500)
        wait_health(e.api, "web", be3, False)
        _apply(e, (1, 2, 1), "weights.yaml")         # a change to the same service
        time.sleep(INTERVAL * 2)
        assert health_map(e.api)[("web", be3)] is False, "an apply brought a down backend back"
        spread = http_spread(e, e.ports.take(100))
        assert not spread.failures and "be3" not in spread.backends
        assert not oracle_misses(e, spread.by_port, [(be1, 1), (be2, 2)], topology.CLIENT4,
                                 topology.VIP4, WEB_PORT)
        _apply(e, (1, 1, 0), "drain.yaml")           # drained while down, then healthy
        e.set_http_status(2, 200)
        wait_health(e.api, "web", be3, True)
        time.sleep(INTERVAL)
        spread = http_spread(e, e.ports.take(100))
        assert not spread.failures and "be3" not in spread.backends, "drained stays drained"
        assert not oracle_misses(e, spread.by_port, [(be1, 1), (be2, 1)], topology.CLIENT4,
                                 topology.VIP4, WEB_PORT)
        st = e.api.get("/status")["controllers"]["health"]
        assert st["targets"] == 9 and st["healthy"]
        events = [ev for ev in node_events(L) if ev["kind"] == "backend"]
        assert any(ev["address"] == be3 and ev["healthy"] is True for ev in events)
    finally:
        e.set_http_status(2, 200)
        _apply(e, (1, 1, 1), "restore.yaml")
    wait_all_healthy(e)

