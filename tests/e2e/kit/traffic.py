"""Traffic of the end-to-end tests, from a client namespace through the VIPs.

    PortPool, hello_from, connections, spread   short TCP connections from chosen source
                 ports: a test's 5-tuples are the same on every run, so its outcome (which
                 backend each connection reaches) is reproducible, not a dice roll
    udp_answers  datagrams each from a socket of its own: who answered
    Pinger       long-lived streams (zfast.lab.probe.Stream) pinged in the background:
                 when each ping came back, so a gap in delivery is measured
    UdpFlow      numbered datagrams every few ms and their replies: losses, duplicates,
                 reordering, the gap
    send_udp     one datagram from any namespace (e.g. a forged heartbeat)
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
import statistics
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zfast.lab import topology
from zfast.lab.netns import in_ns
from zfast.lab.probe import Stream


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port() -> int:
    """A TCP port nothing listens on now (on loopback of this namespace)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- short connections

class PortPool:
    """Hands out source ports, each once per lab: a reused 4-tuple would meet the client's
    TIME_WAIT (connect fails) or the balancer's flow entry of the earlier connection."""

    def __init__(self, first: int = 10000, last: int = 32000):
        self.next, self.last = first, last
        self.lock = threading.Lock()

    def take(self, count: int) -> range:
        with self.lock:
            if self.next + count > self.last:
                raise RuntimeError("source ports used up")
            ports = range(self.next, self.next + count)
            self.next += count
            return ports


def hello_from(ns: str, host: str, port: int, sport: int, timeout: float = 5.0,
               reset: bool = False) -> str:
    """One TCP connection from source port sport: the backend's name line.
    reset=True closes with RST (no TIME_WAIT, so the same 4-tuple can connect again)."""
    with in_ns(ns):
        s = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(timeout)
        s.bind(("", sport))
        s.connect((host, port))
        line = s.makefile("rb").readline().decode().strip()
        if not line:
            raise ConnectionError("connection closed before the backend said its name")
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return line
    finally:
        s.close()


@dataclass
class Spread:
    by_port: dict[int, str] = field(default_factory=dict)    # source port -> backend name
    failures: dict[int, str] = field(default_factory=dict)   # source port -> error

    @property
    def backends(self) -> Counter:
        return Counter(self.by_port.values())


def spread(sports, fetch, workers: int = 32) -> Spread:
    """fetch(sport) -> backend name for each source port in sports, in parallel."""
    out = Spread()
    lock = threading.Lock()

    def one(sport):
        try:
            name = fetch(sport)
        except OSError as err:
            with lock:
                out.failures[sport] = f"{type(err).__name__}: {err}"
            return
        with lock:
            out.by_port[sport] = name

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, sports))
    return out


def connections(ns: str, host: str, port: int, sports, workers: int = 32,
                timeout: float = 5.0, reset: bool = False) -> Spread:
    """One connection from each source port in sports, in parallel."""
    return spread(sports, lambda sport: hello_from(ns, host, port, sport, timeout, reset), workers)


# ---------------------------------------------------------------- datagrams

def udp_answers(ns: str, host: str, port: int, count: int, workers: int = 16,
                timeout: float = 2.0, tries: int = 3) -> tuple[Counter, list[str], int]:
    """count datagrams, each from its own socket (own source port): who answered each,
    what went wrong, and how many were sent again after a lost answer (up to `tries`)."""
    backends, failures = Counter(), []
    resent = [0]
    lock = threading.Lock()

    def one(i):
        with in_ns(ns):
            s = socket.socket(_family(host), socket.SOCK_DGRAM)
        with s:
            s.settimeout(timeout)
            err = None
            for attempt in range(tries):  # UDP may lose one; a silent service never answers
                if attempt:
                    with lock:
                        resent[0] += 1
                payload = f"q{i}".encode()
                try:
                    s.sendto(payload, (host, port))
                    data, source = s.recvfrom(2048)
                except OSError as e:
                    err = f"{type(e).__name__}: {e}"
                    continue
                name, _, echoed = data.decode().partition(" ")
                if echoed != payload.decode():
                    err = f"answer {data!r} does not echo {payload!r}"
                    continue
                if (ipaddress.ip_address(source[0]), source[1]) != (ipaddress.ip_address(host), port):
                    # the reply must come back from the VIP (reverse NAT), not the backend
                    err = f"answer from {source[0]} port {source[1]}, not from {host} port {port}"
                    break
                with lock:
                    backends[name] += 1
                return
        with lock:
            failures.append(f"datagram {i}: {err}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return backends, failures, resent[0]


def send_udp(ns: str, dest: str, data: bytes, port: int) -> None:
    with in_ns(ns):
        s = socket.socket(_family(dest), socket.SOCK_DGRAM)
    with s:
        s.sendto(data, (dest, port))


# ---------------------------------------------------------------- long-lived streams

class Pinger:
    """Pings every stream (zfast.lab.probe.Stream) in the background and notes, per stream,
    when each ping that came back was sent and when it came back.

    One thread pings them all in turn, round after round, `pause` after each round; or,
    with thread_per_stream, every stream has a thread of its own and pings `pause` apart:
    a stream that stalls (a failover) then delays no other, so the gap in delivery is each
    stream's own. A stream that breaks stays broken (Stream.error) and is pinged no more.
    `timeout` bounds wait_rounds and the join of the threads at the end."""

    def __init__(self, streams: list[Stream], pause: float = 0.0, timeout: float = 120.0,
                 thread_per_stream: bool = False):
        self.streams, self.pause, self.timeout = streams, pause, timeout
        self.sent: list[list[float]] = [[] for _ in streams]   # per stream: pings that came back
        self.ok: list[list[float]] = [[] for _ in streams]     # ... and when they did
        self.failure: str | None = None      # an exception that stopped a pinging thread
        self._stop = threading.Event()
        if thread_per_stream:
            self._threads = [threading.Thread(target=self._guarded, args=(self._ping_one, n),
                                              daemon=True) for n in range(len(streams))]
        else:
            self._threads = [threading.Thread(target=self._guarded, args=(self._ping_all,),
                                              daemon=True)]

    def _ping(self, n: int) -> bool:
        t0 = time.monotonic()
        if not self.streams[n].ping():
            return False
        self.sent[n].append(t0)
        self.ok[n].append(time.monotonic())
        return True

    def _ping_all(self) -> None:
        while not self._stop.is_set():
            for n in range(len(self.streams)):
                self._ping(n)
            if self.pause:
                self._stop.wait(self.pause)

    def _ping_one(self, n: int) -> None:
        while not self._stop.is_set():
            if not self._ping(n):
                return
            self._stop.wait(self.pause)

    def _guarded(self, run, *args) -> None:
        try:
            run(*args)
        except Exception as err:  # noqa: BLE001 - wait_rounds reports it
            self.failure = f"{type(err).__name__}: {err}"

    def __enter__(self) -> "Pinger":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout)

    @property
    def rounds(self) -> int:
        """Pings come back of the unbroken stream that has had the fewest."""
        return min((len(times) for times, s in zip(self.ok, self.streams) if not s.error),
                   default=0)

    def wait_rounds(self, n: int, timeout: float | None = None) -> None:
        """Until every stream has had n more pings come back, each sent after this call
        (so an echo of a ping on its way now does not count), or broke."""
        timeout = self.timeout if timeout is None else timeout
        since = time.monotonic()
        deadline = since + timeout

        def behind() -> list[int]:
            return [i for i, (sent, s) in enumerate(zip(self.sent, self.streams))
                    if not s.error and len(sent) - bisect.bisect_left(sent, since) < n]

        while slow := behind():
            assert self.failure is None, f"the pinger stopped: {self.failure}"
            if time.monotonic() > deadline:
                raise AssertionError(f"streams {slow[:10]} did not ping {n} more times in "
                                     f"{timeout} s")
            time.sleep(0.005)

    def broken(self) -> list[str]:
        return [f"stream {n} ({s.backend}): {s.error}" for n, s in enumerate(self.streams) if s.error]

    def gaps_after(self, t: float) -> list[float]:
        """Per stream: the longest time between two successful pings, of those intervals
        that end after t (the failure at t): the gap in delivery it caused."""
        out = []
        for times in self.ok:
            gaps = [b - a for a, b in zip(times, times[1:]) if b > t]
            out.append(max(gaps) if gaps else float("inf"))
        return out


def summary(gaps: list[float]) -> dict:
    """Median, 90th percentile, max and min of gaps (seconds), in ms."""
    if not gaps:
        return {}
    return {"n": len(gaps), "median_ms": round(statistics.median(gaps) * 1000, 1),
            "p90_ms": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1000, 1),
            "max_ms": round(max(gaps) * 1000, 1), "min_ms": round(min(gaps) * 1000, 1)}


# ---------------------------------------------------------------- a UDP flow

class UdpFlow:
    """One UDP flow (one socket, one source port) to a VIP: datagram n every `period`
    seconds, the backend answers "<name> n". What came back, and when."""

    def __init__(self, ns: str, vip: str, port: int = topology.UDP_PORT, period: float = 0.01):
        with in_ns(ns):
            self.sock = socket.socket(_family(vip), socket.SOCK_DGRAM)
        self.sock.connect((vip, port))
        self.sock.settimeout(0.2)
        self.local_port = self.sock.getsockname()[1]
        self.period = period
        self.sent: dict[int, float] = {}
        self.replies: list[tuple[int, float, str]] = []   # (number, time, backend), as received
        self.bad: list[bytes] = []
        self._stop = threading.Event()
        self._stop_sending = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]

    def _send(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop_sending.is_set():
            self.sent[n] = time.monotonic()
            try:
                self.sock.send(f"{n}".encode())
            except OSError:
                pass
            n += 1
            next_at += self.period
            self._stop_sending.wait(max(0.0, next_at - time.monotonic()))

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            name, _, number = data.decode(errors="replace").partition(" ")
            if not number.isdigit():
                self.bad.append(data)
                continue
            self.replies.append((int(number), time.monotonic(), name))

    def __enter__(self) -> "UdpFlow":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop_sending.set()
            self._threads[0].join(timeout=5)
            # the last answers: until the last datagram's came (or a second passed)
            deadline, last = time.monotonic() + 1.0, len(self.sent) - 1
            while time.monotonic() < deadline and not any(n == last for n, _, _ in self.replies[-20:]):
                time.sleep(0.02)
            time.sleep(0.05)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.sock.close()

    def report(self, after: float | None = None) -> dict:
        """What came back. after: when the failure happened; the gap is the longest time
        without an answer that ends after it, and every datagram lost must have been sent
        inside that gap (lost_outside counts the others)."""
        numbers = [n for n, _, _ in self.replies]
        times = [t for _, t, _ in self.replies]
        dup = len(numbers) - len(set(numbers))
        swaps = [(a, b, round(tb - (after or times[0]), 3))
                 for (a, _, _), (b, tb, _) in zip(self.replies, self.replies[1:]) if b < a]
        reordered = len(swaps)
        lost = sorted(set(self.sent) - set(numbers))
        gaps = [(b - a, a, b) for a, b in zip(times, times[1:])]
        out = {"sent": len(self.sent), "answered": len(set(numbers)), "duplicates": dup,
               "reordered": reordered, "swaps": swaps[:5], "lost": len(lost), "lost_numbers": _ranges(lost),
               "backends": sorted({b for _, _, b in self.replies}), "bad": len(self.bad),
               "max_gap_ms": round(max(gaps, default=(0,))[0] * 1000, 1)}
        if after is not None:
            gap, start, end = max((g for g in gaps if g[2] > after), default=(0.0, after, after))
            # sent inside the gap: from a round trip before its start to its end
            outside = [n for n in lost if not (start - 0.1 <= self.sent[n] <= end)]
            out.update(gap_after_ms=round(gap * 1000, 1), lost_outside=_ranges(outside))
        return out


def _ranges(numbers: list[int]) -> list[str]:
    out = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in out]
