"""What one HAProxy serves: upstreams (backends), routes (domains), certificates and the ACME
thumbprint, and `validate()`, which checks all of it and returns it normalized as a `State`.

Everything haproxy reads is rendered from a `State` only (render.py), so what passes here
is safe in the configuration, the map files and on the CLI.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.pem import normalize_pem

# An upstream (haproxy backend) name: safe in the configuration, in map values and on the CLI.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RESERVED_NAMES = {"fe_http", "fe_https"}          # our frontends
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
WILDCARD_PREFIX = "*."
# An HTTP health-check path: no spaces, quotes, '#', '$' or backslashes (config syntax).
CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~%/?=&+:@,;!*()-]*")
THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")       # base64url, e.g. 43 chars (SHA-256)
HEALTH_KINDS = ("tcp", "http")


@dataclass(frozen=True)
class Upstream:
    """One haproxy backend: the backends of one service port."""
    name: str                                  # e.g. "app_8080" (safe characters only)
    servers: tuple[tuple[str, int], ...]       # (ip, port), IPv4 or IPv6
    health: dict | None = None                 # {"kind": "tcp"|"http", "interval_ms", "fall", "rise", "path"}


@dataclass(frozen=True)
class Route:
    """One domain: exact ("app.example.org") or wildcard ("*.app.example.org": one more label)."""
    host: str
    upstream: str
    redirect_https: bool = False


@dataclass(frozen=True)
class State:
    """Everything one HAProxy serves, validated and normalized (sorted, hosts lowercased)."""
    routes: tuple[Route, ...]
    upstreams: tuple[Upstream, ...]
    certs: dict[str, str] = field(hash=False)      # host -> normalized PEM
    thumbprint: str | None


def _host(host: str, what: str) -> str:
    """Validate and lowercase a host name, exact or wildcard ("*.parent")."""
    if not isinstance(host, str):
        raise HAProxyError(f"{what}: host must be a string, got {host!r}")
    h = host.strip().lower().rstrip(".")
    base = h[len(WILDCARD_PREFIX):] if h.startswith(WILDCARD_PREFIX) else h
    if len(h) > 253 or not HOST_RE.fullmatch(base):
        raise HAProxyError(f"{what}: bad host name {host!r} (letters, digits, '-' and '.'; "
                           f"a wildcard is '*.' followed by a domain)")
    return h


def _health(h: dict | None, what: str) -> dict | None:
    if h is None:
        return None
    if not isinstance(h, Mapping):
        raise HAProxyError(f"{what}: health must be a dict or None, got {h!r}")
    unknown = set(h) - {"kind", "interval_ms", "fall", "rise", "path"}
    if unknown:
        raise HAProxyError(f"{what}: unknown health keys {sorted(unknown)}")
    kind = h.get("kind", "tcp")
    if kind not in HEALTH_KINDS:
        raise HAProxyError(f"{what}: health kind must be one of {HEALTH_KINDS}, got {kind!r}")
    out = {"kind": kind}
    for key, default, lo, hi in (("interval_ms", 2000, 50, 3_600_000), ("fall", 3, 1, 100),
                                 ("rise", 2, 1, 100)):
        v = h.get(key, default)
        if v is None:
            v = default
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise HAProxyError(f"{what}: health {key} must be an integer in {lo}..{hi}, got {v!r}")
        out[key] = v
    path = h.get("path")
    if kind == "http":
        path = path or "/"
        if not isinstance(path, str) or not CHECK_PATH_RE.fullmatch(path):
            raise HAProxyError(f"{what}: bad health path {path!r} (starts with '/', no spaces, "
                               f"quotes, '#', '$' or backslashes)")
        out["path"] = path
    elif path is not None:
        raise HAProxyError(f"{what}: a path is for http health checks only (kind tcp)")
    return out


def _upstream(u: Upstream) -> Upstream:
    if not isinstance(u, Upstream):
        raise HAProxyError(f"not an Upstream: {u!r}")
    if not isinstance(u.name, str) or not NAME_RE.fullmatch(u.name) or u.name in RESERVED_NAMES:
        raise HAProxyError(f"bad upstream name {u.name!r}: 1-63 of letters, digits, '_', '.', '-' "
                           f"(starting with a letter or digit), not one of {sorted(RESERVED_NAMES)}")
    servers, seen = [], set()
    for s in u.servers:
        try:
            ip, port = s
            addr = ipaddress.ip_address(ip)
        except (TypeError, ValueError):
            raise HAProxyError(f"upstream {u.name}: bad server {s!r} (want (ip, port))") from None
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise HAProxyError(f"upstream {u.name}: bad port in server {s!r}")
        key = (str(addr), port)
        if key in seen:
            raise HAProxyError(f"upstream {u.name}: server {key[0]} port {port} listed twice")
        seen.add(key)
        servers.append(key)
    return Upstream(u.name, tuple(servers), _health(u.health, f"upstream {u.name}"))


def validate(routes: Iterable[Route], upstreams: Iterable[Upstream],
             certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> State:
    """Check everything and return the normalized state; HAProxyError says what is wrong."""
    ups: dict[str, Upstream] = {}
    for u in upstreams:
        u = _upstream(u)
        if u.name in ups:
            raise HAProxyError(f"upstream {u.name!r} defined twice")
        ups[u.name] = u
    rts: dict[str, Route] = {}
    for r in routes:
        if not isinstance(r, Route):
            raise HAProxyError(f"not a Route: {r!r}")
        host = _host(r.host, "route")
        if r.upstream not in ups:
            raise HAProxyError(f"route {host}: unknown upstream {r.upstream!r}")
        if host in rts:
            raise HAProxyError(f"route {host} defined twice")
        rts[host] = Route(host, r.upstream, bool(r.redirect_https))
    cs: dict[str, str] = {}
    for host, pem in (certs or {}).items():
        h = _host(host, "certificate")
        if h in cs:
            raise HAProxyError(f"certificate for {h} given twice")
        cs[h] = normalize_pem(pem, f"certificate {h}")
    if thumbprint is not None and (not isinstance(thumbprint, str) or not THUMBPRINT_RE.fullmatch(thumbprint)):
        raise HAProxyError(f"bad ACME thumbprint {thumbprint!r} (base64url, 16-128 characters)")
    return State(tuple(sorted(rts.values(), key=lambda r: r.host)),
                 tuple(sorted(ups.values(), key=lambda u: u.name)),
                 dict(sorted(cs.items())), thumbprint or None)
