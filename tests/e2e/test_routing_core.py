"""The routing service end to end, under `zfast core up`.

A core service (balancer pair + two HAProxy routers as instances) in a namespace of its own
("host", which also holds the public client and Debian's pebble as the ACME server). The
routing address 10.238.0.20 belongs to the active balancer, which spreads its ports 80/443
over the two routers; they route by Host to the services' backends on the private bridge.

- HTTPS to two domains reaches the right service with a certificate issued by pebble's CA;
  HTTP redirects to HTTPS where configured.
- Under a steady wrk load (HTTP and HTTPS): adding a domain (and its ACME certificate),
  renewing a certificate and killing a router's daemon (then its repair) cause zero failed
  requests.
- Bad input to `zfast core apply` is refused with the reason; existing domains keep working.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.kit.cli import zfast
from tests.e2e.kit.core import plug
from tests.e2e.kit.pebble import Pebble
from tests.e2e.kit.router import BACKEND_SERVER
from tests.e2e.kit.waiting import wait_for
from tests.e2e.kit.web import get
from zfast.api import Client
from zfast.lab import lxd
from zfast.lab.netns import Topology, in_ns

PROJECT = "rcore"
STATE = Path("/run/zfast/test-routing-core")
ADDR = "10.238.0.20"           # the routing address (a public VIP)
CLIENT = "10.238.0.1"          # the host namespace's address on the public bridge
BACKENDS = {"app": "10.239.0.2", "api": "10.239.0.3"}


def project_file(pebble: Pebble, extra_domains: list | None = None,
                 runtime: dict | None = None) -> dict:
    services = [{"name": name, "vip": vip, "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                 "backends": [{"address": BACKENDS[name]}]}
                for name, vip in (("app", "10.239.0.10"), ("api", "10.239.0.11"))]
    domains = [{"host": "app.example.org", "service": "app", "port": 80, "tls": "acme",
                "redirect_https": True},
               {"host": "api.example.org", "service": "api", "port": 80, "tls": "acme"}]
    return {
        "project": PROJECT, "services": services,
        "routing": {"addresses": [ADDR],
                    "acme": {"directory": pebble.directory, "ca_bundle": pebble.ca_bundle,
                             "email": "ops@example.org"},
                    "domains": domains + (extra_domains or [])},
        "datapath": {"max_services": 8, "max_backends": 32},
        "core": {"public": {"bridge": "zrpub0", "subnet": "10.238.0.0/24"},
                 "private": {"bridge": "zrpriv0", "subnet": "10.239.0.0/24",
                             "gateway": "10.239.0.254"},
                 "balancer": {"cpu": 1, "memory": "512Mi"},
                 "routers": {"count": 2, "cpu": 0.5, "memory": "256Mi"},
                 **({"runtime": runtime} if runtime else {})},
    }


class Env:
    def __init__(self, topo, host, pebble, proc, cfg):
        self.topo, self.host, self.pebble, self.proc, self.cfg = topo, host, pebble, proc, cfg

    def status(self) -> dict:
        return Client(STATE, timeout=5).get("/status")

    def certs(self) -> dict:
        return {c["host"]: c for c in Client(STATE, timeout=5).get("/certs")}

    def complete(self) -> bool:
        st = self.status()
        roles = sorted((i["kind"], i["role"] or "-") for i in st["instances"])
        return (roles == [("balancer", "active"), ("balancer", "standby"),
                          ("router", "active"), ("router", "active")]
                and all(i["healthy"] for i in st["instances"]))

    def router_netns(self) -> list[str]:
        """Each router instance's network namespace, as its daemon's (a namespace or a
        container's: its HAProxy listens on every address there)."""
        return [f"/proc/{i['pid']}/ns/net" for i in self.status()["instances"]
                if i["kind"] == "router"]

    def acme_for(self, *hosts: str) -> bool:
        certs = self.certs()
        return all(h in certs and certs[h]["source"] == "acme" for h in hosts)

    def trust(self) -> ssl.SSLContext:
        roots = STATE.parent / "test-routing-pebble-roots.pem"
        roots.write_text(self.pebble.root_pem())
        ctx = ssl.create_default_context(cafile=str(roots))
        return ctx


@pytest.fixture(scope="module", params=["netns", "lxd"])
def env(request):
    """The core service with its instances as namespaces, or as containers of a 3-member
    LXD cluster whose daemons run in the "host" namespace (its bridges reach them all)."""
    assert os.geteuid() == 0, "the routing tests need root (namespaces, XDP, cgroups)"
    subprocess.run(["rm", "-rf", str(STATE)])
    STATE.mkdir(parents=True)
    cluster = None
    with Topology(prefix="zfrc") as topo:
        host = topo.add_ns("host")
        if request.param == "lxd":
            cluster = lxd.Cluster(Path(f"/tmp/zfast-lxd-routing-{uuid.uuid4().hex[:6]}"),
                                  size=3, port=48443, driver="btrfs", netns=host)
            topo.at_close(cluster.down)
            cluster.up(import_image=False)
        topo.bridge(host, "zrpub0", [f"{CLIENT}/24"])
        topo.bridge(host, "zrpriv0")
        for i, (name, ip) in enumerate(BACKENDS.items(), 1):
            ns = plug(topo, host, f"be{i}", f"rbh{i}", "zrpriv0", [f"{ip}/24"], "10.239.0.254")
            topo.popen(ns, [sys.executable, "-c", BACKEND_SERVER, name, ip, "8080"])
        with Pebble(STATE.parent / "test-routing-pebble", addr=ADDR, netns=host) as pebble:
            cfg = STATE.parent / "test-routing-core.yaml"
            runtime = ({"kind": "lxd", "socket": [str(p) for p in cluster.sockets().values()]}
                       if cluster else None)
            cfg.write_text(yaml.safe_dump(project_file(pebble, runtime=runtime)))
            err = open(STATE.parent / "test-routing-core.err", "wb")
            proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{host}", sys.executable, "-m", "zfast.cli",
                 "core", "up", "-c", str(cfg), "--state-dir", str(STATE)],
                stdout=subprocess.DEVNULL, stderr=err)
            e = Env(topo, host, pebble, proc, cfg)
            e.cluster = cluster
            try:
                wait_for("the core service complete", lambda: proc.poll() is None and e.complete(),
                         300 if cluster else 120, 0.3)
                wait_for("ACME certificates", lambda: e.acme_for("app.example.org", "api.example.org"), 60, 0.3)
                # every router serves them (each reads the store every 0.5 s), asked one
                # by one: through the VIP a few requests may all meet the same router
                wait_for("the certificates served", lambda: all(
                    https_get(e, h, address="127.0.0.1", netns=ns)[0] == 200
                    for h in ("app.example.org", "api.example.org") for ns in e.router_netns()),
                    10, 0.2)
                yield e
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
    assert proc.returncode == 0, (STATE.parent / "test-routing-core.err").read_text()[-3000:]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"zfc-{PROJECT}" not in left, left
    assert subprocess.run(["pgrep", "-f", str(STATE)], capture_output=True).returncode != 0, \
        "a process of the core service is left"
    if cluster is not None:
        assert not cluster.base.exists(), f"{cluster.base} left behind"


def https_get(env: Env, host: str, path: str = "/", address: str = ADDR,
              netns: str | None = None) -> tuple[int, dict, dict]:
    """GET over HTTPS verified against pebble's CA: (status, body, peer cert); from the
    host namespace through the VIP, or from netns to address."""
    ctx = env.trust()
    with in_ns(netns or env.host):
        conn = http.client.HTTPSConnection(address, 443, context=ctx, timeout=5)
        conn.sock = ctx.wrap_socket(__import__("socket").create_connection((address, 443), timeout=5),
                                    server_hostname=host)
        try:
            conn.request("GET", path, headers={"Host": host})
            r = conn.getresponse()
            return r.status, json.loads(r.read() or b"{}"), conn.sock.getpeercert()
        finally:
            conn.close()


def test_https_reaches_each_domains_service_with_a_certificate_from_pebble(env):
    for host, service in (("app.example.org", "app"), ("api.example.org", "api")):
        status, body, cert = https_get(env, host, "/x")
        assert status == 200 and body["name"] == service and body["host"] == host
        issuer = dict(x[0] for x in cert["issuer"])
        assert issuer["commonName"].startswith("Pebble Intermediate CA")
        assert ("DNS", host) in cert["subjectAltName"]
    r = get(env.host, ADDR, "app.example.org", "/a?b=1")
    assert r.status == 301 and r.headers["Location"] == "https://app.example.org/a?b=1"
    r = get(env.host, ADDR, "api.example.org", "/plain")       # no redirect configured
    assert r.status == 200 and r.name == "api"
    assert get(env.host, ADDR, "nobody.example.org").status == 404
    # A client that resolves the names (ip netns exec gives the namespace /etc/netns/NS/hosts)
    hosts = Path("/etc/netns") / env.host / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"127.0.0.1 localhost\n{ADDR} app.example.org api.example.org\n")
    roots = STATE.parent / "test-routing-pebble-roots.pem"
    roots.write_text(env.pebble.root_pem())
    try:
        for host, service in (("app.example.org", "app"), ("api.example.org", "api")):
            out = subprocess.run(["ip", "netns", "exec", env.host, "curl", "-sS", "--http2",
                                  "--cacert", str(roots), "-w", " %{http_version}",
                                  f"https://{host}/by-name"],
                                 capture_output=True, text=True, timeout=10)
            assert out.returncode == 0, out.stderr
            body, version = out.stdout.rsplit(" ", 1)
            assert json.loads(body)["name"] == service and version == "2"
    finally:
        hosts.unlink()
        hosts.parent.rmdir()
    rows = json.loads(zfast("certs", "--json", "--state-dir", str(STATE), check=True).stdout)
    assert {r["host"]: r["source"] for r in rows} == {"app.example.org": "acme",
                                                     "api.example.org": "acme"}
    assert all({"issuer", "serial", "not_after", "renew_at"} <= set(r) for r in rows)


def _wrk(env: Env, url: str, host: str, seconds: int) -> subprocess.Popen:
    return env.topo.popen(env.host, ["wrk", "-t1", "-c8", f"-d{seconds}s", "--latency",
                                     "-H", f"Host: {host}", url],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wrk_result(p: subprocess.Popen) -> dict:
    out, _ = p.communicate(timeout=120)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": requests, "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non_2xx_3xx": int(non2xx.group(1)) if non2xx else 0, "out": out}


def test_adding_a_domain_renewing_and_killing_a_router_fail_no_request(env):
    wait_for("complete", env.complete, 60, 0.3)
    loads = [_wrk(env, f"http://{ADDR}/", "api.example.org", 40),
             _wrk(env, f"https://{ADDR}/", "app.example.org", 40)]
    t0 = time.monotonic()
    time.sleep(2)
    # 1. a new domain, its certificate from ACME
    new = yaml.safe_load(env.cfg.read_text())
    new["routing"]["domains"].append({"host": "new.example.org", "service": "app", "port": 80,
                                      "tls": "acme"})
    path = STATE.parent / "test-routing-core-new.yaml"
    path.write_text(yaml.safe_dump(new))
    zfast("core", "apply", "-c", str(path), "--state-dir", str(STATE), check=True)
    wait_for("new.example.org's ACME certificate", lambda: env.acme_for("new.example.org"), 30, 0.3)
    wait_for("new.example.org served", lambda: https_get(env, "new.example.org")[1].get("name") == "app", 10, 0.2)
    # 2. a renewal
    before = env.certs()["app.example.org"]["serial"]
    zfast("certs", "renew", "app.example.org", "--state-dir", str(STATE), check=True)
    assert env.certs()["app.example.org"]["serial"] != before
    wait_for("the renewed certificate served",
             lambda: format(int(https_get(env, "app.example.org")[2]["serialNumber"], 16), "x") ==
             env.certs()["app.example.org"]["serial"], 10, 0.2)
    # 3. a router's daemon killed: drained, replaced, back in rotation
    router = next(i for i in env.status()["instances"] if i["kind"] == "router")
    os.kill(router["pid"], signal.SIGKILL)
    wait_for("the router repaired", lambda: any(
        i["name"] == router["name"] and i["restarts"] > router["restarts"] and i["healthy"]
        for i in env.status()["instances"]), 30, 0.2)
    wait_for("both routers in rotation", lambda: env.complete() and not env.status().get("drained"), 30, 0.2)
    assert time.monotonic() - t0 < 38, "the steps took longer than the load"
    results = [_wrk_result(p) for p in loads]
    for r in results:
        assert r["requests"] > 500, r["out"]
        assert r["socket_errors"] == 0 and r["non_2xx_3xx"] == 0, r["out"]
    events = [json.loads(line) for line in (STATE / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "repair" and e.get("action") == "drained" for e in events)


def test_bad_input_is_refused_and_existing_domains_keep_working(env):
    base = yaml.safe_load(env.cfg.read_text())
    cases = {
        "bad host": ({"host": "bad_host!.example.org", "service": "app", "port": 80}, "host"),
        "unknown service": ({"host": "x.example.org", "service": "nope", "port": 80}, "nope"),
    }
    for what, (domain, word) in cases.items():
        bad = json.loads(json.dumps(base))
        bad["routing"]["domains"].append(domain)
        path = STATE.parent / "test-routing-core-bad.yaml"
        path.write_text(yaml.safe_dump(bad))
        r = zfast("core", "apply", "-c", str(path), "--state-dir", str(STATE))
        assert r.returncode != 0 and word in r.stderr, (what, r.stderr)
    status, body, _ = https_get(env, "api.example.org")
    assert status == 200 and body["name"] == "api"
    r = zfast("certs", "renew", "nobody.example.org", "--state-dir", str(STATE))
    assert r.returncode != 0 and "not one of routing.domains" in r.stderr

    # An ACME directory that does not answer: a logged retry with back-off, a self-signed
    # certificate for the new domain meanwhile, the others served as before.
    dead = json.loads(json.dumps(base))
    dead["routing"]["acme"]["directory"] = "https://127.0.0.1:14999/dir"
    dead["routing"]["domains"].append({"host": "late.example.org", "service": "app", "port": 80,
                                       "tls": "acme"})
    path = STATE.parent / "test-routing-core-dead.yaml"
    path.write_text(yaml.safe_dump(dead))
    try:
        zfast("core", "apply", "-c", str(path), "--state-dir", str(STATE), check=True)
        wait_for("a logged ACME retry", lambda: [
            e for e in map(json.loads, (STATE / "events.jsonl").read_text().splitlines())
            if e["kind"] == "error" and e.get("host") == "late.example.org"
            and "14999" in e.get("error", "") and e.get("retry_in_s", 0) > 0], 20, 0.3)
        assert env.certs()["late.example.org"]["source"] == "self-signed"
        r = zfast("certs", "renew", "late.example.org", "--state-dir", str(STATE))
        assert r.returncode != 0 and "14999" in r.stderr
        wait_for("late.example.org served", lambda: https_get_insecure(env, "late.example.org") == "app", 10, 0.2)
        for host, service in (("app.example.org", "app"), ("api.example.org", "api")):
            status, body, _ = https_get(env, host)      # still pebble's certificates
            assert status == 200 and body["name"] == service
    finally:
        env.cfg.write_text(yaml.safe_dump(base))
        zfast("core", "apply", "-c", str(env.cfg), "--state-dir", str(STATE), check=True)


def https_get_insecure(env: Env, host: str) -> str | None:
    return get(env.host, ADDR, host, port=443, tls=True).name


def test_core_status_and_stats_show_the_routers(env):
    st = json.loads(zfast("core", "status", "--json", "--state-dir", str(STATE), check=True).stdout)
    routers = [i for i in st["instances"] if i["kind"] == "router"]
    assert len(routers) == 2 and all(r["healthy"] and r["pid"] for r in routers)
    balancers = [i for i in st["instances"] if i["kind"] == "balancer"]
    if env.cluster is None:
        assert all(i["member"] is None for i in st["instances"])
    else:       # each pair on two different members of the cluster
        assert len({r["member"] for r in routers}) == 2, routers
        assert len({b["member"] for b in balancers}) == 2, balancers
        online = {m["server_name"] for m in env.cluster.members()}
        assert all(i["member"] in online for i in st["instances"]), st
    for _ in range(6):
        assert https_get(env, "api.example.org")[0] == 200
    stats = json.loads(zfast("core", "stats", "--json", "--state-dir", str(STATE), check=True).stdout)["instances"]
    served = sum(u["requests"] for r in routers
                 for name, u in stats[r["name"]]["upstreams"].items() if name.startswith("api"))
    assert served >= 6
    active = next(i["name"] for i in st["instances"] if i["kind"] == "balancer" and i["role"] == "active")
    routing = next(s for s in stats[active]["services"] if s["name"] == "routing-0")
    assert routing["packets"] > 0
