"""The router daemon of one routing-service instance: the project's domains and certificates
in the store -> one HAProxy.

    python -m zfast.routing.router -c FILE      (inside the instance's network namespace)

FILE is a project file plus this instance's own section, which is taken out before the rest
is checked as a project file (``zfast.config.parse``)::

    router:
      name: demo-rt-a                 # required: the node name of events, the store and /status
      state_dir: /run/zfast/core/rt-a # default /run/zfast/<name>: api.sock, events.jsonl,
                                      #   haproxy/ (HAProxy's files)
      binds: ["0.0.0.0", "::"]        # default; the addresses HAProxy listens on
      http_port: 80                   # default 80
      https_port: 443                 # default 443
      revision: 7                     # optional: the store revision FILE is (see below)
    store: {kind: sqlite, path: /run/zfast/core/store.sqlite}   # the project's store

What it does:

* routes and upstreams from ``routing.domains``: one upstream a (service, tcp port map), named
  ``<service>_<port>``, its servers the service's backends at the map's ``target_port``
  (backends of weight 0 left out: drained), health checks from the service's ``health``; one
  route a domain (exact or wildcard, ``redirect_https``);
* certificates: for every domain with ``tls`` other than ``none``, the one stored by the core's
  CertManager under ``routing/<project>/certs/<host>`` (a host with none stored yet is left out:
  HAProxy's default certificate answers meanwhile); the ACME HTTP-01 thumbprint from the stored
  account key ``routing/<project>/acme/account`` (RFC 7638; none while there is no account).
  The router only reads them; it never makes a certificate or an account.
* follows the store: each new revision of the project (the project file with this router's
  own ``router`` and ``store`` sections kept), and the certificate documents and the account
  polled every 0.5 s. Any difference goes to ``HAProxy.update`` (maps and certificates at
  runtime, a hitless reload when the upstreams change) and is a "routing" event saying what
  changed and whether HAProxy reloaded. A revision that cannot be parsed or applied is an
  "error" event; the previous state keeps serving (the update is all or nothing).
  At start the watch is from the revision before the latest (``router.revision`` if given), so
  the router converges to the store's latest revision even when FILE is older.
* HAProxy gone: an "error" event, and the daemon exits with status 1 (the core replaces it).
* SIGTERM, SIGINT (and SIGUSR1, which stops a balancer keeping its data plane: a router has no
  state to keep): HAProxy stopped, the store closed, exit 0.

Ready when ``GET /status`` answers on ``<state_dir>/api.sock``: the API starts after HAProxy
listens. Exit status: 0 stopped by a signal, 1 HAProxy died, 2 could not start (bad file,
store or HAProxy; the reason on stderr and, once the state dir is known, an "error" event).

API (zfast.api on ``<state_dir>/api.sock``):
    GET /status  {"node", "kind": "router", "role": "active", "pid", "project", "revision",
                  "started", "domains": [host...], "certs": [{"host", "serial", "source",
                  "not_after"}], "haproxy": {"alive", "pid", "reloads", "workers"},
                  "interfaces": [{"name", "up", "addresses"}], "last_error", "events"}
    GET /stats   {"node", "time", "frontends": {name: counters},
                  "upstreams": {name: {"service", "port", "status", counters...,
                                       "servers": {"ip:port": {"status", counters...}}}}}
    (counters: requests, sessions, current_sessions, bytes_in, bytes_out, responses_5xx)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from zfast import config
from zfast.api import Server
from zfast.controllers.logger import LoggerController
from zfast.routing.certs import Cert
from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.instance import HAProxy
from zfast.routing.haproxy.model import Route, Upstream
from zfast.routing.haproxy.pem import normalize_pem
from zfast.store import open_store

log = logging.getLogger("zfast.routing.router")

ROUTER_KEYS = ("name", "state_dir", "binds", "http_port", "https_port", "revision")
DEFAULT_BINDS = ("0.0.0.0", "::")
CERT_POLL_S = 0.5        # certificate documents and the ACME account: read this often
TICK_S = 0.2             # the main loop: HAProxy alive? a revision waiting?
EXIT_STOPPED, EXIT_HAPROXY_DIED, EXIT_START_FAILED = 0, 1, 2
# HAProxy's own limits for health checks (zfast.routing.haproxy.model); the project file allows more.
CHECK_INTERVAL_MS = (50, 3_600_000)
CHECK_COUNT_MAX = 100
_NAME_RE = re.compile(config.NAME_PATTERN + r"\Z")
_UPSTREAM_MAX = 63


class RouterError(Exception):
    """A router file or state that cannot be used; the message says why."""


# ----------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class RouterSpec:
    """The ``router:`` section."""
    name: str
    state_dir: Path
    binds: tuple[str, ...] = DEFAULT_BINDS
    http_port: int = 80
    https_port: int = 443
    revision: int | None = None

    @property
    def workdir(self) -> Path:
        return self.state_dir / "haproxy"


def _port(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise RouterError(f"router.{what}: {value!r} is not a port (1-65535)")
    return value


def parse_router(raw: Any) -> RouterSpec:
    """Check the ``router:`` section; RouterError says what is wrong."""
    if not isinstance(raw, dict):
        raise RouterError(f"router: {raw!r} is not a mapping (name, state_dir, binds, "
                          "http_port, https_port)")
    unknown = sorted(set(raw) - set(ROUTER_KEYS))
    if unknown:
        raise RouterError(f"router.{unknown[0]}: unknown key (known: {', '.join(ROUTER_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RouterError(f"router.name: {name!r} is not a name (letters, digits, '_', '.', "
                          "'-'; at most 63)")
    state_dir = raw.get("state_dir", f"/run/zfast/{name}")
    if not isinstance(state_dir, str) or not state_dir:
        raise RouterError(f"router.state_dir: {state_dir!r} is not a path")
    binds = raw.get("binds", list(DEFAULT_BINDS))
    if not isinstance(binds, list) or not binds:
        raise RouterError(f"router.binds: {binds!r} is not a list of addresses")
    for b in binds:
        try:
            ipaddress.ip_address(b)
        except (TypeError, ValueError):
            raise RouterError(f"router.binds: {b!r} is not an IP address") from None
    if len(set(binds)) != len(binds):
        raise RouterError(f"router.binds: {binds!r} names an address twice")
    http_port = _port(raw.get("http_port", 80), "http_port")
    https_port = _port(raw.get("https_port", 443), "https_port")
    if http_port == https_port:
        raise RouterError(f"router.https_port: {https_port} is http_port too")
    revision = raw.get("revision")
    if revision is not None and (not isinstance(revision, int) or isinstance(revision, bool)
                                 or revision < 0):
        raise RouterError(f"router.revision: {revision!r} is not a revision number")
    return RouterSpec(name=name, state_dir=Path(state_dir).absolute(), binds=tuple(binds),
                      http_port=http_port, https_port=https_port, revision=revision)


def _yaml(text: str, source: str) -> dict:
    loader = getattr(config, "_StrictLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        why = " ".join(str(err).split())
        raise config.ConfigError([f"not YAML: {why}"], source) from None
    if not isinstance(data, dict):
        raise config.ConfigError(["not a mapping of sections"], source)
    return data


def load_file(path: str | Path) -> tuple[RouterSpec, config.Project]:
    """FILE -> (its router section, the project without it). RouterError / ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RouterError(f"{source}: cannot read: {err}") from None
    data = _yaml(text, source)
    if "router" not in data:
        raise RouterError(f"{source}: no router section (name, state_dir, binds, ...)")
    spec = parse_router(data.pop("router"))
    return spec, config.parse(data, source)


def project_of_revision(text: str, own: dict, source: str) -> config.Project:
    """A stored revision's project file with this router's own sections (``own``: the
    ``store`` section, or nothing) in place of the file's. ConfigError if it is no good."""
    data = _yaml(text, source)
    data.pop("router", None)
    data.pop("store", None)
    data.update(own)
    return config.parse(data, source)


# ------------------------------------------------------------------------------- the plan

def upstream_name(service: str, port: int) -> str:
    """``<service>_<port>``; a long service name is cut and marked with a hash (63 at most)."""
    name = f"{service}_{port}"
    if len(name) <= _UPSTREAM_MAX:
        return name
    digest = hashlib.sha1(service.encode()).hexdigest()[:8]
    keep = _UPSTREAM_MAX - len(f".{digest}_{port}")
    return f"{service[:keep]}.{digest}_{port}"


def _health(h: config.Health | None) -> dict | None:
    if h is None:
        return None
    out = {"kind": h.kind,
           "interval_ms": min(max(h.interval_ms, CHECK_INTERVAL_MS[0]), CHECK_INTERVAL_MS[1]),
           "fall": min(h.fall, CHECK_COUNT_MAX), "rise": min(h.rise, CHECK_COUNT_MAX)}
    if h.kind == "http":
        out["path"] = h.path or "/"
    return out


@dataclass(frozen=True)
class Plan:
    """What a project asks of a router, certificates aside."""
    routes: tuple[Route, ...]
    upstreams: tuple[Upstream, ...]
    tls_hosts: tuple[str, ...]                         # hosts with tls other than none
    targets: tuple[tuple[str, str, int], ...]          # (upstream, service, port)

    @property
    def hosts(self) -> list[str]:
        return [r.host for r in self.routes]


def make_plan(project: config.Project) -> Plan:
    """Routes and upstreams of a project's ``routing.domains``; LookupError for a domain
    whose service or port is not in the project."""
    domains = project.routing.domains if project.routing else ()
    upstreams: dict[str, Upstream] = {}
    targets: dict[str, tuple[str, str, int]] = {}
    routes, tls = [], []
    for d in domains:
        service, port_map = config.domain_target(project, d)
        name = upstream_name(service.name, port_map.port)
        if name not in upstreams:
            servers = tuple(dict.fromkeys(
                (str(b.address), port_map.target_port) for b in service.backends if b.weight > 0))
            upstreams[name] = Upstream(name, servers, _health(service.health))
            targets[name] = (name, service.name, port_map.port)
        routes.append(Route(d.host, name, d.redirect_https))
        if d.tls != "none":
            tls.append(d.host)
    return Plan(tuple(sorted(routes, key=lambda r: r.host)),
                tuple(sorted(upstreams.values(), key=lambda u: u.name)),
                tuple(sorted(tls)), tuple(sorted(targets.values())))


# ---------------------------------------------------------------- thumbprint (RFC 7638)

def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or max(1, (n.bit_length() + 7) // 8), "big")


def jwk_thumbprint(key_pem: str) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of a private key's public half (RSA or
    EC P-256/384/521): what ACME's HTTP-01 answers end with. ValueError for other keys."""
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        pub = key.public_key().public_numbers()
        jwk = {"e": _b64u(_int_bytes(pub.e)), "kty": "RSA", "n": _b64u(_int_bytes(pub.n))}
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}.get(key.curve.name)
        if crv is None:
            raise ValueError(f"EC curve {key.curve.name} has no JWK name")
        size = (key.curve.key_size + 7) // 8
        pub = key.public_key().public_numbers()
        jwk = {"crv": crv, "kty": "EC", "x": _b64u(_int_bytes(pub.x, size)),
               "y": _b64u(_int_bytes(pub.y, size))}
    else:
        raise ValueError(f"a {type(key).__name__} has no JWK thumbprint here (RSA or EC)")
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return _b64u(hashlib.sha256(canonical).digest())


# ------------------------------------------------------------------- stored certificates

@dataclass(frozen=True)
class StoredCert:
    host: str
    serial: str
    source: str
    not_after: float
    bundle: str          # normalized PEM (chain + key), what HAProxy loads


class CertReader:
    """Reads the project's certificate documents and ACME account from the store; parses
    each document once (by its text) and reports a bad one once."""

    def __init__(self, store, project: str, on_bad):
        self.store = store
        self.prefix = f"routing/{project}/certs/"
        self.account_key = f"routing/{project}/acme/account"
        self.on_bad = on_bad                     # on_bad(host_or_key, why)
        self._certs: dict[str, tuple[str, StoredCert | None]] = {}    # key -> (text, parsed)
        self._account: tuple[str | None, str | None] = (None, None)  # (key_pem, thumbprint)

    def read(self) -> tuple[dict[str, StoredCert], str | None]:
        """{host: StoredCert} of every readable stored certificate, and the thumbprint.
        Raises the store's errors."""
        docs = self.store.items(self.prefix)
        out = {}
        for key, text in docs.items():
            cached = self._certs.get(key)
            if cached is None or cached[0] != text:
                parsed = None
                try:
                    c = Cert.from_json(text)
                    parsed = StoredCert(c.host, c.serial, c.source, c.not_after,
                                        normalize_pem(c.bundle(), f"certificate {c.host}"))
                except (ValueError, KeyError, TypeError, HAProxyError) as e:
                    self.on_bad(key, f"{type(e).__name__}: {e}")
                cached = self._certs[key] = (text, parsed)
            if cached[1] is not None:
                out[cached[1].host] = cached[1]
        for key in set(self._certs) - set(docs):
            del self._certs[key]
        return out, self._thumbprint(self.store.fetch(self.account_key))

    def _thumbprint(self, text: str | None) -> str | None:
        key_pem = None
        if text is not None:
            try:
                doc = json.loads(text)
                key_pem = doc.get("key_pem") if isinstance(doc, dict) else None
            except ValueError:
                key_pem = None
        if key_pem != self._account[0]:
            thumb = None
            if key_pem:
                try:
                    thumb = jwk_thumbprint(key_pem)
                except (ValueError, TypeError) as e:
                    self.on_bad(self.account_key, f"{type(e).__name__}: {e}")
            self._account = (key_pem, thumb)
        return self._account[1]


# --------------------------------------------------------------------------- the daemon

@dataclass(frozen=True)
class Applied:
    """What HAProxy runs now."""
    project: config.Project
    revision: int | None
    plan: Plan
    certs: dict              # host -> StoredCert (hosts of the plan's tls_hosts only)
    thumbprint: str | None


class Router:
    def __init__(self, spec: RouterSpec, project: config.Project):
        self.spec = spec
        self.name = spec.name
        self.project_name = project.project
        self.initial = project
        raw_store = project.raw.get("store")
        self.own = {"store": raw_store} if raw_store is not None else {}
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        syslog = (project.raw.get("telemetry") or {}).get("syslog")
        self.events = LoggerController(spec.state_dir, spec.name, syslog=syslog)
        self.store = None
        self.certs: CertReader | None = None
        self.haproxy = HAProxy(spec.workdir, binds=list(spec.binds), http_port=spec.http_port,
                               https_port=spec.https_port)
        self.api = None
        self.applied: Applied | None = None
        self.started = time.time()
        self.reloads = 0                       # reloads this daemon asked for
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._pending = None                   # newest revision from the watch, not applied
        self._pending_lock = threading.Lock()
        self._lock = threading.RLock()         # self.applied and HAProxy changes
        self._store_failing = False
        self._watch = None

    # -- events

    def _error(self, **fields) -> None:
        self.last_error = str(fields.get("error"))
        log.error("%s", json.dumps(fields, default=str))
        self.events.log("error", component="router", **fields)

    def _bad_doc(self, key: str, why: str) -> None:
        self._error(error=f"{key}: unreadable, left out: {why}", key=key)

    # -- state

    def _wanted_certs(self, plan: Plan, stored: dict[str, StoredCert]) -> dict[str, StoredCert]:
        return {h: stored[h] for h in plan.tls_hosts if h in stored}

    def _push(self, plan: Plan, certs: dict[str, StoredCert], thumbprint: str | None,
              start: bool = False) -> dict:
        bundles = {h: c.bundle for h, c in certs.items()}
        if start:
            self.haproxy.start(plan.routes, plan.upstreams, bundles, thumbprint)
            return {}
        return self.haproxy.update(plan.routes, plan.upstreams, bundles, thumbprint)

    def start(self) -> None:
        """Open the store, start HAProxy with the file's project and the stored certificates,
        follow the store, serve the API. Raises on failure (the caller exits 2)."""
        self.store = open_store(self.own.get("store"), self.spec.state_dir, self.name)
        self.certs = CertReader(self.store, self.project_name, self._bad_doc)
        plan = make_plan(self.initial)
        stored, thumbprint = self.certs.read()
        certs = self._wanted_certs(plan, stored)
        latest = self.store.latest(self.project_name)
        t0 = time.monotonic()
        self._push(plan, certs, thumbprint, start=True)
        self.applied = Applied(self.initial, self.spec.revision, plan, certs, thumbprint)
        self.events.log("routing", action="started", pid=os.getpid(),
                        haproxy_pid=self.haproxy.pid(), revision=self.spec.revision,
                        domains=plan.hosts, upstreams=[u.name for u in plan.upstreams],
                        certs=sorted(certs), missing_certs=sorted(set(plan.tls_hosts) - set(certs)),
                        thumbprint=bool(thumbprint), seconds=round(time.monotonic() - t0, 3))
        # From the revision before the latest: the latest is delivered at once and the router
        # converges to it if FILE is older (no change, no event when it is the same).
        after = self.spec.revision if self.spec.revision is not None else \
            max(0, (latest.rev if latest else 0) - 1)
        self._watch = self.store.watch(self.project_name, self._on_revision, after=after)
        self.api = Server(self.spec.state_dir, {("GET", "/status"): lambda _: (200, self.status()),
                                                ("GET", "/stats"): lambda _: (200, self.stats())})
        self.api.start()

    def _on_revision(self, rev) -> None:          # the store's watch thread
        with self._pending_lock:
            if self._pending is None or rev.rev > self._pending.rev:
                self._pending = rev
        self._wake.set()

    def _take_revision(self):
        with self._pending_lock:
            rev, self._pending = self._pending, None
        return rev

    def apply_revision(self, rev) -> bool:
        """Parse and apply one stored revision; False (an "error" event) if it is refused."""
        source = f"{self.project_name} revision {rev.rev}"
        try:
            project = project_of_revision(rev.config, self.own, source)
            if project.project != self.project_name:
                raise RouterError(f"{source}: the file is of project {project.project!r}")
            plan = make_plan(project)
        except config.ConfigError as err:
            self._error(error=f"{source} refused: {err}", revision=rev.rev, problems=err.problems,
                        kept=self.applied.revision)
            return False
        except (LookupError, RouterError) as err:
            self._error(error=f"{source} refused: {err}", revision=rev.rev,
                        kept=self.applied.revision)
            return False
        return self._apply(project, rev.rev, plan, cause="revision")

    def sync_certs(self) -> bool:
        """Read the stored certificates and account; apply any difference."""
        with self._lock:
            cur = self.applied
            return self._apply(cur.project, cur.revision, cur.plan, cause="certs")

    def _apply(self, project, revision, plan: Plan, cause: str) -> bool:
        with self._lock:
            old = self.applied
            try:
                stored, thumbprint = self.certs.read()
                if self._store_failing:
                    self._store_failing = False
                    self.events.log("routing", action="store readable again")
            except Exception as err:   # the store away: keep what runs, say so once
                if not self._store_failing:
                    self._store_failing = True
                    self._error(error=f"store: cannot read certificates: {err}", cause=cause)
                if cause == "revision":
                    # the revision must not be lost: apply it with the certificates we have
                    stored = {h: c for h, c in old.certs.items()}
                    thumbprint = old.thumbprint
                else:
                    return False
            certs = self._wanted_certs(plan, stored)
            new = Applied(project, revision, plan, certs, thumbprint)
            change = _describe(old, new)
            if not change:
                if revision != old.revision:
                    self.applied = new      # same routing, newer revision number
                return True
            t0 = time.monotonic()
            try:
                result = self._push(plan, certs, thumbprint)
            except (HAProxyError, OSError) as err:
                self._restore_files(old)
                self._error(error=f"{cause} not applied: {err}", cause=cause, revision=revision,
                            kept=old.revision, **change)
                return False
            self.applied = new
            if result.get("reloaded"):
                self.reloads += 1
            event = {"cause": cause, "revision": revision, **change,
                     "reloaded": bool(result.get("reloaded")),
                     "seconds": round(time.monotonic() - t0, 3)}
            if result.get("fallback"):
                event["fallback"] = result["fallback"]
            self.events.log("routing", **event)
            return True

    def _restore_files(self, old: Applied) -> None:
        """After a failed update: HAProxy's files back to what the running process has, so a
        later reload does not bring half of the refused state in."""
        try:
            self.haproxy.write_files(old.plan.routes, old.plan.upstreams,
                                     {h: c.bundle for h, c in old.certs.items()}, old.thumbprint)
        except Exception as err:
            log.warning("could not put HAProxy's files back: %s", err)

    # -- run

    def run(self) -> int:
        """Until a signal (0) or HAProxy's death (1)."""
        next_poll = time.monotonic() + CERT_POLL_S
        while not self._stop.is_set():
            if not self.haproxy.alive():
                code = self.haproxy.exit_status()
                self._error(error=f"haproxy exited (status {code}): the router stops",
                            haproxy_status=code)
                self.shutdown()
                return EXIT_HAPROXY_DIED
            rev = self._take_revision()
            if rev is not None:
                self.apply_revision(rev)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CERT_POLL_S
                try:
                    self.sync_certs()
                except Exception:
                    log.exception("certificate poll failed")
            self._wake.wait(TICK_S)
            self._wake.clear()
        self.events.log("routing", action="stopped", revision=self.applied.revision)
        self.shutdown()
        return EXIT_STOPPED

    def stop(self, *_):
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        """API, HAProxy, the store, the event log; in that order. Idempotent."""
        if self.api is not None:
            try:
                self.api.stop()
            except Exception:
                pass
            self.api = None
        try:
            self.haproxy.stop()
        except Exception:
            log.exception("stopping haproxy")
        if self.store is not None:
            try:
                self.store.close()
            except Exception:
                pass
            self.store = None
        self.events.close()

    # -- read

    def status(self) -> dict:
        a = self.applied
        proc = None
        try:
            proc = self.haproxy.show_proc()
        except Exception:
            pass
        return {
            "node": self.name,
            "kind": "router",
            "role": "active",
            "pid": os.getpid(),
            "project": self.project_name,
            "revision": a.revision,
            "started": self.started,
            "domains": a.plan.hosts,
            "upstreams": {u.name: [f"{_hostport(ip, port)}" for ip, port in u.servers]
                          for u in a.plan.upstreams},
            "certs": [{"host": c.host, "serial": c.serial, "source": c.source,
                       "not_after": c.not_after} for c in sorted(a.certs.values(), key=lambda c: c.host)],
            "missing_certs": sorted(set(a.plan.tls_hosts) - set(a.certs)),
            "acme_thumbprint": a.thumbprint,
            "haproxy": {"alive": self.haproxy.alive(), "pid": self.haproxy.pid(),
                        "reloads": proc["reloads"] if proc else self.reloads,
                        "workers": proc["workers"] if proc else [],
                        "ports": {"http": self.spec.http_port, "https": self.spec.https_port},
                        "binds": list(self.spec.binds)},
            "interfaces": interfaces(),
            "last_error": self.last_error,
            "events": self.events.status(),
        }

    def stats(self) -> dict:
        a = self.applied
        rows = self.haproxy.stats()
        targets = {name: (service, port) for name, service, port in a.plan.targets}
        frontends, upstreams = {}, {}
        for r in rows:
            if r["type"] == "frontend":
                frontends[r["proxy"]] = _counters(r)
            elif r["type"] == "backend" and r["proxy"] in targets:
                service, port = targets[r["proxy"]]
                upstreams.setdefault(r["proxy"], {"servers": {}}).update(
                    service=service, port=port, status=r["status"], **_counters(r))
        for r in rows:
            if r["type"] == "server" and r["proxy"] in upstreams:
                key = r["address"] or r["name"]
                upstreams[r["proxy"]]["servers"][key] = {
                    "status": r["status"], "check": r["check_status"], **_counters(r)}
        return {"node": self.name, "time": time.time(), "revision": a.revision,
                "frontends": frontends, "upstreams": upstreams}


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _counters(row: dict) -> dict:
    return {k: row[k] for k in ("requests", "sessions", "current_sessions", "bytes_in",
                                "bytes_out", "responses_5xx")}


def _describe(old: Applied, new: Applied) -> dict:
    """What differs between two states, as event fields ({} when nothing does)."""
    out: dict[str, Any] = {}
    o_routes = {r.host: r for r in old.plan.routes}
    n_routes = {r.host: r for r in new.plan.routes}
    for key, hosts in (("domains_added", sorted(set(n_routes) - set(o_routes))),
                       ("domains_removed", sorted(set(o_routes) - set(n_routes))),
                       ("domains_changed", sorted(h for h in set(o_routes) & set(n_routes)
                                                  if o_routes[h] != n_routes[h]))):
        if hosts:
            out[key] = hosts
    o_ups = {u.name: u for u in old.plan.upstreams}
    n_ups = {u.name: u for u in new.plan.upstreams}
    for key, names in (("upstreams_added", sorted(set(n_ups) - set(o_ups))),
                       ("upstreams_removed", sorted(set(o_ups) - set(n_ups))),
                       ("upstreams_changed", sorted(n for n in set(o_ups) & set(n_ups)
                                                    if o_ups[n] != n_ups[n]))):
        if names:
            out[key] = names
    added = [{"host": h, "serial": c.serial} for h, c in sorted(new.certs.items())
             if h not in old.certs]
    updated = [{"host": h, "serial": c.serial, "was": old.certs[h].serial}
               for h, c in sorted(new.certs.items())
               if h in old.certs and old.certs[h].bundle != c.bundle]
    removed = sorted(set(old.certs) - set(new.certs))
    if added:
        out["certs_added"] = added
    if updated:
        out["certs_updated"] = updated
    if removed:
        out["certs_removed"] = removed
    if old.thumbprint != new.thumbprint:
        out["acme_thumbprint"] = ("set" if old.thumbprint is None else
                                  "removed" if new.thumbprint is None else "changed")
    return out


def interfaces() -> list[dict]:
    """The namespace's interfaces other than loopback: name, up, addresses (CIDR)."""
    try:
        p = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True,
                           timeout=5)
        links = json.loads(p.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    out = []
    for link in links:
        if link.get("link_type") == "loopback" or link.get("ifname") == "lo":
            continue
        out.append({"name": link.get("ifname"),
                    "up": "UP" in (link.get("flags") or []),
                    "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                                  if a.get("scope") != "link" and "local" in a]})
    return out


# ----------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zfast.routing.router",
                                 description="The router daemon of one routing instance.")
    ap.add_argument("-c", "--config", required=True, help="project file with a router section")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        spec, project = load_file(args.config)
    except RouterError as err:
        print(f"router: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    except config.ConfigError as err:
        print(f"router: {args.config}: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    try:
        router = Router(spec, project)
    except (HAProxyError, OSError) as err:
        print(f"router: {err}", file=sys.stderr)
        return EXIT_START_FAILED
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, router.stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        router.start()
    except Exception as err:
        router._error(error=f"start failed: {type(err).__name__}: {err}")
        print(f"router: start failed: {type(err).__name__}: {err}", file=sys.stderr)
        router.shutdown()
        return EXIT_START_FAILED
    log.info("router %s of %s serving: http %d, https %d on %s; api %s", spec.name,
             project.project, spec.http_port, spec.https_port, ", ".join(spec.binds),
             spec.state_dir / "api.sock")
    return router.run()


if __name__ == "__main__":
    sys.exit(main())
