"""Helpers of the zfast end-to-end tests: traffic from chosen source ports, the CLI as a
subprocess, XDP state of a namespace, and an oracle of the data plane's backend choice.

Connections here bind their source port, so a test's 5-tuples are the same on every run:
its outcome (which backend each connection reaches) is reproducible, not a dice roll.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from zfast import lab, maglev
from zfast.api import Client
from zfast.netns import Topology, in_ns
from zfast.paths import pin_dir

REPO = Path(__file__).resolve().parents[2]
ZFAST = [sys.executable, "-m", "zfast.cli"]


# ---------------------------------------------------------------- source ports

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


# ---------------------------------------------------------------- the lab

NEED_ROOT = "e2e tests need root (network namespaces, XDP); run them as root: ./run.sh test"


@dataclass
class Env:
    lab: lab.Lab
    api: Client | None          # the running node's API (None while no node runs)
    ports: PortPool
    names: dict[str, str]       # backend address -> backend name

    @property
    def state_dir(self) -> Path:
        return self.lab.state_dir


@contextmanager
def lab_env(prefix: str, weights=(1, 1, 2), start_node: bool = True) -> Iterator[Env]:
    """The standard lab with echo servers (and a node), torn down whatever happens."""
    # Fail, never skip: a run without root must not look like a green one.
    assert os.geteuid() == 0, NEED_ROOT
    with Topology(prefix=prefix) as topo:
        lab_ = lab.build(topo, len(weights), list(weights))
        try:
            lab_.start_servers()
            wait_servers(lab_)
            api = lab_.start_node() if start_node else None
            yield Env(lab_, api, PortPool(), backend_names(lab_))
        finally:
            try:
                lab_.stop_node()
            finally:
                if pin_dir(lab_.node_name).exists():   # a node that did not stop cleanly
                    zfast("down", "--state-dir", str(lab_.state_dir))
                shutil.rmtree(lab_.state_dir, ignore_errors=True)


def wait_servers(lab_: lab.Lab, timeout: float = 20.0) -> None:
    """Until every backend's echo server accepts (tried from the balancer's namespace)."""
    deadline = time.monotonic() + timeout
    for address in lab_.backend4:
        while True:
            try:
                with in_ns(lab_.topo.ns(lab_.lb)):
                    s = socket.create_connection((address, lab.TARGET_TCP), timeout=1)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"echo server on {address} does not answer") from None
                time.sleep(0.1)


# ---------------------------------------------------------------- traffic

def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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


def connections(ns: str, host: str, port: int, sports, workers: int = 32,
                timeout: float = 5.0, reset: bool = False) -> Spread:
    """One connection from each source port in sports, in parallel."""
    out = Spread()
    lock = threading.Lock()

    def one(sport):
        try:
            name = hello_from(ns, host, port, sport, timeout, reset)
        except OSError as err:
            with lock:
                out.failures[sport] = f"{type(err).__name__}: {err}"
            return
        with lock:
            out.by_port[sport] = name

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, sports))
    return out


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


# ---------------------------------------------------------------- the CLI

def zfast(*args: str, ns: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the zfast CLI (this interpreter), in namespace ns if given."""
    argv = [*ZFAST, *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def stats_json(state_dir: Path) -> dict:
    p = zfast("stats", "--json", "--state-dir", str(state_dir))
    assert p.returncode == 0, f"zfast stats failed: {p.stderr}"
    return json.loads(p.stdout)


def service_stats(stats: dict, name: str) -> dict:
    """{"packets": n, "backends": {address: packets}} of one service."""
    svc = next(s for s in stats["services"] if s["name"] == name)
    return {"packets": svc["packets"],
            "backends": {b["address"]: b["packets"] for b in svc["backends"]}}


# ---------------------------------------------------------------- kernel state

def xdp_on(ns: str) -> dict[str, int]:
    """{interface: prog id} of every XDP program attached in namespace ns."""
    out = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    found = {}
    for link in json.loads(out):
        xdp = link.get("xdp")
        if xdp:
            found[link["ifname"]] = int(xdp.get("prog", {}).get("id", 0))
    return found


def pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


# ---------------------------------------------------------------- oracle

def _mix(h: int, v: int) -> int:
    m = 0xFFFFFFFF
    v = (v * 0xCC9E2D51) & m
    v = ((v << 15) | (v >> 17)) & m
    v = (v * 0x1B873593) & m
    h ^= v
    h = ((h << 13) | (h >> 19)) & m
    return (h * 5 + 0xE6546B64) & m


def _words(address: str) -> list[int]:
    raw = ipaddress.ip_address(address).packed.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]


def _be16(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def flow_hash(src: str, sport: int, dst: str, dport: int, proto: int = socket.IPPROTO_TCP) -> int:
    """bpf/flows.h zf_flow_hash() of a packet's 5-tuple (fields as the data plane loads them)."""
    m = 0xFFFFFFFF
    h = 0x7A66
    for s, d in zip(_words(src), _words(dst)):
        h = _mix(h, s)
        h = _mix(h, d)
    h = _mix(h, ((_be16(sport) << 16) | _be16(dport)) & m)
    h = _mix(h, proto)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    h ^= h >> 16
    return h


@lru_cache(maxsize=16)
def _table(backends: tuple[tuple[str, int], ...], size: int) -> tuple:
    return tuple(maglev.build_table(list(backends), size).tolist())


def expected_backend(backends: list[tuple[str, int]], src: str, sport: int, vip: str,
                     dport: int, size: int = maglev.DEFAULT_SIZE) -> str:
    """The address a new flow must reach, given the service's (address, weight) list."""
    live = tuple((a, w) for a, w in backends if w > 0)
    table = _table(live, size)
    return live[table[flow_hash(src, sport, vip, dport) % size]][0]


def backend_names(lab_: lab.Lab) -> dict[str, str]:
    """Backend address (v4 and v6) -> the name its echo server answers with."""
    names = {}
    for i in range(len(lab_.backends)):
        a4, a6 = lab.backend_addrs(i)
        names[a4] = names[str(ipaddress.ip_address(a6))] = f"be{i + 1}"
    return names
