"""The active/standby pair's lab (zfast.lab.topology.build_pair) for tests/e2e/test_pair.py.

    pair_env()     the pair lab with echo servers and both nodes up, torn down whatever
                   happens
    PairEnv        statuses, roles, events, reviving a killed node (links up, addresses back)
    open_streams   long-lived TCP streams through the VIPs (pinged by traffic.Pinger)
    RoleWatch      both nodes' /status polled quickly: how long both said "active"

Frames on its wires (heartbeats, what the backends see, ARP): tests/e2e/kit/wire.py.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.e2e.kit.cli import zfast
from tests.e2e.kit.lab import NEED_ROOT
from tests.e2e.kit.waiting import wait_accepting
from zfast.api import ApiError, Client
from zfast.lab import topology
from zfast.lab.netns import Topology
from zfast.lab.probe import Stream
from zfast.paths import pin_dir

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
            _wait_servers(env)
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


def _wait_servers(env: PairEnv, timeout: float = 20.0) -> None:
    """Until every backend's echo server accepts (tried from node A's namespace)."""
    wait_accepting(env.lab.nodes[0].ns, [topology.backend_addrs(b)[0] for b in range(len(env.lab.backends))],
                   timeout=timeout)


# ---------------------------------------------------------------- TCP streams

def open_streams(env: PairEnv, count: int) -> list[Stream]:
    """count long-lived echo connections through the VIPs, alternating VIP4 and VIP6."""
    vips = (topology.VIP4, topology.VIP6)
    return [Stream(env.lab.client, vips[n % 2], topology.TCP_PORT) for n in range(count)]


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
