"""The shared store: etcd v3 through its HTTP/JSON gateway, with the standard library only.

Keys (values are JSON; the gateway wants keys and values base64-encoded)::

    /zfast/<project>/config                   the latest revision {rev, project, config, who,
                                              time, changes, source}
    /zfast/<project>/revisions/<rev:012d>     every revision, same JSON
    /zfast/<project>/leader/<name>            a lease: the holder's node name, attached to an
                                              etcd lease kept alive while held
    /zfast/_global/leader/<name>              a lease with no project

A commit is one txn: "if the config key's mod_revision is still the one I read, put the config
key and the new revision key", retried on conflict, so two nodes committing at once never both
get the same number.

Each node keeps a local SQLite file (``cache_path``) with every revision it has seen and its own
events (events are per node: they are not shared through etcd). While etcd is unreachable,
``latest`` / ``history`` / ``get`` answer from that cache (``health()`` says ``ok: false``), and
``commit`` and the leases raise StoreError. A watch streams ``/v3/watch``; when the stream ends or
etcd goes away it reconnects with back-off, re-reads the config key (resync: the latest revision
is delivered if it changed meanwhile) and watches again from the revision after that read.

Debian bookworm's etcd-server (3.4.23) serves the gateway at both ``/v3/`` and ``/v3beta/``; the
client tries ``/v3/`` first and falls back to ``/v3beta/`` on a plain 404 (older 3.3 servers).
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import random
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from zfast.store import (
    DEFAULT_MAX_EVENTS,
    Backoff,
    Revision,
    Store,
    StoreError,
    Watch,
    check_name,
    deliver,
    lease_key,
    log,
)
from zfast.store.sqlite import SqliteStore

PREFIXES = ("/v3", "/v3beta")
COMMIT_ATTEMPTS = 50
WATCH_IDLE_S = 15.0  # reconnect (and resync) a watch stream that said nothing for this long


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range read cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return raw.decode()


def check_endpoints(value) -> list[str]:
    if not isinstance(value, list) or not value:
        raise StoreError(f"store.endpoints: {value!r} is not a non-empty list of URLs "
                         '(e.g. ["http://127.0.0.1:2379"])')
    for i, ep in enumerate(value):
        u = urlsplit(ep) if isinstance(ep, str) else None
        if u is None or u.scheme != "http" or not u.hostname or u.path not in ("", "/"):
            raise StoreError(f"store.endpoints[{i}]: {ep!r} is not an http://HOST:PORT URL "
                             "(https is not supported)")
        try:
            u.port
        except ValueError:
            raise StoreError(f"store.endpoints[{i}]: {ep!r} has a bad port") from None
    return [ep.rstrip("/") for ep in value]


class EtcdUnreachable(StoreError):
    """No endpoint answered."""


class _Client:
    """POSTs JSON to the gateway; tries each endpoint, remembers the one that answered."""

    def __init__(self, endpoints: list[str], timeout: float):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._prefix: dict[str, str] = {}
        self._lock = threading.Lock()

    def _order(self) -> list[str]:
        with self._lock:
            return list(self.endpoints)

    def _prefer(self, ep: str) -> None:
        with self._lock:
            if self.endpoints[0] != ep:
                self.endpoints.remove(ep)
                self.endpoints.insert(0, ep)

    def prefix(self, ep: str | None = None) -> str | None:
        return self._prefix.get(ep or self._order()[0])

    @staticmethod
    def _connect(ep: str, timeout: float) -> http.client.HTTPConnection:
        u = urlsplit(ep)
        return http.client.HTTPConnection(u.hostname, u.port or 2379, timeout=timeout)

    def _post(self, ep: str, method: str, body: dict, timeout: float, stream: bool):
        """(conn, response) of a 200, or raises StoreError (an etcd error) / OSError."""
        payload = json.dumps(body).encode()
        prefixes = [self._prefix[ep]] if ep in self._prefix else list(PREFIXES)
        for prefix in prefixes:
            conn = self._connect(ep, timeout)
            try:
                conn.request("POST", f"{prefix}/{method}", body=payload,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status == 200:
                    self._prefix[ep] = prefix
                    if stream:
                        return conn, resp
                    data = resp.read()
                    conn.close()
                    return None, data
                data = resp.read()
                conn.close()
            except BaseException:
                conn.close()
                raise
            try:
                err = json.loads(data)
            except ValueError:
                err = None
            if isinstance(err, dict) and ("code" in err or "error" in err):
                self._prefix[ep] = prefix
                raise StoreError(f"etcd {method}: {err.get('message') or err.get('error')}")
            if resp.status != 404:
                raise StoreError(f"etcd {method}: HTTP {resp.status} {data[:200]!r}")
            # a plain 404: not this gateway prefix; try the next one
        raise StoreError(f"etcd at {ep} serves none of {', '.join(p + '/' for p in PREFIXES)}"
                         " (is it etcd v3?)")

    def _each(self, method: str, body: dict, timeout: float | None, stream: bool):
        errors = []
        for ep in self._order():
            try:
                result = self._post(ep, method, body, timeout or self.timeout, stream)
                self._prefer(ep)
                return result
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{ep}: {e or type(e).__name__}")
        raise EtcdUnreachable("etcd unreachable (" + "; ".join(errors) + ")")

    def call(self, method: str, body: dict, timeout: float | None = None) -> dict:
        _, data = self._each(method, body, timeout, stream=False)
        # Streaming RPCs (lease/keepalive) answer one JSON object a line, wrapped in "result".
        first = data.strip().split(b"\n", 1)[0] if data.strip() else b"{}"
        try:
            msg = json.loads(first)
        except ValueError as e:
            raise StoreError(f"etcd {method}: not JSON: {first[:200]!r}") from e
        if "error" in msg and isinstance(msg["error"], dict):
            raise StoreError(f"etcd {method}: {msg['error'].get('message')}")
        return msg.get("result", msg) if isinstance(msg.get("result"), dict) else msg

    def stream(self, method: str, body: dict, timeout: float | None = None):
        return self._each(method, body, timeout, stream=True)


def _decode_revision(project: str, kv: dict) -> Revision:
    try:
        d = json.loads(unb64(kv.get("value")))
        d.setdefault("project", project)
        return Revision.from_dict(d)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        key = unb64(kv.get("key")).decode(errors="replace")
        raise StoreError(f"etcd key {key}: not a zfast revision ({e})") from None


class EtcdStore(Store):
    kind = "etcd"

    def __init__(self, endpoints: list[str], node: str, cache_path: Path, timeout: float = 2.0,
                 max_events: int = DEFAULT_MAX_EVENTS):
        super().__init__(node)
        self.endpoints = check_endpoints(list(endpoints))
        self.client = _Client(self.endpoints, timeout)
        self.cache = SqliteStore(cache_path, node, max_events=max_events)
        self._state_lock = threading.Lock()
        self._ok: bool | None = None  # unknown until the first request
        self._error: str | None = None
        self._last_ok: float | None = None
        self._version: str | None = None
        self._leases: dict[str, tuple[str, float]] = {}  # key -> (lease id, last keepalive)

    # --- plumbing -----------------------------------------------------------------------
    def _mark(self, error: str | None) -> None:
        with self._state_lock:
            was = self._ok
            self._ok, self._error = error is None, error
            if error is None:
                self._last_ok = time.time()
        if was is not False and error is not None:
            log.warning("store: %s", error)
        elif was is False and error is None:
            log.info("store: etcd reachable again")

    def _call(self, method: str, body: dict, timeout: float | None = None) -> dict:
        try:
            result = self.client.call(method, body, timeout)
        except EtcdUnreachable as e:
            self._mark(str(e))
            raise
        self._mark(None)
        return result

    @staticmethod
    def config_key(project: str) -> str:
        return f"/zfast/{check_name('project', project)}/config"

    @staticmethod
    def revisions_prefix(project: str) -> str:
        return f"/zfast/{check_name('project', project)}/revisions/"

    def revision_key(self, project: str, rev: int) -> str:
        return f"{self.revisions_prefix(project)}{int(rev):012d}"

    def _range(self, key: str, **extra) -> dict:
        return self._call("kv/range", {"key": b64(key), **extra})

    # --- revisions ----------------------------------------------------------------------
    def commit(self, project: str, config_text: str, who: str, changes: list[str],
               source: str) -> Revision:
        ck = self.config_key(project)
        kvs = self._range(ck).get("kvs") or []
        for attempt in range(COMMIT_ATTEMPTS):
            if kvs:
                prev, mod = _decode_revision(project, kvs[0]).rev, int(kvs[0]["mod_revision"])
            else:
                prev, mod = 0, 0
            r = Revision(rev=prev + 1, project=project, config=config_text, who=who,
                         time=time.time(), changes=list(changes), source=source)
            value = b64(r.to_json())
            resp = self._call("kv/txn", {
                "compare": [{"key": b64(ck), "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(mod)}],
                "success": [{"request_put": {"key": b64(ck), "value": value}},
                            {"request_put": {"key": b64(self.revision_key(project, r.rev)),
                                             "value": value}}],
                "failure": [{"request_range": {"key": b64(ck)}}],
            })
            if resp.get("succeeded"):
                self._remember(r)
                return r
            # Someone else committed first: take their revision as the base and try again.
            responses = resp.get("responses") or [{}]
            kvs = (responses[0].get("response_range") or {}).get("kvs") or []
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 5)))
        raise StoreError(f"{project}: commit lost {COMMIT_ATTEMPTS} races in a row; try again")

    def _remember(self, *revs: Revision) -> None:
        try:
            self.cache.remember(list(revs))
        except StoreError as e:
            log.warning("store: cannot update the local cache: %s", e)

    def latest(self, project: str) -> Revision | None:
        try:
            kvs = self._range(self.config_key(project)).get("kvs") or []
        except EtcdUnreachable:
            return self.cache.latest(project)
        if not kvs:
            return None
        r = _decode_revision(project, kvs[0])
        self._remember(r)
        return r

    def get(self, project: str, rev: int) -> Revision:
        try:
            kvs = self._range(self.revision_key(project, rev)).get("kvs") or []
        except EtcdUnreachable:
            try:
                return self.cache.get(project, rev)
            except KeyError:
                raise StoreError(f"{project}: revision {rev} is not in the local cache and "
                                 f"{self._error}") from None
        if not kvs:
            raise KeyError(f"{project}: no revision {rev}")
        return _decode_revision(project, kvs[0])

    def history(self, project: str, limit: int = 100) -> list[Revision]:
        prefix = self.revisions_prefix(project)
        try:
            kvs = self._range(prefix, range_end=b64(prefix_end(prefix)), limit=str(int(limit)),
                              sort_order="DESCEND", sort_target="KEY").get("kvs") or []
        except EtcdUnreachable:
            return self.cache.history(project, limit)
        revs = [_decode_revision(project, kv) for kv in kvs]
        self._remember(*revs)
        return revs

    def _watch_loop(self, project: str, callback, after: int, w: Watch) -> None:
        ck = self.config_key(project)
        backoff = Backoff(0.1, 2.0)
        state = {"last": after}

        def offer(r: Revision) -> None:
            if r.rev > state["last"]:
                state["last"] = r.rev
                self._remember(r)
                deliver(callback, r)
            elif r.rev < state["last"]:
                log.warning("watch of %s: etcd has rev %d, older than %d seen before "
                            "(etcd data reset?)", project, r.rev, state["last"])

        while not w.stopped.is_set():
            conn = None
            try:
                # Resync: read the key, then watch from just after that read.
                resp = self._range(ck)
                for kv in resp.get("kvs") or []:
                    offer(_decode_revision(project, kv))
                start = int(resp["header"]["revision"]) + 1
                conn, stream = self.client.stream(
                    "watch", {"create_request": {"key": b64(ck), "start_revision": str(start)}},
                    timeout=WATCH_IDLE_S)

                def unblock(conn=conn):
                    try:
                        conn.sock and conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

                w.on_stop(unblock)
                try:
                    while not w.stopped.is_set():
                        line = stream.readline()
                        if not line:
                            raise EtcdUnreachable("etcd watch stream ended")
                        if not line.strip():
                            continue
                        msg = json.loads(line)
                        if "error" in msg:
                            raise StoreError(f"etcd watch: {msg['error'].get('message')}")
                        res = msg.get("result") or {}
                        if res.get("created"):
                            backoff.reset()
                        for ev in res.get("events") or []:
                            if ev.get("type") != "DELETE" and ev.get("kv"):
                                offer(_decode_revision(project, ev["kv"]))
                        if res.get("canceled"):  # e.g. compacted past start: resync
                            raise StoreError("etcd watch canceled: "
                                             f"{res.get('cancel_reason') or 'no reason given'}")
                finally:
                    w.off_stop(unblock)
            except TimeoutError:
                pass  # idle: reconnect and resync, cheap
            except (StoreError, OSError, http.client.HTTPException, ValueError, KeyError) as e:
                if w.stopped.is_set():
                    break
                if isinstance(e, (OSError, http.client.HTTPException, EtcdUnreachable)):
                    self._mark(f"etcd unreachable: {e}" if not isinstance(e, EtcdUnreachable)
                               else str(e))
                else:
                    log.warning("watch of %s: %s", project, e)
                w.stopped.wait(backoff.next())
            finally:
                if conn is not None:
                    conn.close()

    # --- health and events --------------------------------------------------------------
    def health(self) -> dict:
        try:
            st = self._call("maintenance/status", {}, timeout=min(self.client.timeout, 1.0))
            self._version = st.get("version") or self._version
        except StoreError as e:
            if not isinstance(e, EtcdUnreachable):
                self._mark(str(e))
        with self._state_lock:
            return {"kind": self.kind, "ok": bool(self._ok), "error": self._error,
                    "endpoints": list(self.endpoints), "last_ok": self._last_ok,
                    "version": self._version, "prefix": self.client.prefix(),
                    "cache": str(self.cache.path)}

    def add_event(self, event: dict) -> dict:
        return self.cache.add_event(event)

    def events(self, since: float | None = None, limit: int | None = None) -> list[dict]:
        return self.cache.events(since, limit)

    # --- leases -------------------------------------------------------------------------
    def _lease_alive(self, key: str, lease_id: str) -> bool:
        res = self._call("lease/keepalive", {"ID": lease_id})
        alive = int(res.get("TTL", 0) or 0) > 0
        if alive:
            with self._state_lock:
                if key in self._leases:
                    self._leases[key] = (lease_id, time.time())
        return alive

    def _hold(self, key: str, node: str, lease_id: str, ttl: int) -> None:
        with self._state_lock:
            self._leases[key] = (lease_id, time.time())

        def lost():
            with self._state_lock:
                self._leases.pop(key, None)

        self._start_keeper(key, node, max(0.2, ttl / 3), lambda: self._lease_alive(key, lease_id),
                           lost)

    def lease_campaign(self, name: str, node: str, ttl_s: float,
                       project: str | None = None) -> bool:
        key = lease_key(name, project)
        ttl = max(1, math.ceil(ttl_s))
        with self._state_lock:
            held = self._leases.get(key)
        if held and self._keeper_running(key, node) and time.time() - held[1] < ttl:
            return True
        grant = self._call("lease/grant", {"TTL": str(ttl)})
        lease_id, granted = grant["ID"], int(grant.get("TTL", ttl))
        resp = self._call("kv/txn", {
            "compare": [{"key": b64(key), "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": b64(key), "value": b64(node),
                                         "lease": lease_id}}],
            "failure": [{"request_range": {"key": b64(key)}}],
        })
        if resp.get("succeeded"):
            self._hold(key, node, lease_id, granted)
            return True
        self._revoke(lease_id)
        kvs = ((resp.get("responses") or [{}])[0].get("response_range") or {}).get("kvs") or []
        if kvs and unb64(kvs[0].get("value")).decode() == node and kvs[0].get("lease"):
            # Ours from before (another Store, or this one after an outage): adopt its lease.
            old = kvs[0]["lease"]
            with self._state_lock:
                self._leases[key] = (old, 0.0)
            if self._lease_alive(key, old):
                self._hold(key, node, old, granted)
                return True
        return False

    def _revoke(self, lease_id: str) -> None:
        try:
            self._call("lease/revoke", {"ID": lease_id})
        except StoreError as e:
            log.debug("lease revoke %s: %s", lease_id, e)

    @staticmethod
    def document_key(key: str) -> str:
        return f"/zfast/documents/{key}"

    def put(self, key: str, value: str) -> None:
        self._call("kv/put", {"key": b64(self.document_key(key)), "value": b64(value)})

    def fetch(self, key: str) -> str | None:
        kvs = self._range(self.document_key(key)).get("kvs") or []
        return unb64(kvs[0].get("value")).decode() if kvs else None

    def items(self, prefix: str) -> dict[str, str]:
        start = self.document_key(prefix)
        kvs = self._range(start, range_end=b64(prefix_end(start))).get("kvs") or []
        cut = len(self.document_key(""))
        return {unb64(kv["key"]).decode()[cut:]: unb64(kv.get("value")).decode() for kv in kvs}

    def lease_holder(self, name: str, project: str | None = None) -> str | None:
        kvs = self._range(lease_key(name, project)).get("kvs") or []
        return unb64(kvs[0].get("value")).decode() if kvs else None

    def lease_resign(self, name: str, node: str, project: str | None = None) -> None:
        key = lease_key(name, project)
        self._stop_keeper(key)
        with self._state_lock:
            held = self._leases.pop(key, None)
        # Delete the key only if it is still ours, then drop the etcd lease.
        self._call("kv/txn", {
            "compare": [{"key": b64(key), "target": "VALUE", "result": "EQUAL",
                         "value": b64(node)}],
            "success": [{"request_delete_range": {"key": b64(key)}}],
        })
        if held:
            self._revoke(held[0])

    def close(self) -> None:
        super().close()
        self.cache.close()
