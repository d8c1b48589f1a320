"""Health checks of service backends: ``services[].health`` of the project file.

One thread checks every backend of every service over one selector (epoll), and a second one
reports what changed: 1,000 backends cost those two threads and, at any moment, one socket
per check in flight, not a thread each.

The rules (docs/datapath.md, "Decisions", says what the data plane does with them):

* **What is checked.** Each backend of a service that has a ``health`` section, at its own
  address and the service's first ``tcp`` port's ``target_port`` (a service with UDP ports
  only is not checked: it is listed in ``status()["unchecked"]``). Checks leave from the
  node's own network namespace, like the balanced traffic. Drained backends (weight 0) are
  checked too: their health is reported, and an unhealthy one's flows move (see below).
* **kind tcp**: the connection is accepted. It is then closed with a reset, so that checks
  leave no TIME_WAIT sockets behind on the balancer (5,000 checks a second would).
  **kind http**: ``GET <path> HTTP/1.0`` with ``Host`` and ``Connection: close``; a status
  line of 2xx or 3xx is healthy, anything else (4xx, 5xx, not HTTP, closed) is not. The
  answer is read to its end (the server closes first: no TIME_WAIT here, no reset in the
  server's log) unless it is longer than 8 KiB or slower than the timeout, where the status
  line alone decides.
* **When.** Every backend every ``interval_ms``, on a fixed beat (a check starts at
  ``first + k * interval``, whatever the previous one took); a beat that the loop misses is
  skipped, never made up in a burst. A check fails after ``min(0.8 x interval, 5 s)``
  without an answer, so it always ends before the next one starts. The first check of a
  backend comes at a stable offset inside its first interval (a hash of service and
  address), so that 1,000 backends do not all connect in the same millisecond.
* **Counting.** ``fall`` failed checks in a row take a backend out (``on_change(target,
  False)``), ``rise`` good checks in a row bring it back (``on_change(target, True)``);
  ``on_change`` is called on those transitions only, outside the controller's locks.
* **Reporting** runs in a thread of its own once ``start()`` ran (without it, ``run_once``
  reports inline): rebuilding a Maglev table takes tens of milliseconds, and the checks of
  the other backends keep their beat meanwhile. With ``on_batch``, the transitions that
  piled up go to it in one list (the node's wiring rebuilds each service's ring once per
  batch, not once per backend: 1,000 backends failing together cost a few rebuilds, not
  1,000). Only the latest word on each backend is kept; a report that raises is made
  again (``status()["error"]`` says why meanwhile): the receiver never stays behind.
* **Start optimistic.** A backend is healthy until ``fall`` checks say otherwise: a node
  that restarts (or a service that is added) does not drain every backend for ``rise``
  intervals first; a dead one is out after ``fall`` intervals, as in steady state.
* **Forgetting.** When a backend is no longer checked (removed from its service, or its
  service's ``health`` section removed), its state is dropped, and when it was down
  ``on_change(target, True)`` says so: a backend nobody checks counts as healthy. The
  receiver (``ServiceTable.set_health``) can therefore keep its own record without ever
  disagreeing with the controller for longer than one refresh.

``for_node(node)`` wires a controller into a running ``zfast.node.daemon.Node``.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import logging
import os
import re
import resource
import selectors
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from zfast.config import Health, Service

log = logging.getLogger("zfast.health")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TIMEOUT_FRACTION = 0.8      # of the interval: a check ends before the next one starts
MAX_TIMEOUT_S = 5.0
REFRESH_S = 1.0             # targets() is read again at least this often
MAX_RESPONSE = 8192         # bytes of an HTTP answer read before judging it
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)?[ \t]+(\d{3})(?:[ \t]|\r?$)")


@dataclass(frozen=True)
class Target:
    """One backend to check: of service `service`, at `address`:`port`, as `health` says."""
    service: str
    address: IPAddress
    port: int
    health: Health

    @property
    def key(self) -> tuple[str, IPAddress]:
        return (self.service, self.address)

    @property
    def interval(self) -> float:
        return self.health.interval_ms / 1000.0

    @property
    def timeout(self) -> float:
        return min(self.interval * TIMEOUT_FRACTION, MAX_TIMEOUT_S)


def check_port(service: Service) -> int | None:
    """The port health checks of a service use: its first tcp port's target_port."""
    return next((p.target_port for p in service.ports if p.proto == "tcp"), None)


def targets_of(services: Iterable[Service]) -> list[Target]:
    """Every backend to check, for services with a ``health`` section and a tcp port."""
    out = []
    for svc in services:
        port = check_port(svc)
        if svc.health is None or port is None:
            continue
        out += [Target(svc.name, b.address, port, svc.health) for b in svc.backends]
    return out


def unchecked_of(services: Iterable[Service]) -> list[str]:
    """Services with a ``health`` section that cannot be checked (no tcp port)."""
    return [s.name for s in services if s.health is not None and check_port(s) is None]


# ---- the checks themselves: non-blocking sockets over one selector ------------------------

Result = tuple[tuple, bool, str]   # (target key, healthy, what was seen)


class Prober(Protocol):
    """What the controller needs from its checker (tests give a fake one)."""

    def start(self, key: tuple, target: Target, timeout: float) -> None: ...
    def poll(self, timeout: float) -> list[Result]: ...
    def next_deadline(self) -> float | None: ...
    def inflight(self) -> int: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


class _Check:
    __slots__ = ("key", "target", "sock", "deadline", "request", "buf", "connected")

    def __init__(self, key, target, sock, deadline):
        self.key, self.target, self.sock, self.deadline = key, target, sock, deadline
        self.request = b""
        self.buf = b""
        self.connected = False


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


class SocketProber:
    """TCP and HTTP checks on non-blocking sockets, all driven by ``poll()`` in one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self.checks: dict[tuple, _Check] = {}
        self._deadlines: list[tuple[float, int, tuple]] = []
        self._seq = itertools.count()
        self._results: list[Result] = []
        # one descriptor per check in flight; keep some for the rest of the daemon
        self.max_inflight = max(16, min(8192, raise_fd_limit() // 2 - 64))

    def inflight(self) -> int:
        return len(self.checks)

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, _, key = self._deadlines[0]
            check = self.checks.get(key)
            if check is not None and check.deadline == deadline:
                return deadline
            heapq.heappop(self._deadlines)   # its check is over
        return None

    def start(self, key: tuple, target: Target, timeout: float) -> None:
        if key in self.checks:          # the previous one has not ended: let it
            return
        family = socket.AF_INET6 if target.address.version == 6 else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as err:
            self._results.append((key, False, f"socket: {err.strerror}"))
            return
        code = sock.connect_ex((str(target.address), target.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._results.append((key, False, _strerror(code)))
            return
        check = _Check(key, target, sock, self.clock() + timeout)
        if target.health.kind == "http":
            host = (f"[{target.address}]" if target.address.version == 6
                    else str(target.address))
            check.request = (f"GET {target.health.path or '/'} HTTP/1.0\r\n"
                             f"Host: {host}:{target.port}\r\n"
                             "User-Agent: zfast-health\r\nAccept: */*\r\n"
                             "Connection: close\r\n\r\n").encode()
        self.checks[key] = check
        heapq.heappush(self._deadlines, (check.deadline, next(self._seq), key))
        self.sel.register(sock, selectors.EVENT_WRITE, check)

    def poll(self, timeout: float) -> list[Result]:
        if self._results:      # failures known at start(): report them without waiting
            timeout = 0.0
        for sk, mask in self.sel.select(max(0.0, timeout)):
            check = sk.data
            if check is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if self.checks.get(check.key) is check:
                try:
                    self._progress(check)
                except OSError as err:
                    self._finish(check, False, _strerror(err.errno) if err.errno else str(err))
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, key = heapq.heappop(self._deadlines)
            check = self.checks.get(key)
            if check is not None and check.deadline == deadline:
                if b"\n" in check.buf:     # the status line came, the rest is slow: judge it
                    self._finish(check, *judge_http(check.buf))
                    continue
                what = "timeout" if not check.connected else "timeout waiting for the answer"
                self._finish(check, False, f"{what} ({check.target.timeout * 1000:.0f} ms)")
        out, self._results = self._results, []
        return out

    def _progress(self, check: _Check) -> None:
        sock = check.sock
        if not check.connected:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._finish(check, False, _strerror(code))
                return
            check.connected = True
            if not check.request:                          # tcp: accepted is all we ask
                self._finish(check, True, "connected")
                return
            self.sel.modify(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, check)
        if check.request:
            try:
                sent = sock.send(check.request)
                check.request = check.request[sent:]
            except BlockingIOError:
                pass
            if not check.request:
                self.sel.modify(sock, selectors.EVENT_READ, check)
            return
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        check.buf += data
        if data and len(check.buf) < MAX_RESPONSE:
            return    # read to the end: the server closes first, no reset in its logs
        ok, what = judge_http(check.buf)
        self._finish(check, ok, what, reset=bool(data))

    def _finish(self, check: _Check, ok: bool, what: str, reset: bool = True) -> None:
        self.checks.pop(check.key, None)
        try:
            self.sel.unregister(check.sock)
        except (KeyError, ValueError):
            pass
        if check.connected and reset:
            try:   # a reset, not a FIN: no TIME_WAIT on the balancer
                check.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        check.sock.close()
        self._results.append((check.key, ok, what))

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass   # already awake (buffer full) or closed

    def close(self) -> None:
        for check in list(self.checks.values()):
            self._finish(check, False, "stopped")
        self._results.clear()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def judge_http(answer: bytes) -> tuple[bool, str]:
    """(healthy, what) of the start of an HTTP answer: 2xx and 3xx are healthy."""
    if not answer:
        return False, "closed without an answer"
    m = _STATUS_LINE.match(answer.split(b"\n", 1)[0])
    if not m:
        return False, f"not an HTTP answer: {answer[:40]!r}"
    code = int(m.group(1))
    return 200 <= code < 400, f"http {code}"


def _strerror(code: int) -> str:
    try:
        return os.strerror(code).lower()
    except (TypeError, ValueError):
        return str(code)


# ---- the controller: schedule, count, report ------------------------------------------------

@dataclass
class _State:
    target: Target
    due: float                 # when the next check starts (controller clock)
    healthy: bool = True       # optimistic start
    fails: int = 0             # failed checks in a row
    oks: int = 0               # good checks in a row
    checks: int = 0
    last: str = ""             # what the last check saw
    changed: float | None = None   # wall time of the last transition


class HealthController:
    """Checks ``targets()`` and calls ``on_change(target, healthy)`` on every transition
    (or ``on_batch([(target, healthy), ...])`` once a round, when given).

    ``targets`` is called again every ``REFRESH_S`` and after ``refresh()``; it must be cheap
    and thread-safe (the node's is: a list built from its current project). ``on_change`` runs
    in the controller's thread, outside its locks. ``clock`` and ``prober`` are for tests.
    """

    def __init__(self, targets: Callable[[], list[Target]],
                 on_change: Callable[[Target, bool], None],
                 clock: Callable[[], float] = time.monotonic,
                 prober: Prober | None = None, jitter: bool = True,
                 unchecked: Callable[[], list[str]] | None = None,
                 on_batch: Callable[[list[tuple[Target, bool]]], None] | None = None):
        self.targets = targets
        self.on_change = on_change
        self.on_batch = on_batch
        self._undelivered: dict[tuple, tuple[Target, bool]] = {}
        self.clock = clock
        self.prober = prober if prober is not None else SocketProber(clock)
        self.jitter = jitter
        self.unchecked = unchecked or (lambda: [])
        self._states: dict[tuple, _State] = {}
        self._heap: list[tuple[float, int, tuple]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()        # _states as status() sees it
        self._refresh_at = float("-inf")     # load targets at the first round
        self._refresh_asked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reporter: threading.Thread | None = None
        self._report_lock = threading.Lock()       # _undelivered, between the two threads
        self._report_now = threading.Event()
        self.rounds = 0
        self.checks = 0
        self.late_max = 0.0                  # worst start lateness of a check, seconds
        self.error: str | None = None        # the last exception of a round, if any
        self.report_error: str | None = None  # the last exception of a report, if any

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self._reporter = threading.Thread(target=self._report_loop, name="zfast-health-report",
                                          daemon=True)
        self._reporter.start()
        self._thread = threading.Thread(target=self._run, name="zfast-health", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.prober.wake()
        self._report_now.set()
        for thread in (self._thread, self._reporter):
            if thread is not None:
                thread.join(timeout)
        self._thread = self._reporter = None
        self.prober.close()

    def refresh(self) -> None:
        """Read targets() again at the next round (after an apply); returns at once."""
        self._refresh_asked = True
        self.prober.wake()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                self.error = None
            except Exception as err:   # one bad round must not end health checking
                log.exception("health round failed")
                self.error = f"{type(err).__name__}: {err}"
                self._stop.wait(0.1)

    def _report_loop(self) -> None:
        while not self._stop.is_set():
            self._report_now.wait()
            self._report_now.clear()
            if self._stop.is_set():
                return
            try:
                self._report()
                self.report_error = None
            except Exception as err:   # the maps refused: the same word again shortly
                log.exception("health report failed")
                self.report_error = f"{type(err).__name__}: {err}"
                self._stop.wait(0.2)
                self._report_now.set()

    # ---- one round: start what is due, wait for answers, count them ----------------

    def run_once(self, max_wait: float | None = None) -> list[tuple[Target, bool]]:
        """Start the checks that are due, wait for answers until the next thing to do
        (at most max_wait seconds), count them; returns (and reports) the transitions."""
        changes: list[tuple[Target, bool]] = []
        now = self.clock()
        if now >= self._refresh_at or self._refresh_asked:
            self._refresh_asked = False       # before targets() is read: no ask is lost
            changes += self._load(now)
        self._start_due(now)
        wait = self._next_wake() - now
        if max_wait is not None:
            wait = min(wait, max_wait)
        results = self.prober.poll(max(0.0, wait))
        with self._lock:
            for key, ok, what in results:
                change = self._count(key, ok, what)
                if change:
                    changes.append(change)
        self.rounds += 1
        if changes:
            with self._report_lock:
                for target, healthy in changes:       # the latest word on each backend
                    self._undelivered.pop(target.key, None)
                    self._undelivered[target.key] = (target, healthy)
        if self._reporter is not None:
            if changes:
                self._report_now.set()
        else:
            self._report()     # no reporter thread (tests): report here; raises to the caller
        return changes

    def _report(self) -> None:
        """Report what waits; what raises stays for the next try (unless newer came)."""
        with self._report_lock:
            batch = list(self._undelivered.values())
        if not batch:
            return

        def done(items):
            with self._report_lock:
                for target, healthy in items:
                    if self._undelivered.get(target.key) == (target, healthy):
                        del self._undelivered[target.key]

        if self.on_batch is not None:
            self.on_batch(batch)
            done(batch)
            return
        for item in batch:
            self.on_change(*item)
            done([item])

    def _load(self, now: float) -> list[tuple[Target, bool]]:
        wanted = {t.key: t for t in self.targets()}
        forgotten = []
        with self._lock:
            for key in [k for k in self._states if k not in wanted]:
                state = self._states.pop(key)
                if not state.healthy:
                    forgotten.append((state.target, True))   # unchecked counts as healthy
            for key, target in wanted.items():
                state = self._states.get(key)
                if state is None:
                    first = now + (self._offset(key) * target.interval if self.jitter else 0.0)
                    self._states[key] = _State(target, first)
                    self._push(first, key)
                elif state.target != target:
                    old = state.target
                    state.target = target
                    if target.interval < old.interval and state.due > now + target.interval:
                        state.due = now + target.interval
                        self._push(state.due, key)
        self._refresh_at = now + REFRESH_S
        return forgotten

    @staticmethod
    def _offset(key: tuple) -> float:
        return zlib.crc32(f"{key[0]}|{key[1]}".encode()) / 2**32

    def _push(self, due: float, key: tuple) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), key))

    def _start_due(self, now: float) -> None:
        cap = getattr(self.prober, "max_inflight", None)
        while self._heap and self._heap[0][0] <= now:
            if cap is not None and self.prober.inflight() >= cap:
                return   # the rest waits for a free slot (poll returns when one ends)
            due, _, key = heapq.heappop(self._heap)
            state = self._states.get(key)
            if state is None or state.due != due:
                continue   # forgotten or moved
            target = state.target
            self.late_max = max(self.late_max, now - due)
            self.prober.start(key, target, target.timeout)
            self.checks += 1
            nxt = due + target.interval
            if nxt <= now:                 # missed beats are skipped, not made up
                nxt = now + target.interval
            state.due = nxt
            self._push(nxt, key)

    def _next_wake(self) -> float:
        times = [float("-inf") if self._refresh_asked else self._refresh_at]
        cap = getattr(self.prober, "max_inflight", None)
        if self._heap and (cap is None or self.prober.inflight() < cap):
            times.append(self._heap[0][0])
        deadline = self.prober.next_deadline()
        if deadline is not None:
            times.append(deadline)
        return min(times)

    def _count(self, key: tuple, ok: bool, what: str) -> tuple[Target, bool] | None:
        """One check's result into its backend's counts (lock held); a transition or None."""
        state = self._states.get(key)
        if state is None:
            return None    # forgotten while its check was in flight
        state.checks += 1
        state.last = what
        if ok:
            state.oks, state.fails = state.oks + 1, 0
            if not state.healthy and state.oks >= state.target.health.rise:
                state.healthy, state.changed = True, time.time()
                return state.target, True
        else:
            state.fails, state.oks = state.fails + 1, 0
            if state.healthy and state.fails >= state.target.health.fall:
                state.healthy, state.changed = False, time.time()
                return state.target, False
        return None

    # ---- read -------------------------------------------------------------------

    def state(self, service: str, address) -> dict | None:
        key = (service, ipaddress.ip_address(address) if isinstance(address, str) else address)
        with self._lock:
            st = self._states.get(key)
            return None if st is None else self._describe(st)

    @staticmethod
    def _describe(st: _State) -> dict:
        return {"service": st.target.service, "address": str(st.target.address),
                "port": st.target.port, "kind": st.target.health.kind, "healthy": st.healthy,
                "fails": st.fails, "oks": st.oks, "checks": st.checks, "last": st.last,
                "changed": st.changed}

    def status(self) -> dict:
        """For `zfast status` (controllers.health)."""
        with self._lock:
            down = [self._describe(s) for s in self._states.values() if not s.healthy]
            count = len(self._states)
        running = self._thread is not None and self._thread.is_alive()
        with self._report_lock:
            waiting = len(self._undelivered)
        return {"healthy": running and self.error is None and self.report_error is None,
                "running": running, "targets": count, "down": down, "checks": self.checks,
                "late_max_ms": round(self.late_max * 1000, 1),
                "error": self.error or self.report_error, "unreported": waiting,
                "unchecked": self.unchecked()}


# ---- the node's wiring ---------------------------------------------------------------------

def for_node(node) -> HealthController:
    """A health controller over a ``zfast.node.daemon.Node``'s services: its results go into the
    node's ServiceTable (set_health_many: each service's ring rebuilt once a round) and, for
    each backend whose state in the maps changed, into its event log as a ``backend`` event.
    Start it after the maps are filled; refresh() it after each apply; stop() it first."""
    ctrl: HealthController

    def targets() -> list[Target]:
        return targets_of(node.project.services)

    def on_batch(batch: list[tuple[Target, bool]]) -> None:
        changes = node.table.set_health_many([(t.service, t.address, h) for t, h in batch])

        def own(t: Target) -> list[str]:
            return [c for c in changes if c.startswith(f"~ backend {t.service} {t.address} ")]

        # backends whose state in the maps changed (not: no checks there, not installed)
        changed = [(t, h) for t, h in batch if own(t)]
        last_of = {t.service: t.key for t, _ in changed}
        for target, healthy in changed:
            lines = own(target)
            if last_of[target.service] == target.key:   # the service's own lines go once
                lines += [c for c in changes if f"service {target.service}:" in c]
            seen = ctrl.state(target.service, target.address)
            node.events.log("backend", service=target.service, address=str(target.address),
                            healthy=healthy, check=target.health.kind, port=target.port,
                            last=seen["last"] if seen else "no longer checked",
                            changes=lines)

    def on_change(target: Target, healthy: bool) -> None:
        on_batch([(target, healthy)])

    ctrl = HealthController(targets, on_change, on_batch=on_batch,
                            unchecked=lambda: unchecked_of(node.project.services))
    return ctrl
