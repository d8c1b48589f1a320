"""Client-side traffic for the lab: real TCP connections and UDP datagrams to a VIP.

Runs inside a namespace (netns.in_ns) in threads; every function returns what
it saw, so that tests and the demo can judge it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zfast.lab.netns import in_ns


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_hello(host: str, port: int, timeout: float = 5.0) -> str:
    """Connect, read the backend's name line, close."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        f = s.makefile("rb")
        return f.readline().decode().strip()


def udp_hello(host: str, port: int, payload: bytes = b"hi", timeout: float = 2.0) -> str:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, (host, port))
        data, _ = s.recvfrom(2048)
        return data.decode().split(" ", 1)[0]


@dataclass
class ConnectResult:
    backends: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def many_connections(ns: str, host: str, port: int, count: int, workers: int = 32,
                     timeout: float = 5.0) -> ConnectResult:
    """count short TCP connections from namespace ns; which backend answered each."""
    result = ConnectResult()
    lock = threading.Lock()

    def one(_):
        with in_ns(ns):
            try:
                name = tcp_hello(host, port, timeout)
            except OSError as err:
                with lock:
                    result.failures.append(f"{type(err).__name__}: {err}")
                return
        with lock:
            result.backends[name] += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return result


class Stream:
    """A long-lived TCP connection that echoes lines: tells whether it broke or moved."""

    def __init__(self, ns: str, host: str, port: int, timeout: float = 5.0):
        with in_ns(ns):
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.backend = self.file.readline().decode().strip()
        self.sent = 0
        self.error: str | None = None

    def ping(self) -> bool:
        """Send one numbered line and expect it back; False (and error set) if broken."""
        if self.error:
            return False
        line = f"{self.sent}\n".encode()
        try:
            self.sock.sendall(line)
            echo = self.file.readline()
        except OSError as err:
            self.error = f"{type(err).__name__}: {err}"
            return False
        if echo != line:
            self.error = f"expected {line!r}, got {echo!r}"
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def streams_alive(streams: list[Stream], rounds: int = 1, pause: float = 0.0) -> list[Stream]:
    """Ping every stream `rounds` times; return the broken ones."""
    for _ in range(rounds):
        for s in streams:
            s.ping()
        if pause:
            time.sleep(pause)
    return [s for s in streams if s.error]
