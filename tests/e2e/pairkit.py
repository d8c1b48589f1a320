"""Helpers of the active/standby pair's end-to-end tests (tests/e2e/test_pair.py).

    pair_env()     the pair lab (zfast.lab.topology.build_pair) with echo servers and both nodes up,
                   torn down whatever happens
    PairEnv        statuses, roles, events, reviving a killed node (links up, addresses back)
    Pinger         long-lived TCP streams pinged continuously, one thread each: when each
                   ping came back, so the gap in delivery around a failure is measured
    UdpFlow        numbered datagrams every few ms with their replies: losses, duplicates,
                   reordering, the gap
    RoleWatch      both nodes' /status polled quickly: how long both said "active"
    HeartbeatTap   genuine heartbeats captured off the private bridge (AF_PACKET)
    send_udp       a datagram from any namespace (forged or replayed heartbeats)
"""

from __future__ import annotations

import ctypes
import http.client
import ipaddress
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lbkit import wait_accepting
from zfast.lab import topology
from zfast.api import ApiError, Client
from zfast.lab.netns import Topology, in_ns
from zfast.paths import pin_dir
from zfast.lab.probe import Stream

REPO = Path(__file__).resolve().parents[2]
ZFAST = [sys.executable, "-m", "zfast.cli"]
NEED_ROOT = "e2e tests need root (network namespaces, XDP); run them as root: ./run.sh test"
HA_PORT = 5405
# what asking a node that is being killed can raise (the answer cut short, or none)
ANSWERLESS = (ApiError, http.client.HTTPException, ValueError)
KEEP = Path("/tmp/zfast-pair-events")   # each node's events.jsonl, copied at teardown


# ---------------------------------------------------------------- the lab

# build_pair's addresses of node i's interfaces; IPv6 ones are flushed when a link goes down
# (net.ipv6.conf.*.keep_addr_on_down = 0), so a killed node's links get them back here.
def node_addrs(i: int) -> dict[str, list[str]]:
    return {"pub0": [f"10.0.0.{11 + i}/24", f"fd00::{11 + i:x}/64"],
            "priv0": [f"10.1.0.{251 + i}/24", f"fd01::{251 + i:x}/64"],
            "sync0": [f"10.203.0.{1 + i}/30"]}


@dataclass
class PairEnv:
    lab: topology.PairLab
    topo: Topology

    # -- reading the nodes

    def name(self, i: int) -> str:
        return self.lab.nodes[i].name

    def status(self, i: int, timeout: float = 5.0) -> dict | None:
        try:
            return Client(self.lab.nodes[i].state_dir, timeout=timeout).get("/status")
        except ANSWERLESS:
            return None

    def roles(self) -> tuple[str | None, str | None]:
        return tuple((self.status(i) or {}).get("role") for i in range(2))

    def active(self) -> int:
        """The index of the one active node (asserts there is exactly one)."""
        roles = self.roles()
        assert sorted(roles) == ["active", "standby"], f"roles are {roles}"
        return roles.index("active")

    def events(self, i: int, kind: str | None = None) -> list[dict]:
        path = self.lab.nodes[i].state_dir / "events.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if kind is None or ev.get("kind") == kind:
                out.append(ev)
        return out

    def wait_pair(self, timeout: float = 30.0) -> int:
        """Until one node is active, the other standby, and the active one streams its
        flows to the standby: the index of the active node."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            st = [self.status(i) for i in range(2)]
            last = [(s or {}).get("role") for s in st]
            if sorted(last) == ["active", "standby"]:
                a = last.index("active")
                sending = st[a]["peer"]["replication"]["sending"]
                receiving = st[1 - a]["peer"]["replication"]["receiving"]
                if sending["connected"] and receiving["connected"] and st[1 - a]["peer"]["state"] == "alive":
                    return a
            time.sleep(0.05)
        raise TimeoutError(f"the pair did not settle in {timeout} s (roles {last})")

    def wait_replicated(self, standby: int, at_least: int, timeout: float = 10.0) -> dict:
        """Until the standby has received at least that many flows (and the sender's lag is 0)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(standby)
            rec = st["peer"]["replication"]["receiving"]
            if rec["received"] >= at_least:
                return rec
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name(standby)} received {rec['received']} flows, "
                                   f"expected at least {at_least}")
            time.sleep(0.05)

    # -- changing them

    def links(self, i: int, up: bool, names=("pub0", "priv0", "sync0")) -> None:
        ns = self.lab.nodes[i].ns
        for ifname in names:
            subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up" if up else "down"],
                           check=True)
            if up:
                for cidr in node_addrs(i)[ifname]:
                    # v4 addresses survive a link down, v6 ones do not: add what is missing
                    subprocess.run(["ip", "-n", ns, *(["-6"] if ":" in cidr else []), "addr",
                                    "replace", cidr, "dev", ifname,
                                    *(["nodad"] if ":" in cidr else [])], check=True)
        if up:
            for ifname in names:
                self.topo.wait_link_up(ns, ifname, timeout=5)

    def start(self, i: int, project: dict | None = None) -> None:
        self.lab.start_node(i, project)

    def stop(self, i: int) -> None:
        """SIGKILL the daemon (if it runs) and remove what it left: the next start is fresh."""
        node = self.lab.nodes[i]
        self.lab.kill(i, links_down=False)
        # in the node's namespace: `down` detaches what the dead daemon left on its links
        p = zfast("down", "--state-dir", str(node.state_dir), ns=node.ns)
        assert p.returncode == 0, f"zfast down ({node.name}): {p.stderr.strip()}"

    def restart(self, i: int, project: dict | None = None) -> None:
        """The node's daemon afresh, links up (what a killed node does when it comes back)."""
        self.stop(i)
        self.links(i, True)
        self.start(i, project)

    def alive(self, i: int) -> bool:
        proc = self.lab.nodes[i].proc
        return proc is not None and proc.poll() is None


@contextmanager
def pair_env(prefix: str = "zfpr", heartbeat_ms: int = 50, n_backends: int = 3) -> Iterator[PairEnv]:
    # Fail, never skip: a run without root must not look like a green one.
    assert os.geteuid() == 0, NEED_ROOT
    with Topology(prefix=prefix) as topo:
        pl = topology.build_pair(topo, n_backends, heartbeat_ms=heartbeat_ms)
        env = PairEnv(pl, topo)
        try:
            pl.start_servers()
            wait_servers(env)
            # Both at once, as a pair usually comes up: the higher (priority, name) wins.
            errors = []
            threads = [threading.Thread(target=lambda i=i: _start_noting(env, i, errors))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            yield env
        finally:
            for i, node in enumerate(pl.nodes):
                if node.proc is not None:
                    try:
                        node.proc.send_signal(signal.SIGCONT)  # a stopped daemon cannot exit
                        node.proc.terminate()
                        node.proc.wait(timeout=15)
                    except Exception:
                        pl.kill(i, links_down=False)
                    node.proc = None
                if pin_dir(node.name).exists():   # a node that did not stop cleanly
                    zfast("down", "--state-dir", str(node.state_dir), ns=node.ns)
                events = node.state_dir / "events.jsonl"
                if events.exists():                 # kept for a post-mortem
                    KEEP.mkdir(parents=True, exist_ok=True)
                    shutil.copy(events, KEEP / f"{node.name}.events.jsonl")
                shutil.rmtree(node.state_dir, ignore_errors=True)


def _start_noting(env: PairEnv, i: int, errors: list) -> None:
    try:
        env.start(i)
    except Exception as err:  # raised in the main thread
        errors.append(err)


def wait_servers(env: PairEnv, timeout: float = 20.0) -> None:
    """Until every backend's echo server accepts (tried from node A's namespace)."""
    wait_accepting(env.lab.nodes[0].ns, [topology.backend_addrs(b)[0] for b in range(len(env.lab.backends))],
                   timeout=timeout)


def zfast(*args: str, ns: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [*ZFAST, *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# ---------------------------------------------------------------- TCP streams

def open_streams(env: PairEnv, count: int) -> list[Stream]:
    """count long-lived echo connections through the VIPs, alternating VIP4 and VIP6."""
    vips = (topology.VIP4, topology.VIP6)
    return [Stream(env.lab.client, vips[n % 2], topology.TCP_PORT) for n in range(count)]


class Pinger:
    """Every stream pinged in its own thread, `period` apart: when each ping succeeded."""

    def __init__(self, streams: list[Stream], period: float = 0.02):
        self.streams = streams
        self.period = period
        self.ok: list[list[float]] = [[] for _ in streams]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(len(streams))]

    def _run(self, n: int) -> None:
        s, times = self.streams[n], self.ok[n]
        while not self._stop.is_set():
            if not s.ping():
                return
            times.append(time.monotonic())
            self._stop.wait(self.period)

    def __enter__(self) -> "Pinger":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def wait_rounds(self, n: int, timeout: float = 30.0) -> None:
        """Until every stream has n more successful pings than now (or broke)."""
        base = [len(t) for t in self.ok]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(t) >= b + n or s.error for t, b, s in zip(self.ok, base, self.streams)):
                return
            time.sleep(0.02)
        slow = [i for i, (t, b) in enumerate(zip(self.ok, base)) if len(t) < b + n]
        raise TimeoutError(f"streams {slow[:10]} did not ping {n} more times in {timeout} s")

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
            self.sock = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET,
                                      socket.SOCK_DGRAM)
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


# ---------------------------------------------------------------- roles over time

class RoleWatch:
    """Both nodes' /status polled every `every` seconds, each from its own thread. A node
    that takes longer than `silent_after` to answer (a stopped daemon) counts as saying
    nothing (None) from then until its answer comes."""

    def __init__(self, env: PairEnv, every: float = 0.005, silent_after: float = 0.03,
                 timeout: float = 5.0):
        self.env, self.every, self.silent_after, self.timeout = env, every, silent_after, timeout
        self.samples: list[list[tuple[float, str | None]]] = [[], []]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, i: int) -> None:
        client = Client(self.env.lab.nodes[i].state_dir, timeout=self.timeout)
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                role = client.get("/status")["role"]
            except ANSWERLESS:
                role = None
            t1 = time.monotonic()
            if t1 - t0 > self.silent_after:
                self.samples[i].append((t0 + self.silent_after, None))
            # the role was true somewhere between asking and the answer: count the answer time
            self.samples[i].append((t1, role))
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t0)))

    def __enter__(self) -> "RoleWatch":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def role_at(self, i: int, t: float) -> str | None:
        role = None
        for ts, r in self.samples[i]:
            if ts > t:
                break
            role = r
        return role

    def both_active(self, since: float = 0.0) -> list[tuple[float, float]]:
        """Intervals [start, end) in which the latest answer of each node said active."""
        events = sorted([(ts, i, r) for i in range(2) for ts, r in self.samples[i] if ts >= since])
        cur: list[str | None] = [self.role_at(0, since), self.role_at(1, since)]
        out, start = [], None
        for ts, i, r in events:
            cur[i] = r
            both = cur[0] == "active" and cur[1] == "active"
            if both and start is None:
                start = ts
            elif not both and start is not None:
                out.append((start, ts))
                start = None
        if start is not None:
            out.append((start, time.monotonic()))
        return out

    def first(self, i: int, role: str, since: float) -> float | None:
        for ts, r in self.samples[i]:
            if ts >= since and r == role:
                return ts
        return None

    def roles_since(self, i: int, t: float) -> set[str]:
        """Every role node i reported from t on (no answer is no role)."""
        return {r for ts, r in self.samples[i] if ts >= t and r is not None} | \
            ({self.role_at(i, t)} - {None})

    def changes(self, i: int, since: float = 0.0) -> list[str]:
        """The roles node i reported from `since` on, each change once (no answer skipped)."""
        out = []
        for ts, r in self.samples[i]:
            if ts >= since and r is not None and (not out or out[-1] != r):
                out.append(r)
        return out

    def transitions(self, i: int) -> list[tuple[float, str | None]]:
        out = []
        for ts, r in self.samples[i]:
            if not out or out[-1][1] != r:
                out.append((ts, r))
        return out


# ---------------------------------------------------------------- heartbeats on the wire

# classic BPF for AF_PACKET: IPv4 or IPv6 UDP frames only (the taps below run while 50
# TCP streams ping: the rest must not reach Python, nor fill the socket's buffer)
_UDP_ONLY = [(0x28, 0, 0, 12), (0x15, 0, 3, 0x0800), (0x30, 0, 0, 23), (0x15, 4, 5, 17),
             (0x06, 0, 0, 0), (0x15, 0, 3, 0x86DD), (0x30, 0, 0, 20), (0x15, 0, 1, 17),
             (0x06, 0, 0, 0xFFFF), (0x06, 0, 0, 0)]
SO_ATTACH_FILTER, SO_RCVBUFFORCE = 26, 33


def udp_tap(ns: str) -> socket.socket:
    """An AF_PACKET socket in ns that sees every UDP frame of every port (ETH_P_ALL: on a
    bridge port only the all-protocol taps see the frames, the bridge takes them before the
    per-protocol handlers)."""
    with in_ns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    prog = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in _UDP_ONLY))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HL", len(_UDP_ONLY), ctypes.addressof(prog)))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    # frames queued before the filter was attached: drop them
    sock.setblocking(False)
    try:
        while True:
            sock.recv(65535)
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return sock


class HeartbeatTap:
    """Captures the heartbeats one node sends over the private network: an AF_PACKET
    socket on that node's port of the private bridge (namespace privsw, qa / qb)."""

    def __init__(self, env: PairEnv, sender: int):
        self.ns = env.topo.ns("privsw")
        self.port = "qa" if sender == 0 else "qb"
        self.src = env.lab.nodes[sender].priv4
        self.sock = udp_tap(self.ns)
        self.sock.bind((self.port, 0))
        self.sock.settimeout(0.5)

    def capture(self, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        """The UDP payloads of the next `count` heartbeats from the node."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"captured {len(out)} heartbeats of {self.src}, wanted {count}")
            try:
                frame = self.sock.recv(65535)
            except socket.timeout:
                continue
            ip = frame[14:]
            if frame[12:14] != b"\x08\x00" or len(ip) < 28 or ip[9] != socket.IPPROTO_UDP:
                continue
            if socket.inet_ntoa(ip[12:16]) != self.src:
                continue
            ihl = (ip[0] & 0x0F) * 4
            _sport, dport, length, _ = struct.unpack("!HHHH", ip[ihl:ihl + 8])
            if dport != HA_PORT:
                continue
            out.append(ip[ihl + 8:ihl + length])
        return out

    def close(self) -> None:
        self.sock.close()


class BackendTap:
    """The UDP datagrams of the lab's flows as the backends see them: AF_PACKET on the
    backends' ports of the private bridge (namespace privsw, bp1..). Requests (to the
    backends' port) and replies (from it) in the order they passed, per client port, so
    that a reordering on the client can be put where it happened: on the way through the
    balancer, or in the echo server (which answers each datagram on a thread of its own)."""

    def __init__(self, env: PairEnv, port: int = topology.TARGET_UDP):
        self.port = port
        self.sock = udp_tap(env.topo.ns("privsw"))
        self.sock.settimeout(0.1)
        self.requests: dict[int, list[int]] = {}   # client port -> numbers, as they reached a backend
        self.replies: dict[int, list[int]] = {}    # client port -> numbers, as a backend sent them
        self.sent_at: dict[int, dict[int, float]] = {}  # client port -> number -> when seen
        self.ports = {}                             # backend address -> its port on the bridge
        for b in range(len(env.lab.backends)):
            for address in topology.backend_addrs(b):
                self.ports[str(ipaddress.ip_address(address))] = f"bp{b + 1}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if not addr[0].startswith("bp"):
                continue
            etype = frame[12:14]
            if etype == b"\x08\x00" and frame[23] == socket.IPPROTO_UDP:
                l4 = 14 + (frame[14] & 0x0F) * 4
                src, dst = (socket.inet_ntop(socket.AF_INET, frame[o:o + 4]) for o in (26, 30))
            elif etype == b"\x86\xdd" and frame[20] == socket.IPPROTO_UDP:
                l4 = 14 + 40
                src, dst = (socket.inet_ntop(socket.AF_INET6, frame[o:o + 16]) for o in (22, 38))
            else:
                continue
            sport, dport, length = struct.unpack("!HHH", frame[l4:l4 + 6])
            payload = frame[l4 + 8:l4 + length].decode(errors="replace")
            # each frame once: on the port of the backend it is for or from (a bridge
            # floods frames for a MAC it has not learnt yet to every port)
            if dport == self.port and payload.isdigit() and self.ports.get(dst) == addr[0]:
                self.requests.setdefault(sport, []).append(int(payload))
            elif sport == self.port and self.ports.get(src) == addr[0]:
                number = payload.partition(" ")[2]
                if number.isdigit():
                    self.replies.setdefault(dport, []).append(int(number))
                    self.sent_at.setdefault(dport, {})[int(number)] = time.monotonic()

    def __enter__(self) -> "BackendTap":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()

    def judge(self, flow: "UdpFlow") -> dict:
        """Where the flow's datagrams were reordered or duplicated: through the balancer
        (to the backend, or back to the client) or by the echo server."""
        cport = flow.local_port
        req, rep = self.requests.get(cport, []), self.replies.get(cport, [])
        at = self.sent_at.get(cport, {})
        got = [n for n, _, _ in flow.replies]
        order = {n: i for i, n in enumerate(rep)}

        def swaps(xs):
            return [(a, b) for a, b in zip(xs, xs[1:]) if b < a]

        # A swap on the client is the backend's doing when it sent the two answers in that
        # order, or at the same moment (two echo threads at once: the kernel may then pass
        # them on in either order); any other is the balancer's.
        unexplained = [(a, b) for a, b in swaps(got)
                       if not (a in order and b in order and
                               (order[a] < order[b] or abs(at[a] - at[b]) < 0.005))]
        return {"to_backend_swaps": len(swaps(req)), "to_backend_dups": len(req) - len(set(req)),
                "echo_swaps": len(swaps(rep)), "return_swaps_unexplained": unexplained,
                "seen_at_backend": len(req)}


def arp_answers(ns: str, ifname: str, target: str, wait: float = 0.3) -> set[str]:
    """Broadcast one ARP request for target from ns/ifname: the MACs that answered."""
    mac = open_mac(ns, ifname)
    with in_ns(ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        own = subprocess.run(["ip", "-4", "-j", "addr", "show", "dev", ifname],
                             capture_output=True, text=True, check=True).stdout
    src_ip = json.loads(own)[0]["addr_info"][0]["local"]
    with s:
        s.bind((ifname, 0))
        s.settimeout(0.05)
        frame = (b"\xff" * 6 + mac + b"\x08\x06"
                 + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(src_ip)
                 + b"\0" * 6 + socket.inet_aton(target))
        s.send(frame)
        seen = set()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got = s.recv(2048)
            except socket.timeout:
                continue
            arp = got[14:42]
            if len(arp) == 28 and struct.unpack("!H", arp[6:8])[0] == 2 and arp[14:18] == socket.inet_aton(target):
                seen.add(arp[8:14].hex(":"))
        return seen


def open_mac(ns: str, ifname: str) -> bytes:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def mac_of(ns: str, ifname: str) -> str:
    return open_mac(ns, ifname).hex(":")


def neighbour(ns: str, address: str) -> str | None:
    """The MAC ns's neighbour table holds for address (None: no entry or no address)."""
    out = subprocess.run(["ip", "-n", ns, "-j", "neigh", "show", "to", address],
                         capture_output=True, text=True, check=True).stdout
    entries = [e for e in json.loads(out or "[]") if e.get("lladdr")]
    return entries[0]["lladdr"] if entries else None


def forward_flows(node: str) -> int:
    """Forward entries in a node's pinned flows map (bpftool): the flows it would dump."""
    path = pin_dir(node) / "flows"
    p = subprocess.run(["bpftool", "map", "dump", "pinned", str(path), "-j"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"bpftool map dump {path}: {p.stderr.strip()}"
    count = 0
    for entry in json.loads(p.stdout):
        value = entry.get("formatted", {}).get("value")
        if value is None:
            raise AssertionError(f"bpftool shows no BTF-formatted value: {entry}")
        if value.get("dir") == 1:
            count += 1
    return count


def send_udp(ns: str, dest: str, data: bytes, port: int = HA_PORT) -> None:
    with in_ns(ns):
        s = socket.socket(socket.AF_INET6 if ":" in dest else socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.sendto(data, (dest, port))
