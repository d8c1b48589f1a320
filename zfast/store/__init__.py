"""Where a project's desired state lives: its revisions, the node's events, and leader leases.

One interface, two back ends:

* ``{kind: sqlite}`` (the default): one SQLite file, ``<state_dir>/store.sqlite`` unless ``path``
  says otherwise. Nodes that share the file (one machine) share the state.
* ``{kind: etcd, endpoints: ["http://127.0.0.1:2379"]}``: etcd v3 through its HTTP/JSON gateway.
  Both nodes of a pair watch the same project key and converge to it; a local SQLite file keeps
  the last revisions seen (so a node keeps its state while etcd is away) and the node's events.

Every revision of a project is a whole project file (``config``, the YAML text) plus who
committed it, when, what changed and from where. Revision numbers start at 1 and grow by one
per project. ``watch`` calls back from a background thread with each newer revision, and
survives the store going away: it reconnects with back-off and, once back, delivers the latest
revision if it changed meanwhile.

Leases (``lease_campaign`` / ``lease_holder`` / ``lease_resign``) are the activity controller's
election primitive: whoever wins holds the lease, kept alive by a background thread until
``lease_resign`` (immediate hand-over) or ``close`` / process death (hand-over after the TTL).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

log = logging.getLogger("zfast.store")

DEFAULT_MAX_EVENTS = 100_000
KINDS = ("sqlite", "etcd")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # as zfast.config.NAME_PATTERN
GLOBAL_SCOPE = "_global"  # lease key scope when no project is given (never a valid project name)


class StoreError(Exception):
    """The store cannot do what was asked: a bad spec, or the back end is unreachable."""


@dataclass
class Revision:
    rev: int
    project: str
    config: str  # the project file, YAML text
    who: str
    time: float  # epoch seconds
    changes: list[str] = field(default_factory=list)
    source: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Revision":
        return cls(rev=int(d["rev"]), project=str(d["project"]), config=str(d["config"]),
                   who=str(d.get("who", "")), time=float(d.get("time", 0.0)),
                   changes=[str(c) for c in d.get("changes") or []],
                   source=str(d.get("source", "")))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Revision":
        return cls.from_dict(json.loads(text))


def check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StoreError(f"{what}: {name!r} is not a valid name "
                         "(letters, digits, '_', '.', '-'; at most 63)")
    return name


def lease_key(name: str, project: str | None) -> str:
    """``/zfast/<project>/leader/<name>``, or ``/zfast/_global/leader/<name>`` without a project."""
    scope = GLOBAL_SCOPE if project is None else check_name("project", project)
    return f"/zfast/{scope}/leader/{check_name('lease name', name)}"


def event_time(event: dict) -> float:
    """An event's ``time`` as epoch seconds: a number, or RFC 3339 text (zfast.events' form)."""
    t = event.get("time")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    if isinstance(t, str):
        try:
            return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return time.time()


class Watch:
    """A running watch; ``stop()`` ends it (``Store.close`` stops them all)."""

    def __init__(self, name: str, run: Callable[["Watch"], None]):
        self.stopped = threading.Event()
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, args=(run,), name=name, daemon=True)

    def _main(self, run) -> None:
        try:
            run(self)
        except Exception:  # never expected: the loops catch their own errors
            log.exception("store watch thread died")

    def on_stop(self, closer: Callable[[], None]) -> None:
        """Something to call on stop() to unblock the thread (e.g. close a stream)."""
        with self._lock:
            self._closers.append(closer)

    def off_stop(self, closer: Callable[[], None]) -> None:
        with self._lock:
            if closer in self._closers:
                self._closers.remove(closer)

    def stop(self, timeout: float = 2.0) -> None:
        self.stopped.set()
        with self._lock:
            closers = list(self._closers)
        for c in closers:
            try:
                c()
            except Exception:
                pass
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


def deliver(callback: Callable[[Revision], None], rev: Revision) -> None:
    """Call a watch callback; its exceptions are logged, never end the watch."""
    try:
        callback(rev)
    except Exception:
        log.exception("store watch callback failed on %s rev %d", rev.project, rev.rev)


class Backoff:
    """Retry delays: start, doubling, capped; reset() after a success."""

    def __init__(self, start: float = 0.1, cap: float = 2.0):
        self.start, self.cap, self.delay = start, cap, start

    def next(self) -> float:
        d = self.delay
        self.delay = min(self.cap, self.delay * 2)
        return d

    def reset(self) -> None:
        self.delay = self.start


class Store(ABC):
    """A project's revisions, the node's events and leader leases. Thread-safe."""

    kind: str = "?"

    def __init__(self, node: str):
        self.node = node
        self._watches: list[Watch] = []
        self._keepers: dict[str, tuple[str, threading.Event, threading.Thread]] = {}
        self._keepers_lock = threading.Lock()

    # --- revisions -------------------------------------------------------------
    @abstractmethod
    def commit(self, project: str, config_text: str, who: str, changes: list[str],
               source: str) -> Revision:
        """Store a new revision (previous + 1, atomically) and return it."""

    @abstractmethod
    def latest(self, project: str) -> Revision | None:
        """The newest revision, or None if the project has none."""

    @abstractmethod
    def get(self, project: str, rev: int) -> Revision:
        """One revision; KeyError if the project has no such revision."""

    @abstractmethod
    def history(self, project: str, limit: int = 100) -> list[Revision]:
        """Up to ``limit`` revisions, newest first."""

    def watch(self, project: str, callback: Callable[[Revision], None],
              after: int | None = None) -> Watch:
        """Call ``callback(revision)`` from a background thread for each newer revision.

        Revisions come in increasing order; intermediate ones may be skipped (after an outage
        only the latest is delivered), but the last call is always the latest. ``after``: deliver
        revisions newer than this number (default: the latest at the time of the call, so pass
        ``latest().rev`` read before to never miss one).
        """
        check_name("project", project)
        if after is None:
            try:
                cur = self.latest(project)
                after = cur.rev if cur else 0
            except StoreError:
                after = 0
        w = Watch(f"zfast-store-watch-{project}",
                  lambda w: self._watch_loop(project, callback, after, w))
        self._watches.append(w)
        w.thread.start()
        return w

    @abstractmethod
    def _watch_loop(self, project: str, callback: Callable[[Revision], None], after: int,
                    w: Watch) -> None:
        """Run until w.stopped: deliver revisions newer than ``after``; never raise."""

    # --- health and events -------------------------------------------------------
    @abstractmethod
    def health(self) -> dict:
        """{"kind", "ok", "error", "endpoints" or "path", "last_ok"} (a live check)."""

    @abstractmethod
    def add_event(self, event: dict) -> dict:
        """Append an event (``time`` defaults to now); the oldest beyond the bound are dropped."""

    @abstractmethod
    def events(self, since: float | None = None, limit: int | None = None) -> list[dict]:
        """Events oldest first; ``since``: epoch seconds; ``limit``: the newest N of them."""

    # --- small documents (certificates, account keys) -------------------------------------
    @abstractmethod
    def put(self, key: str, value: str) -> None:
        """Store a small document under ``key`` (a path like ``certs/app.example.org``)."""

    @abstractmethod
    def fetch(self, key: str) -> str | None:
        """The document under ``key``, or None."""

    @abstractmethod
    def items(self, prefix: str) -> dict[str, str]:
        """Every document whose key starts with ``prefix``, by key."""

    # --- leases --------------------------------------------------------------------
    @abstractmethod
    def lease_campaign(self, name: str, node: str, ttl_s: float,
                       project: str | None = None) -> bool:
        """Try to hold lease ``name`` for ``node``; True if ``node`` holds it now.

        Once won, a background thread keeps it alive until lease_resign() or close(); calling
        again while held is a cheap True. Raises StoreError if the store is unreachable.
        """

    @abstractmethod
    def lease_holder(self, name: str, project: str | None = None) -> str | None:
        """The node holding lease ``name``, or None."""

    @abstractmethod
    def lease_resign(self, name: str, node: str, project: str | None = None) -> None:
        """Give lease ``name`` up now if ``node`` holds it."""

    def _keeper_running(self, key: str, node: str) -> bool:
        with self._keepers_lock:
            k = self._keepers.get(key)
            return bool(k and k[0] == node and k[2].is_alive() and not k[1].is_set())

    def _start_keeper(self, key: str, node: str, interval: float,
                      refresh: Callable[[], bool], on_lost: Callable[[], None]) -> None:
        """Call refresh() every ``interval`` s until it returns False (lost) or the stop."""
        self._stop_keeper(key)
        stop = threading.Event()

        def run():
            while not stop.wait(interval):
                try:
                    if not refresh():
                        log.warning("lease %s lost by %s", key, node)
                        on_lost()
                        break
                except Exception as e:  # unreachable store: try again; the TTL decides
                    log.warning("lease %s keepalive failed: %s", key, e)
            with self._keepers_lock:
                if self._keepers.get(key, (None, None))[1] is stop:
                    del self._keepers[key]

        t = threading.Thread(target=run, name=f"zfast-lease-{key}", daemon=True)
        with self._keepers_lock:
            self._keepers[key] = (node, stop, t)
        t.start()

    def _stop_keeper(self, key: str) -> None:
        with self._keepers_lock:
            k = self._keepers.pop(key, None)
        if k:
            k[1].set()
            if k[2] is not threading.current_thread():
                k[2].join(2.0)

    # --- life --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop watches and lease keepalives (held leases expire after their TTL)."""
        for w in self._watches:
            w.stop()
        self._watches.clear()
        with self._keepers_lock:
            keys = list(self._keepers)
        for key in keys:
            self._stop_keeper(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SQLITE_KEYS = {"kind", "path", "max_events"}
_ETCD_KEYS = {"kind", "endpoints", "timeout_s", "max_events", "cache_path"}


def open_store(spec: dict | None, state_dir: Path, node: str) -> Store:
    """The store a project file's ``store:`` section asks for (None: SQLite in state_dir)."""
    spec = {"kind": "sqlite"} if spec is None else spec
    if not isinstance(spec, dict):
        raise StoreError(f"store: {spec!r} is not a mapping (e.g. {{kind: sqlite}})")
    kind = spec.get("kind", "sqlite")
    if kind not in KINDS:
        raise StoreError(f"store.kind: {kind!r} is not one of {', '.join(KINDS)}")
    allowed = _SQLITE_KEYS if kind == "sqlite" else _ETCD_KEYS
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise StoreError(f"store.{unknown[0]}: unknown key for kind {kind} "
                         f"(known: {', '.join(sorted(allowed))})")
    max_events = spec.get("max_events", DEFAULT_MAX_EVENTS)
    if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
        raise StoreError(f"store.max_events: {max_events!r} is not a positive integer")
    state_dir = Path(state_dir)
    if kind == "sqlite":
        # cycle: zfast.store.sqlite and .etcd import this module (Store, StoreError, ...)
        from zfast.store.sqlite import SqliteStore  # noqa: PLC0415
        path = spec.get("path", state_dir / "store.sqlite")
        if not isinstance(path, (str, Path)) or not str(path):
            raise StoreError(f"store.path: {path!r} is not a file path")
        return SqliteStore(Path(path), node, max_events=max_events)

    from zfast.store.etcd import EtcdStore, check_endpoints  # noqa: PLC0415 -- cycle
    endpoints = check_endpoints(spec.get("endpoints"))
    timeout = spec.get("timeout_s", 2.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise StoreError(f"store.timeout_s: {timeout!r} is not a positive number")
    cache = spec.get("cache_path", state_dir / "etcd-cache.sqlite")
    if not isinstance(cache, (str, Path)) or not str(cache):
        raise StoreError(f"store.cache_path: {cache!r} is not a file path")
    return EtcdStore(endpoints, node, cache_path=Path(cache), timeout=float(timeout),
                     max_events=max_events)


__all__ = ["Revision", "Store", "StoreError", "Watch", "open_store", "DEFAULT_MAX_EVENTS"]
