"""The router daemon (zfast.routing.router) end to end, started as the core starts it:
``ip netns exec <ns> python -m zfast.routing.router -c FILE`` with a shared SQLite store that
the test writes to (revisions with store.commit, certificates with a CertManager).

    cli 10.77.1.2 ---- 10.77.1.1 [rt: router + haproxy :80 :443] 10.77.0.1 ---- be
                                                                  10.77.0.2 (be2) :8080
                                                                  10.77.0.3 (be3) :8080
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.x509.oid import NameOID

from tests.e2e.kit.router import BACKEND_SERVER, RouterProc, haproxy_pids
from tests.e2e.kit.waiting import wait_for, wait_tcp
from tests.e2e.kit.web import get, served_cert, served_serial
from zfast import config
from zfast.lab.netns import Topology
from zfast.routing.certs import CertManager
from zfast.routing.router import jwk_thumbprint, make_plan, upstream_name
from zfast.store.sqlite import SqliteStore

PROJECT = "demo"
RT = "10.77.1.1"                                  # the router as the client sees it
BE = {"be2": "10.77.0.2", "be3": "10.77.0.3"}
SOON = 2.0                                        # a store change is served within this

BASE = {
    "project": PROJECT,
    "services": [
        {"name": "app", "vip": "10.0.0.10", "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
         "backends": [{"address": BE["be2"]}, {"address": BE["be3"]}],
         "health": {"kind": "http", "interval_ms": 200, "fall": 2, "rise": 1, "path": "/"}},
        {"name": "web", "vip": "10.0.0.11", "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
         "backends": [{"address": BE["be3"]}]},
    ],
    "routing": {
        "addresses": [RT],
        "domains": [
            {"host": "app.example.org", "service": "app", "port": 80},
            {"host": "*.apps.example.org", "service": "web", "port": 80},
            {"host": "secure.example.org", "service": "app", "port": 80, "redirect_https": True},
            {"host": "plain.example.org", "service": "web", "port": 80, "tls": "none"},
        ],
    },
}


def tls_domains(project: dict) -> list[tuple[str, str]]:
    return [(d["host"], d.get("tls", "self-signed")) for d in project["routing"]["domains"]]


@dataclass
class Lab:
    topo: Topology
    rt: str
    cli: str
    tmp: Path
    store: SqliteStore
    certs: CertManager
    router: RouterProc
    project: dict                  # the last good project committed

    def commit(self, project: dict | str, why: str) -> int:
        """A new revision, given as a dict (a good file) or raw text (not validated)."""
        if isinstance(project, dict):
            self.certs.ensure(tls_domains(project))   # as the core: certificates first
            self.project = copy.deepcopy(project)
            text = yaml.safe_dump(project, sort_keys=False)
        else:
            text = project
        return self.store.commit(PROJECT, text, "test", [why], "test_router").rev

    def get(self, host: str, path: str = "/", **kw):
        return get(self.cli, RT, host, path, **kw)

    def names(self, host: str, n: int = 6, **kw) -> list[str]:
        return [self.get(host, **kw).name for _ in range(n)]

    def serial(self, sni: str) -> str:
        return served_serial(self.cli, RT, sni)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    # Fail, never skip: a run without root or a tool must not look like a green one.
    assert os.geteuid() == 0, "e2e tests need root (network namespaces)"
    for tool in ("haproxy", "ip"):
        assert shutil.which(tool), f"{tool} not installed"
    tmp = tmp_path_factory.mktemp("router")
    with Topology(prefix="zfrt") as topo:
        rt, be, cli = topo.add_ns("rt"), topo.add_ns("be"), topo.add_ns("cli")
        topo.veth(rt, "eth0", be, "eth0", ["10.77.0.1/24"], [f"{a}/24" for a in BE.values()])
        topo.veth(cli, "eth0", rt, "eth1", ["10.77.1.2/24"], [f"{RT}/24"])
        for name, addr in BE.items():
            topo.popen(be, [sys.executable, "-c", BACKEND_SERVER, name, addr, "8080"])
        for addr in BE.values():
            wait_tcp(rt, addr, 8080)
        store = SqliteStore(tmp / "store.sqlite", "test")
        certs = CertManager(store, PROJECT, None)
        project = copy.deepcopy(BASE)
        certs.ensure(tls_domains(project))
        store.commit(PROJECT, yaml.safe_dump(project, sort_keys=False), "test", ["initial"], "test")
        router = RouterProc(topo, rt, tmp / "rt-a", project, tmp / "store.sqlite")
        try:
            router.start()
            yield Lab(topo, rt, cli, tmp, store, certs, router, project)
        finally:
            router.stop()
            store.close()


def routing_events(lab: Lab, since: int) -> list[dict]:
    return [e for e in lab.router.events("routing")[since:]]


# ------------------------------------------------------------------------------- tests

def test_status_after_start(lab):
    st = wait_for("revision 1 adopted", lambda: (s := lab.router.status())["revision"] == 1 and s,
                  SOON)
    assert (st["kind"], st["role"], st["project"], st["node"]) == \
        ("router", "active", PROJECT, "demo-rt-a")
    assert st["pid"] == lab.router.proc.pid                     # ip netns exec execs
    assert sorted(st["domains"]) == sorted(d["host"] for d in BASE["routing"]["domains"])
    stored = {c.host: c.serial for c in lab.certs.certs()}
    assert {c["host"]: c["serial"] for c in st["certs"]} == \
        {h: s for h, s in stored.items() if h != "plain.example.org"}
    assert st["haproxy"]["alive"] and st["haproxy"]["pid"] and st["haproxy"]["reloads"] == 0
    itfs = {i["name"]: i for i in st["interfaces"]}
    assert set(itfs) == {"eth0", "eth1"} and itfs["eth1"]["addresses"] == [f"{RT}/24"]
    assert st["acme_thumbprint"] is None and st["last_error"] is None
    started = lab.router.events("routing")[0]
    assert started["action"] == "started" and started["haproxy_pid"] == st["haproxy"]["pid"]
    print(f"\nrouter ready {lab.router.start_seconds:.2f} s after launch")


def test_routes_on_host_exact_and_wildcard(lab):
    assert set(lab.names("app.example.org")) == {"be2", "be3"}        # both app backends
    assert set(lab.names("x.apps.example.org")) == {"be3"}            # web: be3 only
    assert set(lab.names("Y.Apps.Example.Org:80")) == {"be3"}
    r = lab.get("x.apps.example.org", "/some/path")
    assert (r.json()["host"], r.json()["path"]) == ("x.apps.example.org", "/some/path")
    for host in ("apps.example.org", "a.b.apps.example.org", "nobody.example.net"):
        assert lab.get(host).status == 404, host
    r = lab.get("secure.example.org", "/p?q=1")                        # redirect_https
    assert r.status == 301 and r.headers["Location"] == "https://secure.example.org/p?q=1"
    assert lab.get("plain.example.org").name == "be3"                  # tls: none


def test_https_serves_the_stored_certificate(lab):
    for sni, host in (("app.example.org", "app.example.org"),
                      ("x.apps.example.org", "*.apps.example.org"),
                      ("secure.example.org", "secure.example.org")):
        assert lab.serial(sni) == lab.certs.get(host).serial, sni
    assert lab.get("app.example.org", tls=True, port=443).name in ("be2", "be3")
    assert lab.get("secure.example.org", tls=True, port=443).status == 200
    # tls: none has no certificate: HAProxy's default one answers
    c = served_cert(lab.cli, RT, "plain.example.org")
    assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "zfast router default"


def test_new_revision_adds_a_domain_without_reload(lab):
    before = len(lab.router.events("routing"))
    reloads = lab.router.status()["haproxy"]["reloads"]
    project = copy.deepcopy(lab.project)
    project["routing"]["domains"].append({"host": "new.example.org", "service": "app", "port": 80})
    assert lab.get("new.example.org").status == 404
    t0 = time.monotonic()
    rev = lab.commit(project, "add new.example.org")
    wait_for("new.example.org served", lambda: lab.get("new.example.org").status == 200, SOON)
    took = time.monotonic() - t0
    wait_for("its certificate served",
             lambda: lab.serial("new.example.org") == lab.certs.get("new.example.org").serial,
             SOON - took + 0.5)
    st = lab.router.status()
    assert st["revision"] == rev and "new.example.org" in st["domains"]
    assert st["haproxy"]["reloads"] == reloads                          # maps and certs at runtime
    ev = [e for e in routing_events(lab, before) if e.get("revision") == rev]
    assert ev and ev[0]["cause"] == "revision" and ev[0]["reloaded"] is False
    assert ev[0]["domains_added"] == ["new.example.org"]
    assert [c["host"] for c in ev[0]["certs_added"]] == ["new.example.org"]
    print(f"\nnew domain served {took:.2f} s after the commit")


def test_new_backends_reload_hitlessly(lab):
    before = len(lab.router.events("routing"))
    reloads = lab.router.status()["haproxy"]["reloads"]
    project = copy.deepcopy(lab.project)
    project["services"][1]["backends"].insert(0, {"address": BE["be2"]})   # web: be2 too
    rev = lab.commit(project, "web on be2 and be3")
    wait_for("be2 serving the wildcard",
             lambda: "be2" in lab.names("x.apps.example.org", 4), SOON)
    assert set(lab.names("x.apps.example.org")) == {"be2", "be3"}
    # the new workers serve a moment before the reload returns and the daemon records the
    # revision as applied: its status says so once the apply is whole
    st = wait_for(f"revision {rev} recorded", lambda: (s := lab.router.status())["revision"] == rev and s, SOON)
    assert st["revision"] == rev and st["haproxy"]["reloads"] == reloads + 1
    ev = [e for e in routing_events(lab, before) if e.get("revision") == rev]
    assert ev and ev[0]["reloaded"] is True and ev[0]["upstreams_changed"] == ["web_80"]


def test_renewed_certificate_served(lab):
    before = len(lab.router.events("routing"))
    old = lab.serial("app.example.org")
    t0 = time.monotonic()
    new = lab.certs.renew("app.example.org").serial
    assert new != old
    wait_for("the renewed certificate served", lambda: lab.serial("app.example.org") == new, SOON)
    print(f"\nrenewed certificate served {time.monotonic() - t0:.2f} s after renew()")
    ev = wait_for("a certs event", lambda: [e for e in routing_events(lab, before)
                                            if e.get("cause") == "certs"], 1.0)
    assert ev[0]["certs_updated"] == [{"host": "app.example.org", "serial": new, "was": old}]
    assert ev[0]["reloaded"] is False
    st = lab.router.status()
    assert {c["host"]: c["serial"] for c in st["certs"]}["app.example.org"] == new


def test_acme_challenge_answered_once_an_account_exists(lab):
    path = "/.well-known/acme-challenge/tok-EN_123"
    assert lab.store.fetch(f"routing/{PROJECT}/acme/account") is None
    assert lab.get("app.example.org", path).status == 404           # no account: no answers
    # A manager with ACME configured makes the account key (nothing is contacted for that).
    thumb = CertManager(lab.store, PROJECT, {"directory": "http://127.0.0.1:9/dir"}) \
        .account_thumbprint()
    r = wait_for("the challenge answered",
                 lambda: (r := lab.get("app.example.org", path)).status == 200 and r, SOON)
    assert r.body.decode() == f"tok-EN_123.{thumb}"
    # any host, before any redirect
    assert lab.get("secure.example.org", path).body.decode() == f"tok-EN_123.{thumb}"
    assert lab.router.status()["acme_thumbprint"] == thumb


def test_bad_revisions_keep_the_old_state(lab):
    good = lab.router.status()
    bad = copy.deepcopy(lab.project)
    bad["routing"]["domains"].append({"host": "ghost.example.org", "service": "nope", "port": 80})
    bad["routing"]["domains"][0]["service"] = "web"      # would move app.example.org
    rev = lab.commit(yaml.safe_dump(bad), "domain to a service that does not exist")
    err = wait_for("an error event", lambda: [e for e in lab.router.events("error")
                                              if e.get("revision") == rev], SOON)
    assert "nope" in err[0]["error"] and err[0]["kept"] == good["revision"]
    rev2 = lab.commit("project: demo\nrouting: [not, a, mapping\n", "not YAML")
    wait_for("an error event", lambda: [e for e in lab.router.events("error")
                                        if e.get("revision") == rev2], SOON)
    st = lab.router.status()
    assert st["revision"] == good["revision"] and st["domains"] == good["domains"]
    assert st["haproxy"]["reloads"] == good["haproxy"]["reloads"]
    assert set(lab.names("app.example.org")) == {"be2", "be3"}         # not moved to web
    assert lab.get("new.example.org").status == 200
    assert lab.get("ghost.example.org").status == 404
    # a good revision after them applies (here: a domain removed, its certificate too)
    project = copy.deepcopy(lab.project)
    project["routing"]["domains"] = [d for d in project["routing"]["domains"]
                                     if d["host"] != "new.example.org"]
    rev3 = lab.commit(project, "remove new.example.org")
    wait_for("new.example.org gone", lambda: lab.get("new.example.org").status == 404, SOON)
    st = lab.router.status()
    assert st["revision"] == rev3 and "new.example.org" not in [c["host"] for c in st["certs"]]


def test_stats_per_upstream_and_server(lab):
    for _ in range(10):
        assert lab.get("app.example.org").status == 200
    st = lab.router.stats()
    app = st["upstreams"]["app_80"]
    assert (app["service"], app["port"], app["status"]) == ("app", 80, "UP")
    assert app["requests"] >= 10 and app["bytes_out"] > 0
    servers = app["servers"]
    assert set(servers) == {f"{a}:8080" for a in BE.values()}
    for s in servers.values():
        assert s["status"] == "UP" and s["sessions"] >= 5, servers
    assert set(st["upstreams"]) == {"app_80", "web_80"}
    assert st["frontends"]["fe_http"]["requests"] > 0


def second_router(lab: Lab, name: str, http_port: int, https_port: int) -> RouterProc:
    return RouterProc(lab.topo, lab.rt, lab.tmp / name, lab.project, lab.tmp / "store.sqlite",
                      name=f"demo-{name}", http_port=http_port, https_port=https_port).start()


def test_haproxy_death_stops_the_router_with_an_error(lab):
    r = second_router(lab, "rt-b", 8081, 8444)
    try:
        assert get(lab.cli, RT, "app.example.org", port=8081).status == 200
        master = r.status()["haproxy"]["pid"]
        os.kill(master, signal.SIGKILL)
        code = r.wait(10)
        assert code == 1, r.log()
        errors = r.events("error")
        assert errors and "haproxy exited" in errors[-1]["error"]
        wait_for("no haproxy left", lambda: not haproxy_pids(r.cfg), 5.0)
        assert not (r.state_dir / "api.sock").exists()
    finally:
        r.stop()


def test_sigterm_stops_haproxy(lab):
    r = second_router(lab, "rt-c", 8082, 8445)
    try:
        assert get(lab.cli, RT, "x.apps.example.org", port=8082).status == 200
        assert haproxy_pids(r.cfg)
        r.signal(signal.SIGTERM)
        assert r.wait(10) == 0, r.log()
        assert haproxy_pids(r.cfg) == []
        assert not (r.state_dir / "api.sock").exists()
        assert r.events("routing")[-1]["action"] == "stopped"
        assert not r.events("error")
        with pytest.raises(OSError):
            get(lab.cli, RT, "x.apps.example.org", port=8082, timeout=1)
    finally:
        r.stop()


def test_bad_files_exit_2_with_the_reason(tmp_path):
    """A file the router cannot use: exit status 2 and the reason on stderr, nothing started."""
    cases = {
        "no router section": ({"project": PROJECT}, "no router section"),
        "unknown router key": ({"project": PROJECT, "router": {"name": "r", "port": 1}},
                               "router.port: unknown key"),
        "bad project": ({"project": PROJECT, "routing": {"addresses": []},
                         "router": {"name": "r", "state_dir": str(tmp_path / "r")}},
                        "routing.addresses"),
    }
    for what, (data, reason) in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(data))
        p = subprocess.run([sys.executable, "-m", "zfast.routing.router", "-c", str(path)],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 2 and reason in p.stderr, (what, p.stderr)
    assert not (tmp_path / "r" / "haproxy").exists()


def test_plan_names_and_thumbprint():
    plan = make_plan(config.parse(copy.deepcopy(BASE)))
    assert [(u.name, u.servers) for u in plan.upstreams] == [
        ("app_80", ((BE["be2"], 8080), (BE["be3"], 8080))), ("web_80", ((BE["be3"], 8080),))]
    assert plan.upstreams[0].health == {"kind": "http", "interval_ms": 200, "fall": 2, "rise": 1,
                                        "path": "/"}
    assert plan.tls_hosts == ("*.apps.example.org", "app.example.org", "secure.example.org")
    long = upstream_name("s" * 63, 65535)
    assert len(long) == 63 and long.endswith("_65535") and long != upstream_name("s" * 62 + "t", 65535)

    class Docs(dict):           # the store's document interface, in memory
        put = dict.__setitem__
        fetch = dict.get

        def items(self, prefix):
            return {k: v for k, v in dict.items(self) if k.startswith(prefix)}

    docs = Docs()
    thumb = CertManager(docs, PROJECT, {"directory": "http://127.0.0.1:9/"}).account_thumbprint()
    assert jwk_thumbprint(json.loads(docs[f"routing/{PROJECT}/acme/account"])["key_pem"]) == thumb
