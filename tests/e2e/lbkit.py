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

from zfast.lab import topology
from zfast.reconcile import maglev
from zfast.dataplane.flowhash import flow_hash as _flow_hash
from zfast.api import Client
from zfast.lab.netns import Topology, in_ns
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
    lab: topology.Lab
    api: Client | None          # the running node's API (None while no node runs)
    ports: PortPool
    names: dict[str, str]       # backend address -> backend name

    @property
    def state_dir(self) -> Path:
        return self.lab.state_dir


@contextmanager
def lab_env(prefix: str, weights=(1, 1, 2), start_node: bool = True,
            offloads: bool = True) -> Iterator[Env]:
    """The standard lab with echo servers (and a node), torn down whatever happens.
    Links as Linux makes them; offloads=False: see zfast.lab.topology.build."""
    # Fail, never skip: a run without root must not look like a green one.
    assert os.geteuid() == 0, NEED_ROOT
    with Topology(prefix=prefix) as topo:
        lab_ = topology.build(topo, len(weights), list(weights), offloads=offloads)
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


def wait_accepting(ns: str, addresses, port: int = topology.TARGET_TCP, timeout: float = 20.0) -> None:
    """Until a server accepts on every address (tried from namespace ns)."""
    deadline = time.monotonic() + timeout
    for address in addresses:
        while True:
            try:
                with in_ns(ns):
                    s = socket.create_connection((address, port), timeout=1)
                s.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"echo server on {address} does not answer") from None
                time.sleep(0.1)


def wait_servers(lab_: topology.Lab, timeout: float = 20.0) -> None:
    """Until every backend's echo server accepts (tried from the balancer's namespace)."""
    wait_accepting(lab_.topo.ns(lab_.lb), lab_.backend4, timeout=timeout)


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

def programs_on(ns: str) -> dict[str, int]:
    """{interface: prog id} of every XDP program and tc ingress BPF filter in namespace ns."""
    out = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    found = {}
    for link in json.loads(out):
        xdp = link.get("xdp")
        if xdp:
            found[link["ifname"]] = int(xdp.get("prog", {}).get("id", 0))
        tc = subprocess.run(["ip", "netns", "exec", ns, "tc", "-j", "filter", "show", "dev",
                             link["ifname"], "ingress"], capture_output=True, text=True).stdout
        for f in json.loads(tc or "[]"):
            if "prog" in f.get("options", {}):
                found[link["ifname"]] = int(f["options"]["prog"]["id"])
    return found


def hooks_on(ns: str) -> dict[str, str]:
    """{interface: "xdp" | "tc"} of what programs_on finds."""
    out = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    xdp = {link["ifname"] for link in json.loads(out) if link.get("xdp")}
    return {name: "xdp" if name in xdp else "tc" for name in programs_on(ns)}


def detach_program(ns: str, ifname: str, how: str = "filter") -> None:
    """Take zfast's program off an interface behind its back, as an operator's mistake
    would: how = xdp | xdpdrv (`ip link set ... off`), filter (tc filter del), clsact."""
    if how in ("xdp", "xdpdrv"):
        argv = ["ip", "-n", ns, "link", "set", "dev", ifname, how, "off"]
    elif how == "filter":
        argv = ["ip", "netns", "exec", ns, "tc", "filter", "del", "dev", ifname, "ingress"]
    else:
        argv = ["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", ifname, "clsact"]
    subprocess.run(argv, check=True)


def pids_in(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


# ---------------------------------------------------------------- oracle

def flow_hash(src: str, sport: int, dst: str, dport: int, proto: int = socket.IPPROTO_TCP) -> int:
    """bpf/flows.h zf_flow_hash() of a packet's 5-tuple (zfast.dataplane.flowhash, argument order of
    this module's callers)."""
    return _flow_hash(src, dst, sport, dport, proto)


@lru_cache(maxsize=16)
def _table(backends: tuple[tuple[str, int], ...], size: int) -> tuple:
    return tuple(maglev.build_table(list(backends), size).tolist())


def expected_backend(backends: list[tuple[str, int]], src: str, sport: int, vip: str,
                     dport: int, size: int = maglev.DEFAULT_SIZE) -> str:
    """The address a new flow must reach, given the service's (address, weight) list."""
    live = tuple((a, w) for a, w in backends if w > 0)
    table = _table(live, size)
    return live[table[flow_hash(src, sport, vip, dport) % size]][0]


def backend_names(lab_: topology.Lab) -> dict[str, str]:
    """Backend address (v4 and v6) -> the name its echo server answers with."""
    names = {}
    for i in range(len(lab_.backends)):
        a4, a6 = topology.backend_addrs(i)
        names[a4] = names[str(ipaddress.ip_address(a6))] = f"be{i + 1}"
    return names


# ---------------------------------------------------------------- a node from any file

def start_node(lab_: topology.Lab, project: dict, timeout: float = 120.0) -> Client:
    """`zfast up` of this project file in the lab's balancer namespace (Lab.start_node
    writes the lab's own file; this one takes any, e.g. with a `store:` section)."""
    lab_.write_config(project)
    lab_.node_proc = lab_.topo.popen(lab_.lb, [*ZFAST, "up", "-c", str(lab_.config_path)],
                                     cwd=REPO)
    client = Client(lab_.state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab_.node_proc.poll() is not None:
            raise RuntimeError(f"zfast up exited with {lab_.node_proc.returncode}")
        try:
            client.get("/status")
            return client
        except Exception:   # ApiError until the socket answers
            time.sleep(0.2)
    raise RuntimeError(f"zfast up did not answer within {timeout:.0f} s")


# ---------------------------------------------------------------- pinned maps (bpftool)

# The maps that hold what a project file says (rings are left out: 1M slots; the services
# entries name the ring in use, so a ring flip shows there).
STATE_MAPS = ("services", "backends", "fw_ports", "config", "vips")


def map_dump(node: str, name: str) -> list:
    """`bpftool map dump pinned /run/zfast/bpffs/<node>/<name> -j`: the entries."""
    path = pin_dir(node) / name
    p = subprocess.run(["bpftool", "map", "dump", "pinned", str(path), "-j"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"bpftool map dump {path}: {p.stderr.strip()}"
    return json.loads(p.stdout)


# Fields the daemon changes by itself, whatever the file says: the next-hop generation
# (bumped on route/neighbour changes and every few seconds) and the HA lease deadline.
VOLATILE = {"config": ("nh_gen", "active_until_ns")}


def maps_state(node: str, names=STATE_MAPS) -> dict[str, list]:
    """What the node's maps hold, entry by entry (sorted: a hash map has no order), without
    the VOLATILE fields."""
    out = {}
    for name in names:
        entries = []
        for e in map_dump(node, name):
            f = e.get("formatted")
            if name in VOLATILE:
                assert f, f"bpftool printed no BTF-formatted entries for map {name}"
                value = {k: v for k, v in f["value"].items() if k not in VOLATILE[name]}
                entry = {"key": f["key"], "value": value}
            else:
                entry = {"key": e.get("key"), "value": e.get("value")}
            entries.append(json.dumps(entry, sort_keys=True))
        out[name] = sorted(entries)
    return out


def _addr(words: list[int], family: int) -> str:
    raw = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw))


def _port(be16: int) -> int:
    return int.from_bytes(int(be16).to_bytes(2, "little"), "big")


def flow_backends(node: str) -> dict[tuple, str]:
    """Forward flow entries of the node: (client address, client port, VIP, port) ->
    the backend address the flow is pinned to (from the pinned `flows` map)."""
    out = {}
    for e in map_dump(node, "flows"):
        f = e.get("formatted")
        assert f, "bpftool printed no BTF-formatted entries for the flows map"
        k, v = f["key"], f["value"]
        if v["dir"] != 1:          # ZF_DIR_FORWARD
            continue
        fam = k["family"]
        out[(_addr(k["src"]["w"], fam), _port(k["sport"]),
             _addr(k["dst"]["w"], fam), _port(k["dport"]))] = _addr(v["addr"]["w"], fam)
    return out


def reason_counters(node: str) -> dict[str, int]:
    """Packets per verdict reason, summed over CPUs, read from the pinned map (works while
    no daemon runs)."""
    from zfast.dataplane.reasons import reasons
    names = [r.name for r in reasons()]
    out = {}
    for e in map_dump(node, "reason_stats"):
        f = e["formatted"]
        idx = f["key"]
        if idx < len(names):
            out[names[idx]] = sum(int(c["value"]["packets"]) for c in f["values"])
    return out


# ---------------------------------------------------------------- etcd in a namespace

def ensure_etcd() -> str:
    """Debian's etcd (scripts/bootstrap.sh installs it); installed here if missing."""
    path = shutil.which("etcd")
    if path:
        return path
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "etcd-server", "etcd-client"], env=env, capture_output=True, text=True)
    path = shutil.which("etcd")
    if not path:
        raise RuntimeError("etcd is not installed and `apt-get install etcd-server` failed "
                           f"(run scripts/bootstrap.sh as root):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return path


class NsEtcd:
    """One etcd member inside network namespace `ns` of `topo`, serving clients on each
    of `addresses` (and on the namespace's own 127.0.0.1, for health checks). stop()
    is a crash (SIGKILL); start() again keeps the data dir: a restart, not a reset."""

    PORT, PEER_PORT = 2379, 2380

    def __init__(self, topo: Topology, ns: str, workdir: Path, addresses: list[str]):
        self.topo, self.ns = topo, topo.ns(ns)
        self.binary = ensure_etcd()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "etcd-data"
        self.log = self.workdir / "etcd.log"
        self.urls = [f"http://{a}:{self.PORT}" for a in addresses]
        self.local = f"http://127.0.0.1:{self.PORT}"
        self.proc = None

    def url(self, address: str) -> str:
        return f"http://{address}:{self.PORT}"

    def start(self, timeout: float = 30.0) -> None:
        import platform
        peer = f"http://127.0.0.1:{self.PEER_PORT}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        if platform.machine() in ("aarch64", "arm64"):
            env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
        listen = ",".join([self.local, *self.urls])
        with open(self.log, "a") as log:
            self.proc = self.topo.popen(self.ns, [
                self.binary, "--name", "default", "--data-dir", str(self.data),
                "--listen-client-urls", listen, "--advertise-client-urls", ",".join(self.urls),
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}"],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy within {timeout} s:\n{self.tail()}")

    def healthy(self) -> bool:
        import urllib.request
        try:
            with in_ns(self.ns):
                r = urllib.request.urlopen(self.local + "/health", timeout=1)
            with r:
                return json.load(r).get("health") in ("true", True)
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, 9)    # `ip netns exec` execs: the pid is etcd's
            self.proc.wait(15)
        self.proc = None

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""


class Pinger:
    """Pings every stream (zfast.lab.probe.Stream), round after round, in a background thread."""

    def __init__(self, streams: list, pause: float = 0.0, timeout: float = 120.0):
        from zfast.lab.probe import streams_alive

        self.streams, self.rounds = streams, 0
        self.pause, self.timeout = pause, timeout
        self._alive = streams_alive
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_.is_set():
            self._alive(self.streams, pause=self.pause)
            self.rounds += 1

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_.set()
        self.thread.join(self.timeout)

    def wait_rounds(self, n: int, timeout: float | None = None) -> None:
        """Until n more full rounds are done (the first one may have begun earlier)."""
        target = self.rounds + n + 1
        end = time.monotonic() + (timeout or self.timeout)
        while self.rounds < target:
            assert self.thread.is_alive(), "the pinger stopped"
            assert time.monotonic() < end, f"pinger made {self.rounds} of {target} rounds"
            time.sleep(0.005)
