"""The routing service's certificates: self-signed at once, ACME (HTTP-01) when asked, renewal.

One CertManager per project, in the core service process. Everything lives in the project's
store, so every router and every restart sees the same certificates and the same ACME account:

    routing/<project>/certs/<host>   JSON of a Cert (leaf + chain, key, source, dates)
    routing/<project>/acme/account   JSON {key_pem, uri, directory}: the ACME account

``ensure(domains)`` gives every host with TLS a certificate at once (self-signed when none is
stored) and never touches the network. ``tick()``, called every second or so, replaces the
self-signed certificates of ``tls: acme`` hosts through ACME and renews what is due; a failure
is an "error" event and an exponential back-off for that host (5 s doubling to 1 h), the
certificate in use stays. ``renew(host)`` forces a renewal now.

HTTP-01 is answered statelessly: the HTTP balancers reply to
``GET /.well-known/acme-challenge/<token>`` with ``<token>.<account_thumbprint()>`` themselves,
so nothing here serves challenges; CertManager only tells the ACME server to validate and waits.
Wildcard hosts cannot be validated over HTTP-01: they keep a self-signed certificate.

Renewal time: with ``L`` the lifetime, ``renew_at = not_after - max(30 days, L / 3)``, but never
before half the lifetime has passed (so a short-lived certificate is not renewed again as soon
as it is issued). A 90-day certificate renews at 60 days; pebble's 5-year ones after 3 years
and 4 months, so tests force renewal with ``renew()``.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zfast.lab.netns import in_ns

# acme, josepy and the requests they bring (~100 ms, ~12 MiB) are imported by the code
# that talks to an ACME server (PLC0415 marks it), not here: a router process imports this
# module for Cert, and a core service without `tls: acme` hosts never issues.

log = logging.getLogger("zfast.routing.certs")

TLS_MODES = ("acme", "self-signed", "none")
SOURCES = ("acme", "self-signed")
SELF_SIGNED_ISSUER = "zfast self-signed"
SELF_SIGNED_DAYS = 90
DAY = 86400.0
RENEW_LEAD_S = 30 * DAY
BACKOFF_START_S = 5.0
BACKOFF_CAP_S = 3600.0
CONNECT_TIMEOUT_S = 5.0          # an ACME server that does not answer fails this fast
READ_TIMEOUT_S = 30.0
ISSUE_DEADLINE_S = 90.0          # validation + finalization of one order
USER_AGENT = "zfast-certs"


class CertError(Exception):
    """A certificate could not be had; the message says for which host and why."""


def rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def renew_time(not_before: float, not_after: float) -> float:
    """When to renew: a third of the lifetime or 30 days before expiry, whichever is earlier,
    but not before half the lifetime has passed."""
    life = max(0.0, not_after - not_before)
    return max(not_after - max(RENEW_LEAD_S, life / 3), not_before + life / 2)


def _epoch(dt: datetime.datetime) -> float:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


def _check_host(host: str) -> str:
    if not isinstance(host, str) or not host or "/" in host or any(c.isspace() for c in host):
        raise ValueError(f"certs: {host!r} is not a host name")
    return host


@dataclass
class Cert:
    host: str                 # "app.example.org" or "*.app.example.org"
    cert_pem: str = field(repr=False)      # leaf + chain, PEM
    key_pem: str = field(repr=False)       # never in a repr (logs)
    source: str               # "acme" | "self-signed"
    issuer: str               # the issuer's CN (its RFC 4514 name if it has none)
    serial: str               # hex
    not_after: float          # epoch seconds
    renew_at: float           # epoch seconds
    not_before: float = 0.0
    directory: str | None = None     # the ACME directory that issued it (acme only)
    tls: str | None = None           # what the host asked for when stored: "acme"|"self-signed"
    # not stored: the manager's view of this host's last failure (None when fine)
    last_error: str | None = field(default=None, compare=False)
    next_try: float | None = field(default=None, compare=False)

    _STORED = ("host", "cert_pem", "key_pem", "source", "issuer", "serial", "not_after",
               "renew_at", "not_before", "directory", "tls")

    def bundle(self) -> str:
        """What HAProxy loads (crt): the certificate chain, then the key."""
        return self.cert_pem.rstrip("\n") + "\n" + self.key_pem.rstrip("\n") + "\n"

    def public(self) -> dict:
        """The fields of ``zfast certs --json`` (no key)."""
        return {"host": self.host, "issuer": self.issuer, "serial": self.serial,
                "not_before": rfc3339(self.not_before), "not_after": rfc3339(self.not_after),
                "source": self.source, "renew_at": rfc3339(self.renew_at),
                "last_error": self.last_error,
                "next_try": rfc3339(self.next_try) if self.next_try else None}

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({k: d[k] for k in self._STORED}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Cert":
        d = json.loads(text)
        return cls(**{k: d[k] for k in cls._STORED if k in d})

    @classmethod
    def from_pem(cls, host: str, cert_pem: str, key_pem: str, source: str,
                 issuer: str | None = None, directory: str | None = None) -> "Cert":
        """A Cert from PEM text (the first certificate is the leaf); dates from the leaf."""
        leaf = x509.load_pem_x509_certificate(cert_pem.encode())
        if issuer is None:
            cns = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
            issuer = str(cns[0].value) if cns else leaf.issuer.rfc4514_string()
        nb, na = _epoch(leaf.not_valid_before), _epoch(leaf.not_valid_after)
        return cls(host=host, cert_pem=cert_pem, key_pem=key_pem, source=source, issuer=issuer,
                   serial=format(leaf.serial_number, "x"), not_after=na,
                   renew_at=renew_time(nb, na), not_before=nb, directory=directory)


def _key_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def self_signed(host: str, now: float | None = None, days: int = SELF_SIGNED_DAYS) -> Cert:
    """A self-signed certificate (ECDSA P-256) for ``host`` (a wildcard is fine)."""
    _check_host(host)
    now = time.time() if now is None else now
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, SELF_SIGNED_ISSUER)]
    if len(host) <= 64:   # the CN's upper bound; the SAN is what clients check anyway
        attrs.insert(0, x509.NameAttribute(NameOID.COMMON_NAME, host))
    name = x509.Name(attrs)
    start = datetime.datetime.fromtimestamp(int(now) - 60, datetime.timezone.utc)
    end = start + datetime.timedelta(days=days, seconds=60)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Cert.from_pem(host, cert.public_bytes(serialization.Encoding.PEM).decode(),
                         _key_pem(key), "self-signed", issuer=SELF_SIGNED_ISSUER)


def _reason(e: BaseException) -> str:
    """A short readable reason for a network or ACME failure."""
    try:
        import requests  # noqa: PLC0415 -- ACME only
        from acme import errors, messages  # noqa: PLC0415 -- ACME only
    except ImportError:  # pragma: no cover - python3-acme is a dependency
        return str(e) or type(e).__name__
    if isinstance(e, messages.Error):
        return f"{e.code or e.typ}: {e.detail}" if e.detail else str(e)
    if isinstance(e, errors.ValidationError):
        out = []
        for authzr in e.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    out.append(f"{authzr.body.identifier.value}: {_reason(ch.error)}")
        return "validation failed: " + ("; ".join(out) or "no detail from the server")
    if isinstance(e, errors.TimeoutError):
        return f"no result in {ISSUE_DEADLINE_S:.0f} s (authorization or finalization pending)"
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return f"no answer in {CONNECT_TIMEOUT_S:.0f} s (connect timeout)"
    if isinstance(e, requests.exceptions.ReadTimeout):
        return f"no answer in {READ_TIMEOUT_S:.0f} s (read timeout)"
    if e.args and isinstance(e.args[0], requests.Response):   # acme's ClientError(response)
        r = e.args[0]
        return f"HTTP {r.status_code} {r.reason or ''}".strip() + f" from {r.url}"
    text = str(e)
    if isinstance(e, requests.exceptions.SSLError):
        m = (re.search(r"certificate verify failed[^'\")(]*", text)
             or re.search(r"\[SSL[^\]]*\][^'\")(]*", text))
        return "TLS: " + (m.group(0).strip() if m else text)
    if isinstance(e, requests.exceptions.ConnectionError):
        m = re.search(r"\[Errno -?\d+\] ([^'\")]*)", text)
        return m.group(1).strip() if m else text
    # acme's ClientNetwork turns connection errors into "Requesting HOST/PATH: reason"
    m = re.match(r"Requesting \S+?:\s*(.*)", text)
    if isinstance(e, ValueError) and m:
        return m.group(1).strip() or text
    return text or type(e).__name__


@dataclass
class _Failure:
    failures: int
    next_try: float
    error: str


class CertManager:
    """A project's certificates. Thread-safe; ACME work is serialized by one lock."""

    def __init__(self, store, project: str, acme: dict | None,
                 log_event: Callable[..., None] = lambda kind, **f: None,
                 clock: Callable[[], float] = time.time, netns: str | None = None):
        """acme: None or {"directory": url, "email": str|None, "ca_bundle": path|None};
        log_event(kind, **fields): "cert" events (issued, renewed, self-signed, fallback) and
        "error" events; netns: the network namespace to run ACME requests in (None: the
        calling thread's)."""
        if acme is not None:
            if not isinstance(acme, dict) or not isinstance(acme.get("directory"), str) \
                    or not acme["directory"]:
                raise ValueError(f"certs: acme must be None or a dict with a directory URL, "
                                 f"got {acme!r}")
        self.store = store
        self.project = project
        self.acme = dict(acme) if acme else None
        self.log_event = log_event
        self.clock = clock
        self.netns = netns
        self._prefix = f"routing/{project}/certs/"
        self._account_key_name = f"routing/{project}/acme/account"
        self._lock = threading.RLock()        # in-memory state; never held over the network
        self._acme_lock = threading.Lock()    # one ACME conversation at a time
        self._tls: dict[str, str] = {}        # host -> "acme" | "self-signed", from ensure()
        self._failures: dict[str, _Failure] = {}
        self._jwk = None                      # the account key (josepy JWK), once loaded

    # ------------------------------------------------------------------ stored certificates

    def _key(self, host: str) -> str:
        return self._prefix + host

    def _load(self, host: str) -> Cert | None:
        text = self.store.fetch(self._key(host))
        if text is None:
            return None
        try:
            return Cert.from_json(text)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("certs: stored certificate of %s is unreadable (%s): replacing it",
                        host, e)
            return None

    def _save(self, cert: Cert) -> None:
        self.store.put(self._key(cert.host), cert.to_json())

    def _decorate(self, cert: Cert) -> Cert:
        with self._lock:
            f = self._failures.get(cert.host)
        if f is not None:
            cert.last_error = f.error
            cert.next_try = f.next_try if f.failures else None
        return cert

    def certs(self) -> list[Cert]:
        """Every stored certificate of the project, sorted by host."""
        out = []
        for key, text in self.store.items(self._prefix).items():
            try:
                out.append(self._decorate(Cert.from_json(text)))
            except (ValueError, KeyError, TypeError) as e:
                log.warning("certs: %s is unreadable: %s", key, e)
        return sorted(out, key=lambda c: c.host)

    def get(self, host: str) -> Cert | None:
        cert = self._load(host)
        return self._decorate(cert) if cert else None

    # -------------------------------------------------------------------- self-signed

    def _new_self_signed(self, host: str, action: str, tls: str) -> Cert:
        cert = self_signed(host, now=self.clock())
        cert.tls = tls
        self._save(cert)
        self.log_event("cert", host=host, action=action, source=cert.source,
                       issuer=cert.issuer, serial=cert.serial, not_after=rfc3339(cert.not_after))
        return cert

    def ensure(self, domains: Iterable[tuple[str, str]]) -> list[Cert]:
        """Make sure every host with TLS has a certificate now (self-signed if none is stored).

        ``domains``: (host, tls) with tls "acme", "self-signed" or "none". Never touches the
        network; ACME issuance happens in tick(). Returns the certificates that changed."""
        wanted: dict[str, str] = {}
        for host, tls in domains:
            _check_host(host)
            if tls not in TLS_MODES:
                raise ValueError(f"certs: {host}: tls {tls!r} is not one of {', '.join(TLS_MODES)}")
            if tls != "none":
                wanted[host] = tls
        changed = []
        with self._lock:
            self._tls = wanted
            for host in list(self._failures):
                if wanted.get(host) != "acme":
                    del self._failures[host]
            stored = {c.host: c for c in self.certs()}
            now = self.clock()
            for host, tls in sorted(wanted.items()):
                cur = stored.get(host)
                if cur is None:
                    action = "fallback" if tls == "acme" else "self-signed"
                elif tls == "self-signed" and cur.source != "self-signed":
                    action = "self-signed"
                elif cur.source == "self-signed" and now >= cur.renew_at:
                    action = "renewed"
                else:
                    if cur.tls != tls:   # remember what the host asks for (for renew())
                        cur.tls = tls
                        self._save(cur)
                    continue
                changed.append(self._new_self_signed(host, action, tls))
        return changed

    # --------------------------------------------------------------------- ACME account

    def _load_account(self) -> dict | None:
        text = self.store.fetch(self._account_key_name)
        if text is None:
            return None
        try:
            doc = json.loads(text)
            return doc if isinstance(doc, dict) and doc.get("key_pem") else None
        except ValueError:
            return None

    def _account_jwk(self):
        """The account key (created once, kept in the store)."""
        import josepy as jose  # noqa: PLC0415 -- ACME only
        with self._lock:
            if self._jwk is not None:
                return self._jwk
            doc = self._load_account()
            if doc is None:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                self.store.put(self._account_key_name, json.dumps(
                    {"key_pem": _key_pem(key), "uri": None, "directory": None}))
                doc = self._load_account()   # whoever wrote last wins: use what is stored
            key = serialization.load_pem_private_key(doc["key_pem"].encode(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise CertError(f"{self._account_key_name}: the account key is not an RSA key")
            self._jwk = jose.JWKRSA(key=key)
            return self._jwk

    def account_thumbprint(self) -> str | None:
        """The ACME account key's JWK thumbprint (RFC 7638, base64url): the second half of
        every HTTP-01 answer. None when ACME is not configured."""
        if self.acme is None:
            return None
        import josepy as jose  # noqa: PLC0415 -- ACME only
        return jose.b64encode(self._account_jwk().thumbprint()).decode()

    def _register(self, client, url: str) -> None:
        from acme import errors, messages  # noqa: PLC0415 -- ACME only
        reg = messages.NewRegistration.from_data(email=self.acme.get("email") or None,
                                                 terms_of_service_agreed=True)
        try:
            uri = client.new_account(reg).uri
        except errors.ConflictError as e:  # the key has an account there already
            uri = e.location
            client.net.account = messages.RegistrationResource(uri=uri,
                                                               body=messages.Registration())
        doc = self._load_account() or {}
        doc.update(uri=uri, directory=url)
        self.store.put(self._account_key_name, json.dumps(doc))
        log.info("certs: ACME account %s at %s", uri, url)

    def _connect(self):
        """A ClientV2 with the project's account registered at the configured directory."""
        from acme import client as acme_client  # noqa: PLC0415 -- ACME only
        from acme import messages  # noqa: PLC0415 -- ACME only
        url = self.acme["directory"]
        net = acme_client.ClientNetwork(
            self._account_jwk(), user_agent=USER_AGENT,
            verify_ssl=self.acme.get("ca_bundle") or True,
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        try:
            directory = acme_client.ClientV2.get_directory(url, net)
        except Exception as e:
            raise CertError(f"acme directory {url}: {_reason(e)}") from e
        client = acme_client.ClientV2(directory, net)
        doc = self._load_account() or {}
        if doc.get("uri") and doc.get("directory") == url:
            net.account = messages.RegistrationResource(uri=doc["uri"],
                                                        body=messages.Registration())
        else:
            self._register(client, url)
        return client

    def _order(self, client, csr_pem: bytes):
        """new_order, re-registering once if the server forgot the account (a new pebble)."""
        from acme import messages  # noqa: PLC0415 -- ACME only
        try:
            return client.new_order(csr_pem)
        except messages.Error as e:
            if e.code not in ("accountDoesNotExist", "unauthorized"):
                raise
            log.info("certs: ACME account unknown to %s (%s): registering again",
                     self.acme["directory"], e)
            client.net.account = None
            self._register(client, self.acme["directory"])
            return client.new_order(csr_pem)

    def _issue_acme(self, host: str) -> Cert:
        """One ACME issuance for ``host`` (HTTP-01). Raises CertError."""
        if self.acme is None:
            raise CertError(f"{host}: tls acme, but routing.acme (a directory) is not configured")
        if host.startswith("*."):
            raise CertError(f"{host}: a wildcard host cannot be validated over HTTP-01 "
                            "(it needs DNS-01): it keeps a self-signed certificate")
        from acme import challenges, crypto_util, messages  # noqa: PLC0415 -- ACME only
        url = self.acme["directory"]
        with self._acme_lock, in_ns(self.netns):
            try:
                client = self._connect()
                key_pem = _key_pem(ec.generate_private_key(ec.SECP256R1()))
                order = self._order(client, crypto_util.make_csr(key_pem.encode(), [host]))
                for authzr in order.authorizations:
                    if authzr.body.status == messages.STATUS_VALID:
                        continue
                    challb = next((c for c in authzr.body.challenges
                                   if isinstance(c.chall, challenges.HTTP01)), None)
                    if challb is None:
                        raise CertError(f"acme {url}: {host}: the server offers no http-01 "
                                        "challenge")
                    client.answer_challenge(challb, challb.response(client.net.key))
                deadline = datetime.datetime.now() + datetime.timedelta(seconds=ISSUE_DEADLINE_S)
                order = client.poll_and_finalize(order, deadline)
            except CertError:
                raise
            except Exception as e:
                if not isinstance(e, (OSError, ValueError)) and type(e).__module__.split(".")[0] \
                        not in ("acme", "requests", "josepy", "urllib3"):
                    log.warning("certs: unexpected error issuing %s", host, exc_info=True)
                raise CertError(f"acme {url}: {host}: {_reason(e)}") from e
        try:
            return Cert.from_pem(host, order.fullchain_pem, key_pem, "acme", directory=url)
        except ValueError as e:
            raise CertError(f"acme {url}: {host}: unreadable certificate from the server: {e}") \
                from e

    def _issue_and_save(self, host: str, action: str, forced: bool) -> Cert | None:
        """Issue through ACME and store; None if (not forced) the host stopped being tls
        acme meanwhile."""
        t0 = time.monotonic()
        cert = self._issue_acme(host)
        cert.tls = "acme"
        with self._lock:
            if not forced and self._tls.get(host) != "acme":
                log.info("certs: %s is no longer tls acme: dropping its new certificate", host)
                return None
            self._save(cert)
            self._failures.pop(host, None)
        self.log_event("cert", host=host, action=action, source="acme", issuer=cert.issuer,
                       serial=cert.serial, not_after=rfc3339(cert.not_after),
                       seconds=round(time.monotonic() - t0, 2))
        return cert

    # ------------------------------------------------------------------------ periodic

    def _failed(self, host: str, err: str, backoff: bool) -> _Failure:
        now = self.clock()
        with self._lock:
            f = self._failures.get(host) or _Failure(0, 0.0, err)
            f.error = err
            if backoff:
                f.failures += 1
                delay = min(BACKOFF_CAP_S, BACKOFF_START_S * 2 ** (f.failures - 1))
                f.next_try = now + delay
            self._failures[host] = f
        fields = {"retry_in_s": round(f.next_try - now, 1)} if backoff else {"forced": True}
        log.warning("certs: %s: %s", host, err)
        self.log_event("error", component="certs", host=host, error=err, **fields)
        return f

    def tick(self) -> list[Cert]:
        """Issue through ACME what needs it (self-signed placeholders, certificates due for
        renewal or from another directory), renew due self-signed certificates. Blocks while
        it talks to the ACME server; never raises. Returns the certificates that changed."""
        changed: list[Cert] = []
        try:
            with self._lock:
                wanted = dict(self._tls)
            for host, tls in sorted(wanted.items()):
                try:
                    cert = self._tick_host(host, tls)
                except Exception:
                    log.exception("certs: tick for %s failed", host)
                    continue
                if cert is not None:
                    changed.append(cert)
        except Exception:
            log.exception("certs: tick failed")
        return changed

    def _tick_host(self, host: str, tls: str) -> Cert | None:
        now = self.clock()
        cur = self._load(host)
        if tls == "self-signed":
            if cur is None or cur.source != "self-signed" or now >= cur.renew_at:
                return self._new_self_signed(host, "renewed" if cur else "self-signed",
                                             "self-signed")
            return None
        directory = (self.acme or {}).get("directory")
        due = (cur is None or cur.source != "acme" or now >= cur.renew_at
               or (cur.directory is not None and cur.directory != directory))
        if not due:
            return None
        with self._lock:
            f = self._failures.get(host)
        if f is None or f.failures == 0 or now >= f.next_try:
            try:
                return self._issue_and_save(host, "issued" if cur is None or cur.source != "acme"
                                            else "renewed", forced=False)
            except CertError as e:
                self._failed(host, str(e), backoff=True)
        # ACME did not help (now or still backing off): keep a usable placeholder
        if cur is None or (cur.source == "self-signed" and now >= cur.renew_at):
            return self._new_self_signed(host, "fallback", "acme")
        return None

    # ---------------------------------------------------------------------------- forced

    def renew(self, host: str) -> Cert:
        """Renew ``host``'s certificate now: through ACME for a tls acme host (CertError on
        failure, the old certificate stays), a new self-signed one otherwise."""
        _check_host(host)
        with self._lock:
            tls = self._tls.get(host)
        cur = self._load(host)
        if tls is None:   # not given to ensure() here: what the stored certificate says
            if cur is None:
                raise CertError(f"{host}: no such host with TLS in project {self.project}")
            tls = cur.tls or ("acme" if cur.source == "acme" else "self-signed")
        if tls == "self-signed":
            return self._new_self_signed(host, "renewed", "self-signed")
        try:
            cert = self._issue_and_save(host, "renewed" if cur and cur.source == "acme"
                                        else "issued", forced=True)
            assert cert is not None
            return cert
        except CertError as e:
            self._failed(host, str(e), backoff=False)
            raise


__all__ = ["Cert", "CertError", "CertManager", "renew_time", "self_signed", "TLS_MODES"]
