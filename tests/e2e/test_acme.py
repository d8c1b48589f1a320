"""CertManager against a real ACME server (pebble) in a network namespace. Needs root.

The namespace holds pebble (validating HTTP-01 at 127.0.0.1:80 for every name), a stateless
HTTP-01 responder on 127.0.0.1:80 (``<token>.<account thumbprint>``, as the HTTP balancers
answer), and the manager's ACME requests.
"""

import json
import logging
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography import x509

from tests.e2e.kit.pebble import Pebble
from zfast.lab.netns import Topology, in_ns
from zfast.routing.certs import CertError, CertManager
from zfast.store.sqlite import SqliteStore

PROJECT = "demo"
HOST = "app.example.org"
CHALLENGE = "/.well-known/acme-challenge/"


pytestmark = pytest.mark.usefixtures("need_root")   # tests/e2e/conftest.py


class Responder:
    """Stateless HTTP-01 answers on 127.0.0.1:80 of a namespace: any token -> token.thumbprint."""

    def __init__(self, ns: str):
        self.thumbprint: str | None = None
        self.seen: list[tuple[str, str]] = []   # (Host header, token)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.path[len(CHALLENGE):] if self.path.startswith(CHALLENGE) else ""
                if not token or "/" in token or outer.thumbprint is None:
                    self.send_error(404)
                    return
                outer.seen.append((self.headers.get("Host", ""), token))
                body = f"{token}.{outer.thumbprint}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        with in_ns(ns):   # the listening socket lives in the namespace
            self.server = ThreadingHTTPServer(("127.0.0.1", 80), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with Topology(prefix="zfacme") as topo:
        ns = topo.add_ns("acme")
        pebble = Pebble(tmp_path_factory.mktemp("pebble"), addr="127.0.0.1", netns=ns)
        responder = Responder(ns)
        try:
            yield topo, ns, pebble, responder
        finally:
            responder.close()
            pebble.close()


def acme_cfg(pebble: Pebble) -> dict:
    return {"directory": pebble.directory, "email": "ops@example.org",
            "ca_bundle": pebble.ca_bundle}


class Events(list):
    def __call__(self, kind, **fields):
        self.append({"kind": kind, **fields})

    def of(self, kind):
        return [e for e in self if e["kind"] == kind]


def verify_chain(cert_pem: str, root_pem: str, tmp_path) -> None:
    """openssl verify the leaf against pebble's root, with the chain's intermediates only."""
    pems = [p + "-----END CERTIFICATE-----\n"
            for p in cert_pem.split("-----END CERTIFICATE-----") if "BEGIN" in p]
    assert len(pems) >= 2, "ACME certificate without its chain"
    (tmp_path / "leaf.pem").write_text(pems[0].lstrip())
    (tmp_path / "chain.pem").write_text("".join(p.lstrip() for p in pems[1:]))
    (tmp_path / "root.pem").write_text(root_pem)
    p = subprocess.run(["openssl", "verify", "-purpose", "sslserver", "-CAfile",
                        tmp_path / "root.pem", "-untrusted", tmp_path / "chain.pem",
                        tmp_path / "leaf.pem"], capture_output=True, text=True)
    assert p.returncode == 0 and ": OK" in p.stdout, p.stdout + p.stderr


def dns_names(cert_pem: str) -> list[str]:
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    return leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_issue_renew_share(lab, tmp_path):
    topo, ns, pebble, responder = lab
    store = SqliteStore(tmp_path / "s.sqlite", "node-a")
    ev = Events()
    m = CertManager(store, PROJECT, acme_cfg(pebble), log_event=ev)
    responder.thumbprint = m.account_thumbprint()
    root = pebble.root_pem(intermediates=False)

    # at once: a self-signed placeholder, no network
    (placeholder,) = m.ensure([(HOST, "acme"), ("static.example.org", "none")])
    assert placeholder.source == "self-signed"

    # tick: ACME through pebble, validated over HTTP-01 by the responder
    with in_ns(ns):
        t = time.monotonic()
        changed = m.tick()
        issue_s = time.monotonic() - t
    assert [c.host for c in changed] == [HOST], (ev, pebble.logs())
    c = m.get(HOST)
    assert c.source == "acme" and c.serial != placeholder.serial
    assert c.issuer.startswith("Pebble Intermediate CA") and c.last_error is None
    assert dns_names(c.cert_pem) == [HOST]
    assert c.directory == pebble.directory
    verify_chain(c.cert_pem, root, tmp_path)
    assert c.not_before < time.time() < c.renew_at < c.not_after   # 5 years: not due
    assert responder.seen and all(h in (HOST, f"{HOST}:80") for h, _ in responder.seen)
    assert [(e["host"], e["action"]) for e in ev.of("cert")] == [(HOST, "fallback"),
                                                                   (HOST, "issued")]
    assert ev.of("error") == []
    print(f"\nACME issuance by tick(): {issue_s:.2f} s")

    with in_ns(ns):
        assert m.tick() == []            # nothing due: no network, no change

    # forced renewal: a new certificate from ACME

    with in_ns(ns):
        r = m.renew(HOST)
    assert r.source == "acme" and r.serial != c.serial
    assert m.get(HOST).serial == r.serial
    verify_chain(r.cert_pem, root, tmp_path)
    assert ev.of("cert")[-1]["action"] == "renewed"
    pub = r.public()
    assert pub["source"] == "acme" and pub["serial"] == r.serial and pub["host"] == HOST
    assert pub["not_after"].endswith("Z") and pub["renew_at"].endswith("Z")

    # another manager on the same store (another node's connection): same account, same certs
    store_b = SqliteStore(tmp_path / "s.sqlite", "node-b")
    try:
        m2 = CertManager(store_b, PROJECT, acme_cfg(pebble))
        assert m2.account_thumbprint() == responder.thumbprint
        assert [(x.host, x.serial, x.source) for x in m2.certs()] == [(HOST, r.serial, "acme")]
        assert m2.ensure([(HOST, "acme")]) == []
        with in_ns(ns):
            assert m2.tick() == []
    finally:
        store_b.close()
    account = json.loads(store.fetch(f"routing/{PROJECT}/acme/account"))
    assert account["directory"] == pebble.directory and account["uri"].startswith("https://")
    store.close()


def test_netns_argument_and_dead_directories(lab, tmp_path):
    """ACME calls made in the manager's netns from a thread elsewhere; then directories that
    refuse or never answer: an error event, a back-off, the certificate kept."""
    topo, ns, pebble, responder = lab
    store = SqliteStore(tmp_path / "s.sqlite", "node-a")
    m = CertManager(store, PROJECT, acme_cfg(pebble), netns=ns)
    responder.thumbprint = m.account_thumbprint()
    m.ensure([(HOST, "acme")])
    (issued,) = m.tick()                  # this thread stays in the host namespace
    assert issued.source == "acme"

    # a directory that never answers: its SYNs leave on a veth whose peer drops them (a
    # made-up neighbour address, no ARP); connect timeout, ~5 s
    for cmd in ["ip link add dead0 type veth peer name dead1",
                "ip addr add 10.77.0.1/24 dev dead0", "ip link set dead0 up",
                "ip link set dead1 up",
                "ip neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev dead0 nud permanent"]:
        topo.run(ns, cmd, check=True)
    dead = "https://10.77.0.2:14000/dir"
    ev = Events()
    m2 = CertManager(store, PROJECT, {"directory": dead}, log_event=ev, netns=ns)
    assert m2.ensure([(HOST, "acme")]) == []
    t = time.monotonic()
    assert m2.tick() == []            # issued by another directory: due, tried, failed
    took = time.monotonic() - t
    assert 3 < took < 10, f"connect timeout took {took:.1f} s"
    (err,) = ev.of("error")
    assert err["error"].startswith(f"acme directory {dead}: ") and err["retry_in_s"] == 5
    assert "timeout" in err["error"] or "timed out" in err["error"], err
    assert m2.tick() == [] and len(ev.of("error")) == 1     # backing off: no new attempt
    kept = m2.get(HOST)
    assert kept.serial == issued.serial and kept.source == "acme" and kept.last_error

    # a directory that refuses: renew() says so at once, the certificate stays
    refused = "https://127.0.0.1:14999/dir"
    m3 = CertManager(store, PROJECT, {"directory": refused}, netns=ns)
    m3.ensure([(HOST, "acme")])
    t = time.monotonic()
    with pytest.raises(CertError, match=rf"acme directory {refused}: .*refused"):
        m3.renew(HOST)
    assert time.monotonic() - t < 2
    assert m3.get(HOST).serial == issued.serial
    store.close()


def test_new_pebble_forgets_the_account(tmp_path, caplog):
    """A new ACME server (pebble restarted: same directory URL, no accounts): the stored
    account URL is unknown there, the manager registers again with the same key."""
    caplog.set_level(logging.INFO, logger="zfast.routing.certs")
    with Topology(prefix="zfacme") as topo:
        ns = topo.add_ns("restart")
        responder = Responder(ns)
        store = SqliteStore(tmp_path / "s.sqlite", "node-a")
        try:
            accounts = []
            for i in range(2):
                with Pebble(tmp_path / f"pebble{i}", addr="127.0.0.1", netns=ns) as pebble:
                    m = CertManager(store, PROJECT, acme_cfg(pebble), netns=ns)
                    responder.thumbprint = m.account_thumbprint()
                    m.ensure([(HOST, "acme")])
                    c = m.renew(HOST)
                    assert c.source == "acme"
                    verify_chain(c.cert_pem, pebble.root_pem(intermediates=False), tmp_path)
                    doc = json.loads(store.fetch(f"routing/{PROJECT}/acme/account"))
                    accounts.append((responder.thumbprint, doc["uri"]))
            assert accounts[0][0] == accounts[1][0], "the account key must survive"
            assert "registering again" in caplog.text
            assert accounts[1][1].startswith("https://127.0.0.1:14000/")
        finally:
            responder.close()
            store.close()
