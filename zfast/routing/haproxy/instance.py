"""HAProxy: one haproxy of the routing service, its files, process and runtime API tied together.

The router daemon of an instance owns one `HAProxy`. It hands over the whole wanted state
(routes, upstreams, certificates, the ACME account thumbprint); `update()` works out the
difference and applies it with the least disruption:

- domains, redirects, the thumbprint: the map files are rewritten and swapped in the running
  process with `prepare map` / `add map @ver` / `commit map` (atomic, no reload);
- certificates: `new ssl cert` + `set ssl cert` + `commit ssl cert` + `add ssl crt-list`
  for a new one, `set ssl cert` + `commit ssl cert` for a changed one, `del ssl crt-list`
  + `del ssl cert` for a removed one (no reload);
- upstreams (backends, servers, health checks): the configuration changes, so a hitless
  reload through the master CLI (process.py).

What the runtime API changes lives in memory only and a reload reads the files again, so
every file is written before the runtime change that mirrors it (files are the truth). If a
runtime step fails, `update()` falls back to a reload from those files.
"""

from __future__ import annotations

import ipaddress
import logging
import pwd
import re
import threading
from pathlib import Path
from typing import Iterable, Mapping

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.files import Workdir, write_atomic
from zfast.routing.haproxy.model import Route, State, Upstream, validate
from zfast.routing.haproxy.pem import make_self_signed
from zfast.routing.haproxy.process import MasterProcess, fit_maxconn
from zfast.routing.haproxy.render import (
    MAP_FILES,
    ConfigSettings,
    map_entries,
    render_config,
    render_crt_list,
    render_maps,
)
from zfast.routing.haproxy.runtime import MasterCLI, WorkerAPI

log = logging.getLogger("zfast.routing.haproxy")


class HAProxy:
    """One haproxy (master-worker) of the routing service, in `workdir`."""

    def __init__(self, workdir: Path, binds: list[str] | tuple[str, ...] = ("0.0.0.0", "::"),
                 http_port: int = 80, https_port: int = 443, netns: str | None = None,
                 haproxy_bin: str = "haproxy", maxconn: int = 10000,
                 hard_stop_after: str = "5m", start_timeout: float = 10.0,
                 user: str | None = "haproxy"):
        self.workdir = Workdir(workdir)
        addresses = []
        for b in binds:
            try:
                addresses.append(ipaddress.ip_address(b))
            except ValueError:
                raise HAProxyError(f"bad bind address {b!r}") from None
        if not addresses:
            raise HAProxyError("no bind address")
        for p in (http_port, https_port):
            if not isinstance(p, int) or not 1 <= p <= 65535:
                raise HAProxyError(f"bad port {p!r}")
        if http_port == https_port:
            raise HAProxyError("http_port and https_port must differ")
        if not re.fullmatch(r"[0-9]+[smhd]?", hard_stop_after):
            raise HAProxyError(f"bad hard_stop_after {hard_stop_after!r}")
        if user is not None:
            try:
                pwd.getpwnam(user)
            except KeyError:
                raise HAProxyError(f"user {user!r} for the haproxy workers does not exist "
                                   f"(Debian's haproxy package makes 'haproxy'; user=None keeps root)") from None
        self.settings = ConfigSettings(self.workdir, tuple(addresses), http_port, https_port,
                                       fit_maxconn(int(maxconn)), user, hard_stop_after)
        self.api = WorkerAPI(self.workdir.api_sock)
        self.master = MasterCLI(self.workdir.master_sock)
        self.process = MasterProcess(self.workdir, self.api, self.master, {http_port, https_port},
                                     haproxy_bin, netns, start_timeout)
        self._state: State | None = None
        self._lock = threading.RLock()
        self.last_reload_seconds: float | None = None   # how long the last reload took

    # ------------------------------------------------------------------ files

    def render_config(self, upstreams: Iterable[Upstream]) -> str:
        """The haproxy configuration for (validated) upstreams."""
        return render_config(self.settings, upstreams)

    def write_files(self, routes: Iterable[Route], upstreams: Iterable[Upstream],
                    certs: Mapping[str, str] | None = None, thumbprint: str | None = None) -> State:
        """Validate and write every file (configuration, maps, certificates, crt-list).
        Does not touch a running haproxy (use start/update for that)."""
        state = validate(routes, upstreams, certs, thumbprint)
        self._write_state(state)
        return state

    def _write_state(self, st: State) -> None:
        w = self.workdir
        w.path.mkdir(parents=True, exist_ok=True)
        w.cert_dir.mkdir(mode=0o700, exist_ok=True)
        if not w.default_cert.exists():
            write_atomic(w.default_cert, make_self_signed("zfast router default"), 0o600)
        for name, text in render_maps(st.routes, st.thumbprint).items():
            write_atomic(w.map_path(name), text)
        for host, pem in st.certs.items():
            p = w.cert_path(host)
            if not p.exists() or p.read_text() != pem:
                write_atomic(p, pem, 0o600)
        write_atomic(w.crt_list, render_crt_list(w, st.certs))
        keep = {w.cert_path(h).name for h in st.certs}
        for p in w.cert_dir.glob("*.pem"):
            if p.name not in keep:
                p.unlink()
        write_atomic(w.cfg, self.render_config(st.upstreams))

    def check_config(self) -> None:
        """`haproxy -c` on the written files; HAProxyError with haproxy's message if refused."""
        self.process.check_config()

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
            self.process.start()
            self._state = state

    def alive(self) -> bool:
        return self.process.alive()

    def pid(self) -> int | None:
        """The master's pid (None when not running)."""
        return self.process.pid()

    def exit_status(self) -> int | None:
        """haproxy's exit status once it died by itself (None while it runs, or once stopped)."""
        return self.process.exit_status()

    def stop(self, drain: float = 0.0, timeout: float = 5.0) -> None:
        """Stop haproxy (master and workers, old ones too). Idempotent. With drain > 0,
        a soft stop first: no new connections, those running get up to `drain` seconds."""
        with self._lock:
            self._state = None
            self.process.stop(drain, timeout)

    def show_proc(self) -> dict:
        """The master's `show proc`: {"master": pid, "reloads": n, "failed": n,
        "workers": [pid], "old_workers": [pid]}."""
        return self.master.show_proc()

    def worker_pid(self) -> int | None:
        """The current worker's pid (from the master)."""
        return self.master.worker_pid()

    def stats(self) -> list[dict]:
        """`show stat`, parsed: one dict a frontend/backend/server (see parse_stat_csv)."""
        return self.api.stats()

    def reload(self) -> None:
        """Hitless reload from the files: the master starts a new worker with the listening
        sockets of the old one (nothing refused), the old one finishes its connections.
        Returns once the new worker answers its runtime API."""
        with self._lock:
            if not self.alive():
                raise HAProxyError("haproxy not running")
            self.check_config()
            self.last_reload_seconds = self.process.reload()

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
            w = self.workdir
            try:
                w.cert_dir.mkdir(mode=0o700, exist_ok=True)
                # New and changed certificates first: a new domain has its certificate
                # before its route appears; a removed one loses its route first. Each
                # file is written before the runtime change that mirrors it.
                for h in added:
                    write_atomic(w.cert_path(h), new.certs[h], 0o600)
                    self.api.add_cert(w.cert_path(h), h, new.certs[h], w.crt_list)
                for h in updated:
                    write_atomic(w.cert_path(h), new.certs[h], 0o600)
                    self.api.set_cert(w.cert_path(h), new.certs[h])
                write_atomic(w.crt_list, render_crt_list(w, {**old.certs, **new.certs}))
                for name in changed_maps:
                    write_atomic(w.map_path(name), new_maps[name])
                    self.api.swap_map(w.map_path(name), map_entries(new_maps[name]))
                for h in removed:
                    self.api.del_cert(w.cert_path(h), w.crt_list)
                write_atomic(w.crt_list, render_crt_list(w, new.certs))
                for h in removed:
                    w.cert_path(h).unlink(missing_ok=True)
            except (HAProxyError, OSError) as e:
                log.warning("runtime update failed (%s); reloading from the files", e)
                self._reload_to(new, old)
                result.update(reloaded=True, fallback=str(e))
                return result
            self._state = new
            return result

    def _reload_to(self, new: State, old: State) -> None:
        """Write every file for `new` and reload; on a refused configuration put the old
        files back (the running process never saw the new ones) and raise."""
        self._write_state(new)
        try:
            self.check_config()
        except HAProxyError:
            self._write_state(old)
            raise
        self.last_reload_seconds = self.process.reload()
        self._state = new
