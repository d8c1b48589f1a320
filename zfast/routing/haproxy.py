"""One HAProxy instance of the routing service: its files, its process, its runtime API.

The router daemon of an instance owns one `HAProxy`. It hands over the whole wanted state
(routes, upstreams, certificates, the ACME account thumbprint); `update()` works out the
difference and applies it with the least disruption:

- domains, redirects, the thumbprint: the map files are rewritten and swapped in the running
  process with `prepare map` / `add map @ver` / `commit map` (atomic, no reload);
- certificates: `new ssl cert` + `set ssl cert` + `commit ssl cert` + `add ssl crt-list`
  for a new one, `set ssl cert` + `commit ssl cert` for a changed one, `del ssl crt-list`
  + `del ssl cert` for a removed one (no reload);
- upstreams (backends, servers, health checks): the configuration changes, so a hitless
  reload through the master CLI (the master passes the listening sockets to the new worker:
  no connection is refused; old workers finish what they hold).

What the runtime API changes lives in memory only and a reload reads the files again, so
every file is written before the runtime change that mirrors it (files are the truth). If a
runtime step fails, `update()` falls back to a reload from those files.

Files in `workdir`:
    haproxy.cfg     the configuration (depends on the upstreams only)
    hosts.map       exact host -> "<upstream>" or "<upstream>:redirect"
    wildcards.map   ".<parent domain>" -> same, for routes "*.<parent domain>"
    acme.map        "thumbprint <ACME account key thumbprint>" (empty: no challenge answers)
    certs.list      the crt-list: one certificate file and its SNI filter a line
    certs/*.pem     certificate chain + key, one file per host
    default.pem     self-signed certificate served for unknown SNI (made once)
    api.sock        runtime API (level admin, expose-fd listeners)
    master.sock     master CLI (reload, show proc)
    haproxy.pid     master pid
    haproxy.log     haproxy's stderr: start-up alerts and the log of failed requests
    server-state    server states saved before a reload (a DOWN server stays DOWN)
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["Upstream", "Route", "HAProxy", "HAProxyError", "RuntimeAPI",
           "validate", "render_maps", "normalize_pem", "make_self_signed", "send",
           "parse_stat_csv"]

log = logging.getLogger(__name__)

# An upstream (haproxy backend) name: safe in the configuration, in map values and on the CLI.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
RESERVED_NAMES = {"fe_http", "fe_https"}          # our frontends
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
WILDCARD_PREFIX = "*."
# An HTTP health-check path: no spaces, quotes, '#', '$' or backslashes (config syntax).
CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~%/?=&+:@,;!*()-]*")
THUMBPRINT_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")       # base64url, e.g. 43 chars (SHA-256)
ACME_TOKEN_RE = r"^/[.]well-known/acme-challenge/[A-Za-z0-9_-]+$"
# The workdir's path appears in the configuration and on the CLI unquoted.
WORKDIR_RE = re.compile(r"/[A-Za-z0-9_./+-]*")
HEALTH_KINDS = ("tcp", "http")
REDIRECT_FLAG = "redirect"
MAP_FILES = ("hosts.map", "wildcards.map", "acme.map")
# The CLI takes at most tune.bufsize (16 kB) per command, payload included: add map
# entries in chunks well below it; a larger certificate goes through a reload.
MAP_CHUNK = 8000
CLI_MAX = 15000


class HAProxyError(Exception):
    """Bad input, a configuration haproxy refuses (its own message), or a failed operation."""


# ----------------------------------------------------------------------------- model

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
class _State:
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


def normalize_pem(pem: str, what: str = "certificate") -> str:
    """Check a PEM bundle (certificate chain + private key, key matching the first
    certificate) and return it as its PEM blocks only, without blank lines (the CLI ends a
    payload at an empty line)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if not isinstance(pem, str):
        raise HAProxyError(f"{what}: PEM must be a string")
    found = [(m.group(1), m.group(0).replace("\r\n", "\n")) for m in
             re.finditer(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", pem, re.S)]
    certs = [text for kind, text in found if kind == "CERTIFICATE"]
    keys = [text for kind, text in found if kind.endswith("PRIVATE KEY")]
    if not certs:
        raise HAProxyError(f"{what}: no CERTIFICATE block in the PEM bundle")
    if len(keys) != 1:
        raise HAProxyError(f"{what}: want exactly one PRIVATE KEY block in the PEM bundle, found {len(keys)}")
    try:
        leaf = x509.load_pem_x509_certificate(certs[0].encode())
        for c in certs[1:]:
            x509.load_pem_x509_certificate(c.encode())
        key = serialization.load_pem_private_key(keys[0].encode(), password=None)
    except (ValueError, TypeError) as e:
        raise HAProxyError(f"{what}: unreadable PEM: {e}") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise HAProxyError(f"{what}: the private key does not belong to the first certificate")
    lines = [ln.rstrip() for ln in "\n".join(certs + keys).splitlines()]
    return "\n".join(ln for ln in lines if ln) + "\n"


def validate(routes: Iterable[Route], upstreams: Iterable[Upstream],
             certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> _State:
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
    return _State(tuple(sorted(rts.values(), key=lambda r: r.host)),
                  tuple(sorted(ups.values(), key=lambda u: u.name)),
                  dict(sorted(cs.items())), thumbprint or None)


def render_maps(routes: Iterable[Route], thumbprint: str | None = None) -> dict[str, str]:
    """The map files' contents {file name: text} for (validated) routes and thumbprint."""
    exact, wild = [], []
    for r in sorted(routes, key=lambda r: r.host):
        value = f"{r.upstream}:{REDIRECT_FLAG}" if r.redirect_https else r.upstream
        if r.host.startswith(WILDCARD_PREFIX):
            # HAProxy looks up the request's host with its first label cut off, leading dot
            # kept: "x.app.example.org" -> ".app.example.org" (and "app" -> "": no match).
            wild.append(f"{r.host[1:]} {value}\n")
        else:
            exact.append(f"{r.host} {value}\n")
    return {
        "hosts.map": "".join(exact),
        "wildcards.map": "".join(wild),
        "acme.map": f"thumbprint {thumbprint}\n" if thumbprint else "",
    }


def _map_entries(text: str) -> list[tuple[str, str]]:
    out = []
    for ln in text.splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            k, _, v = ln.strip().partition(" ")
            out.append((k, v.strip()))
    return out


def _cert_file_name(host: str) -> str:
    # Host names never hold '_', so "_wildcard" cannot clash with a real name.
    return ("_wildcard" + host[1:] if host.startswith(WILDCARD_PREFIX) else host) + ".pem"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename): haproxy never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_self_signed(common_name: str, names: Iterable[str] = (), days: int = 3650) -> str:
    """A self-signed certificate + key (EC P-256) as one PEM bundle."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days)))
    names = list(names)
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return (cert.public_bytes(serialization.Encoding.PEM).decode()
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode())


# ----------------------------------------------------------------------- runtime API

class RuntimeAPI:
    """A client of a haproxy CLI socket (stats socket or master CLI): one command a
    connection, the answer read to the end."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = str(path)
        self.timeout = timeout

    def send(self, cmd: str, payload: str | None = None, timeout: float | None = None) -> str:
        """Send one command (with an optional multi-line payload) and return the answer.
        Raises OSError when the socket does not answer."""
        if "\n" in cmd:
            raise ValueError("one command line only")
        if payload is not None:
            lines = [ln for ln in payload.splitlines() if ln.strip()]
            data = f"{cmd} <<\n" + "".join(ln + "\n" for ln in lines) + "\n"
        else:
            data = cmd + "\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout or self.timeout)
            s.connect(self.path)
            s.sendall(data.encode())
            s.shutdown(socket.SHUT_WR)       # the master CLI answers at the end of input
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks).decode(errors="replace")


def send(path: str | os.PathLike, cmd: str, payload: str | None = None, timeout: float = 5.0) -> str:
    """One command to a haproxy CLI socket; see RuntimeAPI.send."""
    return RuntimeAPI(path, timeout).send(cmd, payload)


def parse_stat_csv(text: str) -> list[dict]:
    """`show stat` CSV -> one dict a frontend/backend/server, with the main counters."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected show stat answer: {text[:200]!r}")
    cols = lines[0][2:].split(",")
    kinds = {"0": "frontend", "1": "backend", "2": "server", "3": "listener"}

    def num(v: str) -> int:
        return int(v) if v.isdigit() else 0

    out = []
    for ln in lines[1:]:
        row = dict(zip(cols, ln.split(",")))
        kind = kinds.get(row.get("type", ""), row.get("type", ""))
        requests = row.get("req_tot", "")
        out.append({
            "proxy": row.get("pxname", ""),
            "name": row.get("svname", ""),
            "type": kind,
            "status": row.get("status", ""),
            "sessions": num(row.get("stot", "")),
            "current_sessions": num(row.get("scur", "")),
            "requests": num(requests) if requests else num(row.get("stot", "")),
            "bytes_in": num(row.get("bin", "")),
            "bytes_out": num(row.get("bout", "")),
            # "* L7OK": a check is running right now, L7OK was the last result
            "check_status": row.get("check_status", "").removeprefix("* "),
            "check_desc": row.get("last_chk", ""),
            "address": row.get("addr", ""),
            "responses_5xx": num(row.get("hrsp_5xx", "")),
            "raw": row,
        })
    return out


# ---------------------------------------------------------------------------- HAProxy

class HAProxy:
    """One haproxy (master-worker) of the routing service, in `workdir`."""

    def __init__(self, workdir: Path, binds: list[str] | tuple[str, ...] = ("0.0.0.0", "::"),
                 http_port: int = 80, https_port: int = 443, netns: str | None = None,
                 haproxy_bin: str = "haproxy", maxconn: int = 10000,
                 hard_stop_after: str = "5m", start_timeout: float = 10.0,
                 user: str | None = "haproxy"):
        self.workdir = Path(workdir).absolute()
        if not WORKDIR_RE.fullmatch(str(self.workdir)):
            raise HAProxyError(f"workdir {self.workdir} has characters haproxy's configuration "
                               f"would need quoted; use letters, digits, '_', '.', '/', '+', '-'")
        self.binds = []
        for b in binds:
            try:
                self.binds.append(ipaddress.ip_address(b))
            except ValueError:
                raise HAProxyError(f"bad bind address {b!r}") from None
        if not self.binds:
            raise HAProxyError("no bind address")
        for p in (http_port, https_port):
            if not isinstance(p, int) or not 1 <= p <= 65535:
                raise HAProxyError(f"bad port {p!r}")
        if http_port == https_port:
            raise HAProxyError("http_port and https_port must differ")
        if not re.fullmatch(r"[0-9]+[smhd]?", hard_stop_after):
            raise HAProxyError(f"bad hard_stop_after {hard_stop_after!r}")
        if user is not None:
            import pwd
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise HAProxyError(f"user {user!r} for the haproxy workers does not exist "
                                   f"(Debian's haproxy package makes 'haproxy'; user=None keeps root)") from None
        self.user = user
        self.http_port, self.https_port = http_port, https_port
        self.netns = netns
        self.haproxy_bin = haproxy_bin
        self.maxconn = _fit_maxconn(int(maxconn))
        self.hard_stop_after = hard_stop_after
        self.start_timeout = start_timeout
        self.cfg = self.workdir / "haproxy.cfg"
        self.api_sock = self.workdir / "api.sock"
        self.master_sock = self.workdir / "master.sock"
        self.pidfile = self.workdir / "haproxy.pid"
        self.logfile = self.workdir / "haproxy.log"
        self.state_file = self.workdir / "server-state"
        self.crt_list = self.workdir / "certs.list"
        self.cert_dir = self.workdir / "certs"
        self.default_cert = self.workdir / "default.pem"
        # sun_path holds 107 bytes; haproxy binds "<path>.<pid>.tmp" first, then renames it
        if len(str(self.master_sock)) + 16 > 107:
            raise HAProxyError(f"workdir {self.workdir} too long for unix sockets in it "
                               f"(at most {107 - 16 - len('/master.sock')} characters)")
        self.api = RuntimeAPI(self.api_sock)
        self.master = RuntimeAPI(self.master_sock)
        self._proc: subprocess.Popen | None = None
        self._state: _State | None = None
        self._lock = threading.RLock()
        self.last_reload_seconds: float | None = None   # how long the last reload took

    # ------------------------------------------------------------------ rendering

    def map_path(self, name: str) -> Path:
        return self.workdir / name

    def cert_path(self, host: str) -> Path:
        return self.cert_dir / _cert_file_name(host)

    def _bind_lines(self, port: int, extra: str = "") -> list[str]:
        out = []
        for a in self.binds:
            if a.version == 6:
                out.append(f"    bind [{a}]:{port} v6only{extra}")
            else:
                out.append(f"    bind {a}:{port}{extra}")
        return out

    def _frontend(self, name: str, scheme: str) -> list[str]:
        w = self.workdir
        if scheme == "http":
            binds = self._bind_lines(self.http_port)
        else:
            binds = self._bind_lines(
                self.https_port, f" ssl crt {self.default_cert} crt-list {self.crt_list} alpn h2,http/1.1")
        lines = [f"frontend {name}", *binds]
        if scheme == "http":
            lines += [
                "    # ACME HTTP-01, stateless: <token>.<account key thumbprint>, for any host,",
                "    # before any redirect; 404 while no thumbprint is set.",
                "    acl acme path_beg /.well-known/acme-challenge/",
                f"    http-request set-var(txn.acme) str(thumbprint),map_str({w}/acme.map) if acme",
                "    http-request return status 200 content-type text/plain lf-string "
                "\"%[path,field(4,/)].%[var(txn.acme)]\" "
                f"if acme {{ path -m reg {ACME_TOKEN_RE} }} {{ var(txn.acme) -m found }}",
                "    http-request return status 404 content-type text/plain string \"no such challenge\" if acme",
            ]
        https_suffix = "" if self.https_port == 443 else f":{self.https_port}"
        lines += [
            "    # Client address: an incoming X-Forwarded-For is not trusted, replace it.",
            "    http-request del-header Forwarded",
            "    http-request set-header X-Forwarded-For %[src]",
            f"    http-request set-header X-Forwarded-Proto {scheme}",
            "    # Route on the Host header (port and final dot cut, lowercased), never on SNI:",
            "    # exact names first, then wildcards by the name without its first label.",
            "    http-request set-var(txn.host) req.hdr(host,1),lower,regsub(:[0-9]+$,),regsub([.]$,)",
            f"    http-request set-var(txn.route) var(txn.host),map_str({w}/hosts.map)",
            f"    http-request set-var(txn.route) var(txn.host),regsub(^[^.]*,),map_str({w}/wildcards.map) "
            "unless { var(txn.route) -m found }",
            "    http-request return status 404 content-type text/plain string \"no route for this host\" "
            "unless { var(txn.route) -m found }",
        ]
        if scheme == "http":
            lines.append(
                f"    http-request redirect location https://%[var(txn.host)]{https_suffix}%[pathq] code 301 "
                f"if {{ var(txn.route),field(2,:) -m str {REDIRECT_FLAG} }}")
        lines += ["    use_backend %[var(txn.route),field(1,:)]", ""]
        return lines

    @staticmethod
    def _backend(u: Upstream) -> list[str]:
        lines = [f"backend {u.name}", "    balance roundrobin"]
        h = u.health
        if h:
            if h["kind"] == "http":
                lines.append(f"    option httpchk GET {h['path']}")
            lines.append(f"    default-server check inter {h['interval_ms']}ms "
                         f"fall {h['fall']} rise {h['rise']}")
        for ip, port in u.servers:
            addr = f"[{ip}]" if ":" in ip else ip
            lines.append(f"    server {ip}_{port} {addr}:{port}")
        if not u.servers:
            lines.append("    # no servers: requests get 503")
        return lines + [""]

    def render_config(self, upstreams: Iterable[Upstream]) -> str:
        """The haproxy configuration for (validated) upstreams."""
        lines = [
            "# Written by zfast.routing.haproxy: changes are overwritten.",
            "global",
            f"    maxconn {self.maxconn}",
            # The master stays root (it reads the files and re-executes on reload);
            # workers, which face the network, run as this user.
            *([f"    user {self.user}", f"    group {grp_name(self.user)}"] if self.user else []),
            f"    stats socket {self.api_sock} mode 600 level admin expose-fd listeners",
            "    stats timeout 30s",
            "    log stderr format iso local0 info",
            f"    hard-stop-after {self.hard_stop_after}",
            f"    server-state-file {self.state_file}",
            "    ssl-default-bind-options ssl-min-ver TLSv1.2",
            "",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    option dontlognull",
            "    option dontlog-normal",
            "    # On a reload, old workers answer a last request on idle keep-alive connections",
            "    # (with Connection: close) instead of closing them under the client's feet.",
            "    option idle-close-on-response",
            "    option redispatch",
            "    retries 2",
            "    load-server-state-from-file global",
            "    timeout connect 5s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    timeout http-request 10s",
            "    timeout http-keep-alive 15s",
            "    timeout queue 30s",
            "    timeout client-fin 10s",
            "    timeout tunnel 1h",
            "    timeout check 5s",
            "",
            *self._frontend("fe_http", "http"),
            *self._frontend("fe_https", "https"),
        ]
        for u in sorted(upstreams, key=lambda u: u.name):
            lines += self._backend(u)
        return "\n".join(lines)

    def _crt_list_text(self, certs: Mapping[str, str]) -> str:
        # An explicit SNI filter: the certificate is served for exactly the host it is for.
        return "".join(f"{self.cert_path(h)} {h}\n" for h in sorted(certs))

    # ------------------------------------------------------------------ files

    def _ensure_default_cert(self) -> None:
        if not self.default_cert.exists():
            _write(self.default_cert, make_self_signed("zfast router default"), 0o600)

    def write_files(self, routes: Iterable[Route], upstreams: Iterable[Upstream],
                    certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> _State:
        """Validate and write every file (configuration, maps, certificates, crt-list).
        Does not touch a running haproxy (use start/update for that)."""
        state = validate(routes, upstreams, certs, thumbprint)
        self._write_state(state)
        return state

    def _write_state(self, st: _State) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        self._ensure_default_cert()
        for name, text in render_maps(st.routes, st.thumbprint).items():
            _write(self.map_path(name), text)
        for host, pem in st.certs.items():
            p = self.cert_path(host)
            if not p.exists() or p.read_text() != pem:
                _write(p, pem, 0o600)
        _write(self.crt_list, self._crt_list_text(st.certs))
        keep = {self.cert_path(h).name for h in st.certs}
        for p in self.cert_dir.glob("*.pem"):
            if p.name not in keep:
                p.unlink()
        _write(self.cfg, self.render_config(st.upstreams))

    def check_config(self) -> None:
        """`haproxy -c` on the written files; HAProxyError with haproxy's message if refused."""
        try:
            p = subprocess.run([self._bin(), "-c", "-f", str(self.cfg)],
                               capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise HAProxyError("haproxy -c did not finish in 30 s") from None
        if p.returncode != 0:
            raise HAProxyError(f"haproxy refused the configuration: {_alerts(p.stdout + p.stderr)}")

    def _bin(self) -> str:
        path = shutil.which(self.haproxy_bin)
        if not path:
            raise HAProxyError(f"haproxy binary {self.haproxy_bin!r} not found")
        return path

    # ------------------------------------------------------------------ process

    def start(self, routes: Iterable[Route], upstreams: Iterable[Upstream],
              certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> None:
        """Write every file, start haproxy (master-worker) and wait until the runtime API
        answers and the ports listen. HAProxyError with haproxy's message on a bad config."""
        with self._lock:
            if self.alive():
                raise HAProxyError("haproxy already running; use update()")
            state = validate(routes, upstreams, certs, thumbprint)
            self._write_state(state)
            self.check_config()
            self._kill_stale()
            self.pidfile.unlink(missing_ok=True)
            _write(self.state_file, "1\n")   # no server states from an earlier run (format 1)
            argv = [self._bin(), "-W", "-S", f"{self.master_sock},mode,600",
                    "-f", str(self.cfg), "-p", str(self.pidfile)]
            if self.netns:
                argv = ["ip", "netns", "exec", self.netns, *argv]
            logf = open(self.logfile, "ab")
            try:
                log_start = logf.tell()
                self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                              stderr=logf, start_new_session=True)
            finally:
                logf.close()
            try:
                self._wait_started(log_start)
            except BaseException:
                self.stop()
                raise
            self._state = state

    def _wait_started(self, log_start: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        ports = {self.http_port, self.https_port}
        while True:
            if self._proc.poll() is not None:
                raise HAProxyError(f"haproxy exited at start (code {self._proc.returncode}): "
                                   f"{_alerts(self._log_since(log_start))}")
            # The master CLI starts answering a little after the worker's API does.
            wpid = self._worker_pid_from_api()
            if wpid and wpid == self.worker_pid() and ports <= _listening_ports(self._proc.pid):
                return
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy not serving after {self.start_timeout}s: "
                                   f"{_alerts(self._log_since(log_start))}")
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read(200_000).decode(errors="replace")
        except OSError:
            return ""

    def _kill_stale(self) -> None:
        """A haproxy left running on this workdir by an earlier daemon holds the ports: stop it."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if not any(b"haproxy" in a for a in cmdline[:1]) or str(self.cfg).encode() not in cmdline:
            return
        log.warning("stopping a stale haproxy (pid %d) of %s", pid, self.workdir)
        _terminate_group(pid, None, 5.0)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pid(self) -> int | None:
        """The master's pid (None when not running)."""
        return self._proc.pid if self.alive() else None

    def stop(self, drain: float = 0.0, timeout: float = 5.0) -> None:
        """Stop haproxy (master and workers, old ones too). Idempotent. With drain > 0,
        a soft stop first: no new connections, those running get up to `drain` seconds."""
        with self._lock:
            p, self._proc = self._proc, None
            self._state = None
            if p is None:
                return
            if drain > 0 and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                    p.wait(drain)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            _terminate_group(p.pid, p, timeout)

    # ------------------------------------------------------------------ runtime state

    def _worker_pid_from_api(self) -> int | None:
        try:
            info = self.api.send("show info", timeout=1.0)
        except OSError:
            return None
        m = re.search(r"^Pid: (\d+)$", info, re.M)
        return int(m.group(1)) if m else None

    def show_proc(self) -> dict:
        """The master's `show proc`: {"master": pid, "reloads": n, "failed": n,
        "workers": [pid], "old_workers": [pid]}."""
        try:
            text = self.master.send("show proc")
        except OSError as e:
            raise HAProxyError(f"master CLI: {e}") from None
        out = {"master": None, "reloads": 0, "failed": 0, "workers": [], "old_workers": []}
        section = None
        for ln in text.splitlines():
            if ln.startswith("# workers"):
                section = "workers"
            elif ln.startswith("# old workers"):
                section = "old_workers"
            elif ln.startswith("#"):
                section = None if not ln.startswith("#<PID>") else section
            else:
                f = ln.split()
                if len(f) >= 3 and f[0].isdigit():
                    if f[1] == "master":
                        out["master"] = int(f[0])
                        out["reloads"] = int(f[2]) if f[2].isdigit() else 0
                        m = re.search(r"failed: (\d+)", ln)
                        out["failed"] = int(m.group(1)) if m else 0
                    elif section and f[1] == "worker":
                        out[section].append(int(f[0]))
        if out["master"] is None:
            raise HAProxyError(f"unexpected show proc answer: {text[:300]!r}")
        return out

    def worker_pid(self) -> int | None:
        """The current worker's pid (from the master)."""
        try:
            w = self.show_proc()["workers"]
        except HAProxyError:
            return None
        return w[0] if w else None

    def stats(self) -> list[dict]:
        """`show stat`, parsed: one dict a frontend/backend/server (see parse_stat_csv)."""
        try:
            return parse_stat_csv(self.api.send("show stat"))
        except OSError as e:
            raise HAProxyError(f"runtime API: {e}") from None

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        """Hitless reload from the files: the master starts a new worker with the listening
        sockets of the old one (nothing refused), the old one finishes its connections.
        Returns once the new worker answers its runtime API."""
        with self._lock:
            if not self.alive():
                raise HAProxyError("haproxy not running")
            self.check_config()
            self._reload()

    def _reload(self) -> None:
        with self._lock:
            self._save_server_state()
            t0 = time.monotonic()
            before = self.show_proc()
            log_start = self.logfile.stat().st_size
            try:
                self.master.send("reload", timeout=2.0)
            except OSError:
                pass    # the master closes the connection when it re-executes
            deadline = t0 + self.start_timeout
            while True:
                if not self.alive():
                    raise HAProxyError(f"haproxy exited during reload: {_alerts(self._log_since(log_start))}")
                try:
                    now = self.show_proc()
                except HAProxyError:
                    now = None          # master re-executing
                if now is not None:
                    if now["failed"] > before["failed"]:
                        raise HAProxyError(f"reload failed, the old worker keeps serving: "
                                           f"{_alerts(self._log_since(log_start))}")
                    new = [w for w in now["workers"] if w not in before["workers"]]
                    # The old worker shares the API socket until its soft stop: wait for it,
                    # so that runtime commands from now on reach the new worker only.
                    if (new and self._stopping(before["workers"])
                            and self._worker_pid_from_api() == new[0]):
                        break
                if time.monotonic() > deadline:
                    raise HAProxyError(f"no new worker after {self.start_timeout}s: "
                                       f"{_alerts(self._log_since(log_start))}")
                time.sleep(0.01)
            self.last_reload_seconds = time.monotonic() - t0

    def _stopping(self, pids: Iterable[int]) -> bool:
        """Are these workers gone or in their soft stop (listeners closed)?"""
        for pid in pids:
            try:
                info = self.master.send(f"@!{pid} show info", timeout=1.0)
            except OSError:
                return False
            if "Can't find the target PID" in info:
                continue
            if not re.search(r"^Stopping: 1$", info, re.M):
                return False
        return True

    def _save_server_state(self) -> None:
        try:
            _write(self.state_file, self.api.send("show servers state"))
        except OSError as e:
            log.warning("could not save server state before reload: %s", e)

    # ------------------------------------------------------------------ update

    def update(self, routes: Iterable[Route], upstreams: Iterable[Upstream],
               certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> dict:
        """Apply the wanted state with the least disruption; returns what was done:
        {"maps": n changed, "certs_added": [...], "certs_updated": [...],
         "certs_removed": [...], "reloaded": bool (, "fallback": why a runtime step failed)}."""
        with self._lock:
            if not self.alive() or self._state is None:
                raise HAProxyError("haproxy not running; start() first")
            new = validate(routes, upstreams, certs, thumbprint)
            old = self._state
            old_maps = render_maps(old.routes, old.thumbprint)
            new_maps = render_maps(new.routes, new.thumbprint)
            changed_maps = [n for n in MAP_FILES if old_maps[n] != new_maps[n]]
            added = [h for h in new.certs if h not in old.certs]
            updated = [h for h in new.certs if h in old.certs and new.certs[h] != old.certs[h]]
            removed = [h for h in old.certs if h not in new.certs]
            result = {"maps": len(changed_maps), "certs_added": added, "certs_updated": updated,
                      "certs_removed": removed, "reloaded": False}
            if self.render_config(new.upstreams) != self.render_config(old.upstreams):
                self._reload_to(new, old)
                result["reloaded"] = True
                return result
            try:
                self.cert_dir.mkdir(mode=0o700, exist_ok=True)
                # New and changed certificates first: a new domain has its certificate
                # before its route appears; a removed one loses its route first.
                for h in added:
                    self._runtime_add_cert(h, new.certs[h])
                for h in updated:
                    self._runtime_set_cert(h, new.certs[h])
                _write(self.crt_list, self._crt_list_text({**old.certs, **new.certs}))
                for name in changed_maps:
                    _write(self.map_path(name), new_maps[name])
                    self._runtime_swap_map(self.map_path(name), _map_entries(new_maps[name]))
                for h in removed:
                    self._runtime_del_cert(h)
                _write(self.crt_list, self._crt_list_text(new.certs))
                for h in removed:
                    self.cert_path(h).unlink(missing_ok=True)
            except (HAProxyError, OSError) as e:
                log.warning("runtime update failed (%s); reloading from the files", e)
                self._reload_to(new, old)
                result.update(reloaded=True, fallback=str(e))
                return result
            self._state = new
            return result

    def _reload_to(self, new: _State, old: _State) -> None:
        """Write every file for `new` and reload; on a refused configuration put the old
        files back (the running process never saw the new ones) and raise."""
        self._write_state(new)
        try:
            self.check_config()
        except HAProxyError:
            self._write_state(old)
            raise
        self._reload()
        self._state = new

    def _cli(self, cmd: str, payload: str | None = None, expect: str | None = None,
             empty_ok: bool = False) -> str:
        if payload is not None and len(cmd) + len(payload) > CLI_MAX:
            raise HAProxyError(f"{cmd}: payload of {len(payload)} bytes too large for the CLI")
        try:
            out = self.api.send(cmd, payload)
        except OSError as e:
            raise HAProxyError(f"runtime API ({cmd}): {e}") from None
        text = out.strip()
        if (expect is not None and expect in out) or (empty_ok and not text):
            return out
        raise HAProxyError(f"runtime API refused {cmd!r}: {text[:500]}")

    def _runtime_swap_map(self, path: Path, entries: list[tuple[str, str]]) -> None:
        out = self._cli(f"prepare map {path}", expect="New version created:")
        ver = int(re.search(r"New version created: (\d+)", out).group(1))
        chunks, size = [[]], 0
        for k, v in entries:
            line = f"{k} {v}"
            if chunks[-1] and size + len(line) + 1 > MAP_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line) + 1
        for chunk in chunks:
            if chunk:
                self._cli(f"add map @{ver} {path}", "\n".join(chunk), empty_ok=True)
        self._cli(f"commit map @{ver} {path}", empty_ok=True)

    def _set_commit(self, path: Path, pem: str) -> None:
        try:
            self._cli(f"set ssl cert {path}", pem, expect="Transaction ")
            self._cli(f"commit ssl cert {path}", expect="Success!")
        except HAProxyError:
            try:
                self.api.send(f"abort ssl cert {path}")
            except OSError:
                pass
            raise

    def _runtime_add_cert(self, host: str, pem: str) -> None:
        path = self.cert_path(host)
        _write(path, pem, 0o600)
        self._cli(f"new ssl cert {path}", expect="New empty certificate store")
        self._set_commit(path, pem)
        self._cli(f"add ssl crt-list {self.crt_list}", f"{path} {host}", expect="Success!")

    def _runtime_set_cert(self, host: str, pem: str) -> None:
        path = self.cert_path(host)
        _write(path, pem, 0o600)
        self._set_commit(path, pem)

    def _runtime_del_cert(self, host: str) -> None:
        path = self.cert_path(host)
        self._cli(f"del ssl crt-list {self.crt_list} {path}", expect="deleted in crtlist")
        self._cli(f"del ssl cert {path}", expect="deleted!")


# ----------------------------------------------------------------------------- helpers

def _alerts(text: str, limit: int = 2000) -> str:
    """haproxy's own error lines ([ALERT], without the pid prefix), else its last lines."""
    lines = [re.sub(r"^\[ALERT\]\s+\(\d+\) : ", "", ln.strip())
             for ln in text.splitlines() if "[ALERT]" in ln]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines()[-10:] if ln.strip()]
    out = "; ".join(lines) or "(no message)"
    return out[-limit:]


def grp_name(user: str) -> str:
    """The name of a user's primary group."""
    import grp
    import pwd
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def _fit_maxconn(wanted: int) -> int:
    """haproxy needs about two descriptors a connection and refuses to start when it
    cannot raise its limit that far: stay under the hard limit it may raise to."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    fit = max(100, (hard - 200) // 2)
    if fit < wanted:
        log.info("maxconn %d lowered to %d (open files hard limit %d)", wanted, fit, hard)
    return min(wanted, fit)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process pid."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for ln in f:
                    parts = ln.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def _group_alive(pgid: int) -> bool:
    """Is a process of group pgid still running? Zombies (exited, not yet reaped by a
    parent that is not us) do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()     # state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _terminate_group(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the master (it stops every worker, old ones too), SIGKILL the process group
    after `timeout`; wait until no process of the group is left."""
    if proc is None or proc.poll() is None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not _group_alive(pid) and (proc is None or proc.returncode is not None):
            return
        time.sleep(0.02)
    log.warning("haproxy (pid %d) still running %.0f s after SIGTERM: SIGKILL", pid, timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
