"""Waiting for something to become true: one poll loop (wait_for) and what is built on it."""

from __future__ import annotations

import socket
import time

from zfast.lab import topology
from zfast.lab.netns import in_ns


def wait_for(what: str, check, timeout: float, every: float = 0.05):
    """Poll check() until it returns something truthy; its value, or AssertionError after
    timeout with the last value or exception."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except Exception as e:     # noqa: BLE001 - reported on timeout
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(every)


def wait_tcp(ns: str | None, host: str, port: int, timeout: float = 10.0,
             every: float = 0.05) -> None:
    """Until host:port accepts a TCP connection from namespace ns."""
    def accepts():
        with in_ns(ns):
            socket.create_connection((host, port), timeout=1).close()
        return True
    wait_for(f"{host}:{port} in {ns}", accepts, timeout, every)


def wait_accepting(ns: str, addresses, port: int = topology.TARGET_TCP,
                   timeout: float = 20.0) -> None:
    """Until a server accepts on every address (tried from namespace ns), all within
    timeout."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        wait_tcp(ns, address, port, max(0.0, deadline - time.monotonic()), every=0.1)
