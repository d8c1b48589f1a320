"""What haproxy reads, rendered from validated input: haproxy.cfg, the map files and the
crt-list. Text only: writing the files is the caller's (instance.py)."""

from __future__ import annotations

import grp
import ipaddress
import pwd
from dataclasses import dataclass
from typing import Iterable, Mapping

from zfast.routing.haproxy.files import Workdir
from zfast.routing.haproxy.model import WILDCARD_PREFIX, Route, Upstream

ACME_TOKEN_RE = r"^/[.]well-known/acme-challenge/[A-Za-z0-9_-]+$"
REDIRECT_FLAG = "redirect"
MAP_FILES = ("hosts.map", "wildcards.map", "acme.map")


@dataclass(frozen=True)
class ConfigSettings:
    """What haproxy.cfg holds besides the upstreams (HAProxy's constructor checks it)."""
    workdir: Workdir
    binds: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    http_port: int
    https_port: int
    maxconn: int
    user: str | None            # the workers' user; None keeps them root
    hard_stop_after: str


def group_name(user: str) -> str:
    """The name of a user's primary group."""
    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def render_config(settings: ConfigSettings, upstreams: Iterable[Upstream]) -> str:
    """The haproxy configuration for (validated) upstreams."""
    w = settings.workdir
    user = settings.user
    lines = [
        "# Written by zfast.routing.haproxy: changes are overwritten.",
        "global",
        f"    maxconn {settings.maxconn}",
        # The master stays root (it reads the files and re-executes on reload);
        # workers, which face the network, run as this user.
        *([f"    user {user}", f"    group {group_name(user)}"] if user else []),
        f"    stats socket {w.api_sock} mode 600 level admin expose-fd listeners",
        "    stats timeout 30s",
        "    log stderr format iso local0 info",
        f"    hard-stop-after {settings.hard_stop_after}",
        f"    server-state-file {w.state_file}",
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
        *_frontend(settings, "fe_http", "http"),
        *_frontend(settings, "fe_https", "https"),
    ]
    for u in sorted(upstreams, key=lambda u: u.name):
        lines += _backend(u)
    return "\n".join(lines)


def _bind_lines(settings: ConfigSettings, port: int, extra: str = "") -> list[str]:
    out = []
    for a in settings.binds:
        if a.version == 6:
            out.append(f"    bind [{a}]:{port} v6only{extra}")
        else:
            out.append(f"    bind {a}:{port}{extra}")
    return out


def _frontend(settings: ConfigSettings, name: str, scheme: str) -> list[str]:
    w = settings.workdir
    if scheme == "http":
        binds = _bind_lines(settings, settings.http_port)
    else:
        binds = _bind_lines(settings, settings.https_port,
                            f" ssl crt {w.default_cert} crt-list {w.crt_list} alpn h2,http/1.1")
    lines = [f"frontend {name}", *binds]
    if scheme == "http":
        lines += [
            "    # ACME HTTP-01, stateless: <token>.<account key thumbprint>, for any host,",
            "    # before any redirect; 404 while no thumbprint is set.",
            "    acl acme path_beg /.well-known/acme-challenge/",
            f"    http-request set-var(txn.acme) str(thumbprint),map_str({w.map_path('acme.map')}) if acme",
            "    http-request return status 200 content-type text/plain lf-string "
            "\"%[path,field(4,/)].%[var(txn.acme)]\" "
            f"if acme {{ path -m reg {ACME_TOKEN_RE} }} {{ var(txn.acme) -m found }}",
            "    http-request return status 404 content-type text/plain string \"no such challenge\" if acme",
        ]
    https_suffix = "" if settings.https_port == 443 else f":{settings.https_port}"
    lines += [
        "    # Client address: an incoming X-Forwarded-For is not trusted, replace it.",
        "    http-request del-header Forwarded",
        "    http-request set-header X-Forwarded-For %[src]",
        f"    http-request set-header X-Forwarded-Proto {scheme}",
        "    # Route on the Host header (port and final dot cut, lowercased), never on SNI:",
        "    # exact names first, then wildcards by the name without its first label.",
        "    http-request set-var(txn.host) req.hdr(host,1),lower,regsub(:[0-9]+$,),regsub([.]$,)",
        f"    http-request set-var(txn.route) var(txn.host),map_str({w.map_path('hosts.map')})",
        f"    http-request set-var(txn.route) var(txn.host),regsub(^[^.]*,),map_str({w.map_path('wildcards.map')}) "
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


def map_entries(text: str) -> list[tuple[str, str]]:
    """A map file's (key, value) pairs, as the runtime API takes them."""
    out = []
    for ln in text.splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            k, _, v = ln.strip().partition(" ")
            out.append((k, v.strip()))
    return out


def render_crt_list(workdir: Workdir, certs: Mapping[str, str]) -> str:
    """The crt-list for these hosts' certificates."""
    # An explicit SNI filter: the certificate is served for exactly the host it is for.
    return "".join(f"{workdir.cert_path(h)} {h}\n" for h in sorted(certs))
