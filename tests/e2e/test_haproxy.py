"""zfast.routing.haproxy end to end: a real haproxy in its own network namespace, backends
(small Python HTTP servers saying their name and echoing the request headers) in a second
one, the client in a third. Routing on Host, TLS by SNI, HTTP/2, redirects, ACME answers,
forwarded headers, websockets, runtime updates and reloads under load, health checks.

    cli 10.77.2.2 ---- 10.77.2.1 [hap: haproxy :80 :443] 10.77.1.1 ---- 10.77.1.2 be
        fd77:2::2        fd77:2::1                         fd77:1::1      fd77:1::2
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.e2e.kit.waiting import wait_tcp
from tests.e2e.kit.web import Response
from zfast.lab.netns import Topology, in_ns
from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.instance import HAProxy
from zfast.routing.haproxy.model import Route, Upstream
from zfast.routing.haproxy.pem import make_self_signed

HAP4, HAP6 = "10.77.2.1", "fd77:2::1"          # haproxy as the client sees it
CLI4, CLI6 = "10.77.2.2", "fd77:2::2"
BE4, BE6 = "10.77.1.2", "fd77:1::2"
THUMB = "Zm9vYmFyYmF6cXV4LXRodW1icHJpbnRfMDEyMzQ1Njc"

# name -> (address, port): a1 and a2 serve "app", w1 the wildcard, p1 (IPv6) an exact name
# under the wildcard, h1 and h2 an upstream with HTTP health checks.
BACKENDS = {"a1": (BE4, 8001), "a2": (BE4, 8002), "w1": (BE4, 8003), "p1": (BE6, 8004),
            "h1": (BE4, 8005), "h2": (BE4, 8006)}

BACKEND_SERVER = r'''
import base64, hashlib, json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True           # headers and body go out at once
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            while True:                      # the tunnel: echo whatever comes
                data = self.connection.recv(4096)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return
        body = json.dumps({"name": name, "path": self.path,
                           "headers": [[k.lower(), v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    def handle_error(self, request, client_address):
        pass                                 # TCP health checks end with a reset

Server((host, port), Handler).serve_forever()
'''


def cert(name: str) -> str:
    return make_self_signed(name, [name], days=2)


@dataclass
class Lab:
    topo: Topology
    hap: str                                  # full namespace names
    be: str
    cli: str
    h: HAProxy
    servers: dict[str, subprocess.Popen]
    routes: list[Route]
    upstreams: dict[str, Upstream]
    certs: dict[str, str]
    thumbprint: str | None = None
    facts: dict = field(default_factory=dict)

    def apply(self) -> dict:
        return self.h.update(self.routes, list(self.upstreams.values()), self.certs, self.thumbprint)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    # Fail, never skip: a run without root or haproxy must not look like a green one.
    assert os.geteuid() == 0, "e2e tests need root (network namespaces)"
    for tool in ("haproxy", "wrk", "curl"):
        assert subprocess.run(["which", tool], capture_output=True).returncode == 0, f"{tool} not installed"
    with Topology(prefix="zfh") as t:
        hap, be, cli = t.add_ns("hap"), t.add_ns("be"), t.add_ns("cli")
        t.veth(hap, "eth1", be, "eth0", ["10.77.1.1/24", "fd77:1::1/64"], [f"{BE4}/24", f"{BE6}/64"])
        t.veth(cli, "eth0", hap, "eth2", [f"{CLI4}/24", f"{CLI6}/64"], [f"{HAP4}/24", f"{HAP6}/64"])
        servers = {name: t.popen(be, [sys.executable, "-c", BACKEND_SERVER, name, addr, str(port)])
                   for name, (addr, port) in BACKENDS.items()}
        for name, (addr, port) in BACKENDS.items():
            wait_tcp(hap, addr, port)
        ups = {
            "app": Upstream("app", ((BE4, 8001),), {"kind": "tcp", "interval_ms": 200, "fall": 2, "rise": 2}),
            "wild": Upstream("wild", ((BE4, 8003),)),
            "v6": Upstream("v6", ((BE6, 8004),)),
            "hc": Upstream("hc", ((BE4, 8005), (BE4, 8006)),
                           {"kind": "http", "interval_ms": 100, "fall": 2, "rise": 2, "path": "/health"}),
        }
        routes = [Route("app.example.org", "app"), Route("*.wild.example.org", "wild"),
                  Route("special.wild.example.org", "v6"),
                  Route("secure.example.org", "app", redirect_https=True),
                  Route("hc.example.org", "hc")]
        certs = {"app.example.org": cert("app.example.org"),
                 "*.wild.example.org": cert("*.wild.example.org")}
        h = HAProxy(tmp_path_factory.mktemp("haproxy"), netns=hap)
        t0 = time.monotonic()
        h.start(routes, list(ups.values()), certs)
        lab_ = Lab(t, hap, be, cli, h, servers, routes, ups, certs)
        lab_.facts["start_s"] = round(time.monotonic() - t0, 3)
        try:
            yield lab_
        finally:
            h.stop()
            print("\nhaproxy e2e facts:", json.dumps(lab_.facts, indent=1))


# ------------------------------------------------------------------------ clients

def connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    with in_ns(ns):
        return socket.create_connection((host, port), timeout=timeout)


def tls_context(alpn=("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE          # self-signed test certificates
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def get(lab: Lab, host: str, path: str = "/", headers: dict | None = None, tls: bool = False,
        sni: str | None = None, addr: str = HAP4) -> Response:
    """One request on a new connection from the client namespace."""
    port = 443 if tls else 80
    sock = connect(lab.cli, addr, port)
    if tls:
        sock = tls_context().wrap_socket(sock, server_hostname=sni or host.split(":")[0])
    conn = http.client.HTTPConnection(addr, port, timeout=5)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        return Response(conn.getresponse())
    finally:
        conn.close()


def served_cert(lab: Lab, sni: str, alpn=("http/1.1",)) -> tuple[x509.Certificate, str | None]:
    with tls_context(alpn).wrap_socket(connect(lab.cli, HAP4, 443), server_hostname=sni) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)), s.selected_alpn_protocol()


def cn(c: x509.Certificate) -> str:
    return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def worker(lab: Lab) -> int:
    return lab.h.show_proc()["workers"][0]


class Load:
    """Steady load on one host while something changes: two wrk (keep-alive, and a new
    connection a request) plus a Python loop of new TLS connections; every failure counted."""

    def __init__(self, lab: Lab, host: str, seconds: int = 3):
        self.lab, self.host, self.seconds = lab, host, seconds
        self.wrk = [self._wrk(["-c8"]), self._wrk(["-c4", "-H", "Connection: close"])]
        self.stop = threading.Event()
        self.tls_ok, self.tls_failures = 0, []
        self.thread = threading.Thread(target=self._tls_loop, daemon=True)
        self.thread.start()
        time.sleep(0.5)                       # load is running before the change

    def _wrk(self, extra: list[str]) -> subprocess.Popen:
        argv = ["wrk", "-t1", f"-d{int(self.seconds)}s", "--timeout", "5s", *extra,
                "-H", f"Host: {self.host}", f"http://{HAP4}/"]
        return self.lab.topo.popen(self.lab.cli, argv, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)

    def _tls_loop(self) -> None:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not self.stop.is_set():
            try:
                r = get(self.lab, self.host, tls=True)
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
                self.tls_ok += 1
            except Exception as e:            # counted, reported below
                self.tls_failures.append(f"{type(e).__name__}: {e}")

    def finish(self) -> dict:
        results = []
        for p in self.wrk:
            out, _ = p.communicate(timeout=self.seconds + 15)
            m = re.search(r"(\d+) requests in", out)
            assert m, out
            errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            results.append({"requests": int(m.group(1)),
                            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
                            "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0, "out": out})
        self.thread.join(self.seconds + 10)
        return {"keepalive": results[0], "close": results[1],
                "tls_new_conn": {"requests": self.tls_ok + len(self.tls_failures),
                                 "failures": self.tls_failures}}


def assert_no_failures(load: dict) -> None:
    for kind in ("keepalive", "close"):
        r = load[kind]
        assert r["requests"] > 50, r["out"]
        assert r["socket_errors"] == 0 and r["non_2xx_3xx"] == 0, r["out"]
    assert load["tls_new_conn"]["requests"] > 5 and not load["tls_new_conn"]["failures"], load["tls_new_conn"]


def summary(load: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "out"} for k, v in load.items()}


# --------------------------------------------------------------------------- tests

def test_started_with_listeners_and_api(lab):
    assert lab.h.alive() and lab.h.pid() == lab.h.show_proc()["master"]
    assert int(lab.h.workdir.pidfile.read_text()) == lab.h.pid()
    assert "Pid: " in lab.h.api.send("show info")
    kinds = {(s["proxy"], s["type"]) for s in lab.h.stats()}
    assert {("fe_http", "frontend"), ("fe_https", "frontend"), ("app", "backend")} <= kinds


def test_routing_on_host(lab):
    assert get(lab, "app.example.org").name == "a1"
    assert get(lab, "APP.Example.Org:80").name == "a1"                 # case and port ignored
    assert get(lab, "app.example.org", addr=HAP6).name == "a1"         # IPv6 listener
    assert get(lab, "x.wild.example.org").name == "w1"                 # wildcard: one more label
    assert get(lab, "special.wild.example.org").name == "p1"           # exact wins; IPv6 server
    for host in ("wild.example.org", "a.b.wild.example.org", "unknown.example.net"):
        r = get(lab, host)
        assert (r.status, r.body) == (404, b"no route for this host"), host
    # HTTPS routes on Host too, not on SNI
    assert get(lab, "x.wild.example.org", tls=True, sni="app.example.org").name == "w1"


def test_forwarded_headers(lab):
    r = get(lab, "app.example.org", headers={"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"})
    assert r.sent_headers("x-forwarded-for") == [CLI4]                 # the forged one is gone
    assert r.sent_headers("x-forwarded-proto") == ["http"]
    assert r.sent_headers("host") == ["app.example.org"]
    r = get(lab, "app.example.org", addr=HAP6, headers={"X-Forwarded-For": "6.6.6.6"})
    assert r.sent_headers("x-forwarded-for") == [CLI6]
    r = get(lab, "app.example.org", tls=True, headers={"X-Forwarded-For": "1.2.3.4, 5.6.7.8"})
    assert r.sent_headers("x-forwarded-for") == [CLI4]
    assert r.sent_headers("x-forwarded-proto") == ["https"]


def test_certificate_by_sni(lab):
    assert cn(served_cert(lab, "app.example.org")[0]) == "app.example.org"
    assert cn(served_cert(lab, "x.wild.example.org")[0]) == "*.wild.example.org"
    assert cn(served_cert(lab, "nobody.example.net")[0]) == "zfast router default"


def test_http2_over_tls(lab):
    c, alpn = served_cert(lab, "app.example.org", alpn=("h2", "http/1.1"))
    assert alpn == "h2"
    p = lab.topo.run(lab.cli, ["curl", "-sk", "--http2", "--max-time", "5",
                               "--resolve", f"app.example.org:443:{HAP4}",
                               "-w", "\n%{http_version}", "https://app.example.org/h2"],
                     capture_output=True, text=True)
    body, _, version = p.stdout.rpartition("\n")
    assert p.returncode == 0 and version == "2", p.stdout + p.stderr
    assert json.loads(body)["name"] == "a1"        # HTTP/2 to the client, HTTP/1.1 to the server


def test_redirect_to_https(lab):
    r = get(lab, "secure.example.org", "/p/q?x=1")
    assert r.status == 301 and r.headers["Location"] == "https://secure.example.org/p/q?x=1"
    assert get(lab, "secure.example.org", "/p", tls=True).name == "a1"   # served over HTTPS
    assert get(lab, "app.example.org", "/p").status == 200               # no redirect there


def test_acme_challenge(lab):
    path = "/.well-known/acme-challenge/tok_EN-123"
    assert get(lab, "secure.example.org", path).status == 404             # no thumbprint yet
    pid = worker(lab)
    lab.thumbprint = THUMB
    assert lab.apply() == {"maps": 1, "certs_added": [], "certs_updated": [], "certs_removed": [],
                           "reloaded": False}
    for host in ("secure.example.org", "unknown.example.net"):           # before any redirect; any host
        r = get(lab, host, path)
        assert r.status == 200 and r.body == f"tok_EN-123.{THUMB}".encode(), host
        assert r.headers["Content-Type"].startswith("text/plain")
    assert get(lab, "app.example.org", "/.well-known/acme-challenge/bad.token").status == 404
    assert worker(lab) == pid                                             # no reload
    assert lab.h.workdir.map_path("acme.map").read_text() == f"thumbprint {THUMB}\n"


def websocket(lab: Lab) -> socket.socket:
    """An upgraded connection to app.example.org (the backend echoes what it gets)."""
    s = connect(lab.cli, HAP4, 80)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET /ws HTTP/1.1\r\nHost: app.example.org\r\nUpgrade: websocket\r\n"
               "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Key: {key}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def test_websocket(lab):
    with websocket(lab) as s:
        s.sendall(b"\x81\x05hello")
        assert s.recv(100) == b"\x81\x05hello"                            # the tunnel echoes


def test_websocket_survives_a_reload(lab):
    with websocket(lab) as s:
        old = worker(lab)
        lab.h.reload()
        procs = lab.h.show_proc()
        assert procs["workers"] != [old] and old in procs["old_workers"]   # finishing its tunnel
        assert "Stopping: 1" in lab.h.master.send(f"@!{old} show info")
        s.sendall(b"\x81\x05again")
        assert s.recv(100) == b"\x81\x05again"
        assert lab.h.api.answering_pid() == procs["workers"][0]
    deadline = time.monotonic() + 5
    while old in lab.h.show_proc()["old_workers"]:                     # gone with its last connection
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_add_domain_and_cert_at_runtime_under_load(lab):
    pid = worker(lab)
    load = Load(lab, "app.example.org")
    lab.routes.append(Route("new.example.org", "app"))
    lab.certs["new.example.org"] = cert("new.example.org")
    t0 = time.monotonic()
    result = lab.apply()
    lab.facts["add_domain_and_cert_s"] = round(time.monotonic() - t0, 3)
    assert result == {"maps": 1, "certs_added": ["new.example.org"], "certs_updated": [],
                      "certs_removed": [], "reloaded": False}
    assert get(lab, "new.example.org", tls=True).name == "a1"
    c, alpn = served_cert(lab, "new.example.org", alpn=("h2", "http/1.1"))
    assert cn(c) == "new.example.org" and alpn == "h2"
    done = load.finish()
    lab.facts["load_during_runtime_update"] = summary(done)
    assert_no_failures(done)
    assert worker(lab) == pid
    assert "new.example.org" in lab.h.workdir.crt_list.read_text()        # files in step


def test_change_and_remove_cert_at_runtime(lab):
    pid = worker(lab)
    before = served_cert(lab, "new.example.org")[0]
    lab.certs["new.example.org"] = cert("new.example.org")
    result = lab.apply()
    assert result["certs_updated"] == ["new.example.org"] and not result["reloaded"]
    after = served_cert(lab, "new.example.org")[0]
    assert after.serial_number != before.serial_number
    assert after.serial_number == x509.load_pem_x509_certificate(
        lab.certs["new.example.org"].encode()).serial_number
    # removed: route and certificate go, the default certificate answers that name
    lab.routes = [r for r in lab.routes if r.host != "new.example.org"]
    del lab.certs["new.example.org"]
    result = lab.apply()
    assert result == {"maps": 1, "certs_added": [], "certs_updated": [],
                      "certs_removed": ["new.example.org"], "reloaded": False}
    assert cn(served_cert(lab, "new.example.org")[0]) == "zfast router default"
    assert get(lab, "new.example.org").status == 404
    assert worker(lab) == pid
    assert not lab.h.workdir.cert_path("new.example.org").exists()


def test_upstream_change_is_a_hitless_reload(lab):
    pid = worker(lab)
    load = Load(lab, "app.example.org")
    lab.upstreams["app"] = Upstream("app", ((BE4, 8001), (BE4, 8002)), lab.upstreams["app"].health)
    result = lab.apply()
    assert result["reloaded"] is True and result["maps"] == 0
    lab.facts["reload_s"] = round(lab.h.last_reload_seconds, 3)
    done = load.finish()
    lab.facts["load_during_reload"] = summary(done)
    assert_no_failures(done)
    assert worker(lab) != pid
    names = {get(lab, "app.example.org").name for _ in range(6)}
    assert names == {"a1", "a2"}
    # runtime state survived the reload: the thumbprint and the certificates are in the files
    assert get(lab, "x.example.org", "/.well-known/acme-challenge/t").body == f"t.{THUMB}".encode()
    assert cn(served_cert(lab, "app.example.org")[0]) == "app.example.org"


def test_health_check_takes_a_stopped_backend_out(lab):
    def server(name):
        return next(s for s in lab.h.stats() if s["proxy"] == "hc" and s["name"] == f"{BE4}_{BACKENDS[name][1]}")

    assert server("h1")["status"] == "UP" and server("h1")["check_status"] == "L7OK"
    app = [s for s in lab.h.stats() if s["proxy"] == "app" and s["type"] == "server"]
    assert all(s["check_status"] == "L4OK" for s in app), app
    proc = lab.servers["h2"]
    lab.topo._stop(proc)
    t0 = time.monotonic()
    while server("h2")["status"] != "DOWN":
        assert time.monotonic() - t0 < 5, server("h2")
        time.sleep(0.05)
    lab.facts["health_down_s"] = round(time.monotonic() - t0, 3)
    served = [get(lab, "hc.example.org") for _ in range(20)]
    assert {r.status for r in served} == {200} and {r.name for r in served} == {"h1"}
    assert server("h1")["requests"] >= 20 and server("h2")["check_status"].startswith("L4")


def test_update_without_changes_does_nothing(lab):
    pid = worker(lab)
    assert lab.apply() == {"maps": 0, "certs_added": [], "certs_updated": [], "certs_removed": [],
                           "reloaded": False}
    assert worker(lab) == pid


def test_failed_runtime_step_falls_back_to_a_reload(lab, monkeypatch):
    def refuse(path, entries):
        raise HAProxyError("runtime API refused (test)")

    pid = worker(lab)
    monkeypatch.setattr(lab.h.api, "swap_map", refuse)
    lab.routes.append(Route("fallback.example.org", "wild"))
    result = lab.apply()
    assert result["reloaded"] is True and "refused (test)" in result["fallback"]
    assert worker(lab) != pid
    assert get(lab, "fallback.example.org").name == "w1"                  # from the files


def test_start_stops_a_haproxy_left_by_an_earlier_daemon(lab, tmp_path):
    ups = [Upstream("u", ((BE4, 8001),))]
    first = HAProxy(tmp_path, http_port=8080, https_port=8443, netns=lab.hap)
    first.start([Route("left.example.org", "u")], ups, {})
    left_pid = first.pid()
    # the daemon died without stopping it; the next one starts on the same workdir
    second = HAProxy(tmp_path, http_port=8080, https_port=8443, netns=lab.hap)
    try:
        t0 = time.monotonic()
        second.start([Route("left.example.org", "u")], ups, {})
        assert time.monotonic() - t0 < 3
        first.process.proc.wait(1)                # a zombie until its parent (us) reaps it
        assert not os.path.exists(f"/proc/{left_pid}")
        sock = connect(lab.cli, HAP4, 8080)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: left.example.org\r\nConnection: close\r\n\r\n")
        assert b'"name": "a1"' in sock.makefile("rb").read()
        sock.close()
        pid = second.pid()
        second.stop(drain=1.0)                                            # soft stop first
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        second.stop()
        first.stop()


def test_stop_leaves_no_process(lab):
    h = lab.h
    procs = h.show_proc()
    pids = [procs["master"], *procs["workers"], *procs["old_workers"]]
    h.stop()
    assert not h.alive() and h.pid() is None
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"haproxy process {pid} left"
    left = subprocess.run(["ip", "netns", "pids", lab.hap], capture_output=True, text=True).stdout.split()
    assert left == []
    h.stop()                                                              # idempotent
