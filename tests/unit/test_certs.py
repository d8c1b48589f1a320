"""zfast.routing.certs without an ACME server: self-signed certificates, the store, renewal
times, back-off against a directory that does not answer. (ACME itself: tests/e2e/test_acme.py.)"""

import hashlib
import json
import socket
import time
from datetime import datetime

import josepy as jose
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from zfast.routing.certs import (
    BACKOFF_CAP_S,
    DAY,
    Cert,
    CertError,
    CertManager,
    renew_time,
    self_signed,
)
from zfast.store.sqlite import SqliteStore

PROJECT = "demo"


class Clock:
    def __init__(self, t: float | None = None):
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


class Events(list):
    def __call__(self, kind, **fields):
        self.append({"kind": kind, **fields})

    def of(self, kind):
        return [e for e in self if e["kind"] == kind]


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(tmp_path / "s.sqlite", "node-a")
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]   # nothing listens there once closed


def leaf(cert: Cert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert.cert_pem.encode())


def sans(cert: Cert) -> list[str]:
    ext = leaf(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.value.get_values_for_type(x509.DNSName)


def parse_rfc3339(text: str) -> float:
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------- self-signed

@pytest.mark.parametrize("host", ["app.example.org", "*.app.example.org"])
def test_self_signed_certificate(host):
    now = time.time()
    c = self_signed(host, now=now)
    cert = leaf(c)
    assert sans(c) == [host]
    assert c.host == host and c.source == "self-signed" and c.issuer == "zfast self-signed"
    org = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert org == "zfast self-signed" and cert.issuer == cert.subject
    assert c.serial == format(cert.serial_number, "x")
    # the key is the certificate's key
    key = serialization.load_pem_private_key(c.key_pem.encode(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(serialization.Encoding.PEM, spki)
            == cert.public_key().public_bytes(serialization.Encoding.PEM, spki))
    # 90 days, renewed with 30 days left
    assert c.not_before <= now <= c.not_after
    assert abs(c.not_after - now - 90 * DAY) < 120
    assert abs(c.renew_at - (c.not_after - 30 * DAY)) < 60
    # HAProxy's crt file: the chain, then the key
    b = c.bundle()
    assert b.index("BEGIN CERTIFICATE") < b.index("BEGIN PRIVATE KEY")
    assert b.startswith(c.cert_pem.rstrip("\n")) and b.endswith(c.key_pem.rstrip("\n") + "\n")
    assert "PRIVATE KEY" not in repr(c), "a Cert's repr must not leak its key"


def test_self_signed_serials_differ():
    assert self_signed("a.example.org").serial != self_signed("a.example.org").serial


def test_renew_time():
    t0 = 1_700_000_000.0
    # 90 days: 30 days before expiry (= a third left)
    assert renew_time(t0, t0 + 90 * DAY) == t0 + 60 * DAY
    # 5 years (pebble): a third of the lifetime before expiry
    five_y = 5 * 365 * DAY
    assert renew_time(t0, t0 + five_y) == pytest.approx(t0 + five_y * 2 / 3)
    # 60 days: 30 days before expiry is half the lifetime
    assert renew_time(t0, t0 + 60 * DAY) == t0 + 30 * DAY
    # short-lived (7 days): not before half the lifetime, never before not_before
    assert renew_time(t0, t0 + 7 * DAY) == t0 + 3.5 * DAY
    assert renew_time(t0, t0) == t0


def test_cert_json_round_trip_and_public():
    c = self_signed("app.example.org")
    assert Cert.from_json(c.to_json()) == c
    stored = json.loads(c.to_json())
    assert "last_error" not in stored and stored["key_pem"] == c.key_pem
    p = c.public()
    assert {"host", "issuer", "serial", "not_after", "source", "renew_at"} <= set(p)
    assert "key_pem" not in p and "cert_pem" not in p
    assert p["host"] == "app.example.org" and p["source"] == "self-signed"
    assert p["issuer"] == "zfast self-signed" and p["serial"] == c.serial
    assert parse_rfc3339(p["not_after"]) == pytest.approx(c.not_after, abs=1)
    assert parse_rfc3339(p["renew_at"]) == pytest.approx(c.renew_at, abs=1)
    assert p["last_error"] is None and p["next_try"] is None
    json.dumps(p)


# ---------------------------------------------------------------------------- ensure

DOMAINS = [("app.example.org", "acme"), ("*.app.example.org", "self-signed"),
           ("plain.example.org", "none"), ("static.example.org", "self-signed")]


def test_ensure_gives_every_tls_host_a_certificate_at_once(store, tmp_path):
    ev = Events()
    m = CertManager(store, PROJECT, {"directory": f"https://127.0.0.1:{closed_port()}/dir"},
                    log_event=ev)
    t = time.monotonic()
    changed = m.ensure(DOMAINS)
    assert time.monotonic() - t < 2, "ensure() must not wait for anything"
    hosts = ["*.app.example.org", "app.example.org", "static.example.org"]
    assert sorted(c.host for c in changed) == hosts
    assert [c.host for c in m.certs()] == hosts                 # sorted, tls none has none
    assert m.get("plain.example.org") is None
    for c in m.certs():
        assert c.source == "self-signed" and sans(c) == [c.host]
        assert json.loads(store.fetch(f"routing/{PROJECT}/certs/{c.host}"))["serial"] == c.serial
    assert {e["host"]: e["action"] for e in ev.of("cert")} == {
        "app.example.org": "fallback", "*.app.example.org": "self-signed",
        "static.example.org": "self-signed"}

    # idempotent: nothing changes the second time
    serials = {c.host: c.serial for c in m.certs()}
    assert m.ensure(DOMAINS) == []
    assert {c.host: c.serial for c in m.certs()} == serials

    # shared through the store: another manager (another connection to the file) sees them
    other_store = SqliteStore(tmp_path / "s.sqlite", "node-b")
    try:
        m2 = CertManager(other_store, PROJECT, None)
        assert m2.ensure(DOMAINS) == []
        assert {c.host: c.serial for c in m2.certs()} == serials
        assert m2.get("app.example.org").cert_pem == m.get("app.example.org").cert_pem
        # another project shares nothing
        assert CertManager(other_store, "other", None).certs() == []
    finally:
        other_store.close()


def test_ensure_replaces_acme_cert_when_host_becomes_self_signed(store):
    m = CertManager(store, PROJECT, None)
    fake = self_signed("app.example.org")
    fake.source = "acme"
    store.put(f"routing/{PROJECT}/certs/app.example.org", fake.to_json())
    (c,) = m.ensure([("app.example.org", "self-signed")])
    assert c.source == "self-signed" and c.serial != fake.serial


def test_ensure_rejects_bad_input(store):
    m = CertManager(store, PROJECT, None)
    with pytest.raises(ValueError, match="tls 'letsencrypt'"):
        m.ensure([("app.example.org", "letsencrypt")])
    with pytest.raises(ValueError, match="not a host name"):
        m.ensure([("a/b", "self-signed")])
    with pytest.raises(ValueError, match="directory"):
        CertManager(store, PROJECT, {"email": "x@example.org"})


def test_renew_self_signed_changes_serial(store):
    ev = Events()
    m = CertManager(store, PROJECT, None, log_event=ev)
    m.ensure([("static.example.org", "self-signed")])
    old = m.get("static.example.org")
    new = m.renew("static.example.org")
    assert new.serial != old.serial and new.source == "self-signed"
    assert m.get("static.example.org").serial == new.serial
    assert ev.of("cert")[-1]["action"] == "renewed"
    with pytest.raises(CertError, match="nowhere.example.org"):
        m.renew("nowhere.example.org")


def test_tick_renews_due_self_signed_only(store):
    clock = Clock()
    m = CertManager(store, PROJECT, None, clock=clock)
    m.ensure([("static.example.org", "self-signed")])
    serial = m.get("static.example.org").serial
    assert m.tick() == []
    clock.t += 59 * DAY
    assert m.tick() == []
    clock.t += 2 * DAY                      # past renew_at (30 days before expiry)
    (c,) = m.tick()
    assert c.serial != serial and c.not_after > clock.t + 89 * DAY
    assert m.tick() == []


# ------------------------------------------------------------------------ ACME account

def test_account_thumbprint(store, tmp_path):
    assert CertManager(store, PROJECT, None).account_thumbprint() is None
    acme = {"directory": "https://127.0.0.1:1/dir"}
    tp = CertManager(store, PROJECT, acme).account_thumbprint()
    assert tp == CertManager(store, PROJECT, acme).account_thumbprint()
    other_store = SqliteStore(tmp_path / "s.sqlite", "node-b")
    try:
        assert CertManager(other_store, PROJECT, acme).account_thumbprint() == tp
    finally:
        other_store.close()
    # RFC 7638, computed here from the stored key
    doc = json.loads(store.fetch(f"routing/{PROJECT}/acme/account"))
    assert set(doc) == {"key_pem", "uri", "directory"} and doc["uri"] is None
    key = serialization.load_pem_private_key(doc["key_pem"].encode(), password=None)
    nums = key.public_key().public_numbers()
    def b64(i):
        return jose.b64encode(i.to_bytes((i.bit_length() + 7) // 8, "big")).decode()
    canon = json.dumps({"e": b64(nums.e), "kty": "RSA", "n": b64(nums.n)},
                       separators=(",", ":"), sort_keys=True)
    assert tp == jose.b64encode(hashlib.sha256(canon.encode()).digest()).decode()
    assert "=" not in tp and len(tp) == 43


# --------------------------------------------------------------------- failures, back-off

def test_unreachable_directory_backs_off_and_keeps_the_cert(store):
    clock, ev = Clock(), Events()
    url = f"https://127.0.0.1:{closed_port()}/dir"
    m = CertManager(store, PROJECT, {"directory": url}, log_event=ev, clock=clock)
    m.ensure([("app.example.org", "acme")])
    serial = m.get("app.example.org").serial
    t0 = clock.t

    t = time.monotonic()
    assert m.tick() == []
    assert time.monotonic() - t < 6, "a refused connection must fail fast"
    (err,) = ev.of("error")
    assert err["host"] == "app.example.org" and url in err["error"]
    assert err["error"].startswith(f"acme directory {url}: ") and err["retry_in_s"] == 5
    c = m.get("app.example.org")
    assert c.serial == serial and c.source == "self-signed"
    assert c.last_error == err["error"] and c.next_try == t0 + 5
    assert c.public()["last_error"] == err["error"]
    assert parse_rfc3339(c.public()["next_try"]) == pytest.approx(t0 + 5, abs=1)

    # no retry before the back-off ends, then 10 s, then 20 s, ...
    for dt, errors, retry in [(1, 1, 5), (4.9, 1, 5), (5, 2, 10), (14.9, 2, 10), (15, 3, 20),
                              (34.9, 3, 20), (35, 4, 40)]:
        clock.t = t0 + dt
        assert m.tick() == []
        assert len(ev.of("error")) == errors, (dt, ev.of("error"))
        assert ev.of("error")[-1]["retry_in_s"] == retry
    assert m.get("app.example.org").serial == serial

    # capped at an hour
    for _ in range(20):
        clock.t = m.get("app.example.org").next_try
        m.tick()
    assert ev.of("error")[-1]["retry_in_s"] == BACKOFF_CAP_S

    # forced: a clear error, the certificate stays
    with pytest.raises(CertError, match=rf"acme directory {url}: "):
        m.renew("app.example.org")
    assert m.get("app.example.org").serial == serial
    assert [e["action"] for e in ev.of("cert")] == ["fallback"]


def test_renew_without_ensure_follows_the_stored_tls(store):
    """A manager that was not given the domains (e.g. another process) renews an acme host's
    self-signed placeholder through ACME, not with another self-signed certificate."""
    url = f"https://127.0.0.1:{closed_port()}/dir"
    CertManager(store, PROJECT, {"directory": url}).ensure(
        [("app.example.org", "acme"), ("static.example.org", "self-signed")])
    placeholder = CertManager(store, PROJECT, None).get("app.example.org")
    assert placeholder.tls == "acme" and placeholder.source == "self-signed"
    fresh = CertManager(store, PROJECT, {"directory": url})
    with pytest.raises(CertError, match=rf"acme directory {url}: .*refused"):
        fresh.renew("app.example.org")
    assert fresh.get("app.example.org").serial == placeholder.serial
    assert fresh.get("app.example.org").last_error
    assert fresh.renew("static.example.org").source == "self-signed"
    # the host switched to self-signed: remembered without a new certificate
    m = CertManager(store, PROJECT, None)
    assert m.ensure([("app.example.org", "self-signed")]) == []
    assert CertManager(store, PROJECT, None).renew("app.example.org").tls == "self-signed"


def test_wildcard_acme_keeps_self_signed(store):
    ev = Events()
    m = CertManager(store, PROJECT, {"directory": f"https://127.0.0.1:{closed_port()}/dir"},
                    log_event=ev)
    (c,) = m.ensure([("*.app.example.org", "acme")])
    assert m.tick() == []
    (err,) = ev.of("error")
    assert "wildcard" in err["error"] and "HTTP-01" in err["error"]
    assert m.get("*.app.example.org").serial == c.serial
    with pytest.raises(CertError, match="wildcard"):
        m.renew("*.app.example.org")


def test_acme_host_without_acme_config(store):
    ev = Events()
    m = CertManager(store, PROJECT, None, log_event=ev)
    (c,) = m.ensure([("app.example.org", "acme")])
    assert m.tick() == []
    assert "not configured" in ev.of("error")[0]["error"]
    assert m.get("app.example.org").serial == c.serial


def test_removed_host_forgets_its_failures(store):
    clock = Clock()
    m = CertManager(store, PROJECT, {"directory": f"https://127.0.0.1:{closed_port()}/dir"},
                    clock=clock)
    m.ensure([("app.example.org", "acme")])
    m.tick()
    assert m.get("app.example.org").last_error
    m.ensure([("app.example.org", "self-signed")])
    c = m.get("app.example.org")
    assert c.last_error is None and c.next_try is None
