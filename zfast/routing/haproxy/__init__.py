"""One HAProxy of the routing service: its files, its process, its runtime API.

instance.py  HAProxy: start, update (maps and certificates at runtime, upstreams by a
             hitless reload), stop; the rest of the package serves it
model.py     what it serves: Upstream, Route; validate() -> State
pem.py       certificate bundles: checked and normalized, or made self-signed
files.py     the work directory: every file's path (and what it holds), atomic writes
render.py    haproxy.cfg, the map files and the crt-list, as text
runtime.py   the CLI sockets: the workers' runtime API and the master CLI
process.py   the haproxy master process: start, hitless reload, stop
errors.py    HAProxyError

The names below are the package's public ones: `from zfast.routing.haproxy import HAProxy`.
"""

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.instance import HAProxy
from zfast.routing.haproxy.model import Route, Upstream, validate
from zfast.routing.haproxy.pem import make_self_signed, normalize_pem
from zfast.routing.haproxy.render import render_maps
from zfast.routing.haproxy.runtime import RuntimeAPI, parse_stat_csv, send

__all__ = ["Upstream", "Route", "HAProxy", "HAProxyError", "RuntimeAPI",
           "validate", "render_maps", "normalize_pem", "make_self_signed", "send",
           "parse_stat_csv"]
