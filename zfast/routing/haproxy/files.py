"""The work directory of one haproxy: where each of its files is, and how they are written.

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

import os
import re
from pathlib import Path

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.model import WILDCARD_PREFIX

# The workdir's path appears in the configuration and on the CLI unquoted.
WORKDIR_RE = re.compile(r"/[A-Za-z0-9_./+-]*")
# sun_path holds 107 bytes; haproxy binds "<path>.<pid>.tmp" first, then renames it
SUN_PATH_MAX = 107
SOCKET_TMP_SUFFIX = 16


class Workdir:
    """The paths of one haproxy's files (the table above), under an absolute directory
    whose name haproxy's configuration and its unix sockets can take."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()
        if not WORKDIR_RE.fullmatch(str(self.path)):
            raise HAProxyError(f"workdir {self.path} has characters haproxy's configuration "
                               f"would need quoted; use letters, digits, '_', '.', '/', '+', '-'")
        self.cfg = self.path / "haproxy.cfg"
        self.api_sock = self.path / "api.sock"
        self.master_sock = self.path / "master.sock"
        self.pidfile = self.path / "haproxy.pid"
        self.logfile = self.path / "haproxy.log"
        self.state_file = self.path / "server-state"
        self.crt_list = self.path / "certs.list"
        self.cert_dir = self.path / "certs"
        self.default_cert = self.path / "default.pem"
        if len(str(self.master_sock)) + SOCKET_TMP_SUFFIX > SUN_PATH_MAX:
            raise HAProxyError(f"workdir {self.path} too long for unix sockets in it (at most "
                               f"{SUN_PATH_MAX - SOCKET_TMP_SUFFIX - len('/master.sock')} characters)")

    def map_path(self, name: str) -> Path:
        return self.path / name

    def cert_path(self, host: str) -> Path:
        # Host names never hold '_', so "_wildcard" cannot clash with a real name.
        name = "_wildcard" + host[1:] if host.startswith(WILDCARD_PREFIX) else host
        return self.cert_dir / f"{name}.pem"


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write atomically (temp file + rename): haproxy never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
