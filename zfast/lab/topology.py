"""The standard throw-away lab: a client, one balancer node and backends, in namespaces.

    client ns            balancer ns (router)             switch ns          backend ns
    eth0 10.0.0.2  <->  pub0 10.0.0.1 + VIPs | priv0 10.1.0.1  <->  br0  <->  eth0 10.1.0.N
         fd00::2             fd00::1          |       fd01::1                     fd01::N

The VIPs (10.0.0.10, fd00::10) sit on the balancer's public port so that it
answers ARP/ND for them; its XDP program takes their TCP/UDP traffic before
the kernel sees it.  Backends route back through the balancer.  Used by
`zfast demo`, the end-to-end tests and tools/bench.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zfast.api import ApiError, Client
from zfast.ha.heartbeat import write_key
from zfast.lab.netns import Topology
from zfast.node.daemon import down

VIP4 = "10.0.0.10"
VIP6 = "fd00::10"
CLIENT4, CLIENT6 = "10.0.0.2", "fd00::2"
TCP_PORT, TARGET_TCP = 80, 8080
UDP_PORT, TARGET_UDP = 53, 5353


def backend_addrs(i: int) -> tuple[str, str]:
    return f"10.1.0.{i + 2}", f"fd01::{i + 2:x}"


def start_echo_servers(topo: Topology, backends: list[str]) -> list:
    """zfast.lab.echo in every backend namespace: TCP TARGET_TCP and UDP TARGET_UDP."""
    return [topo.popen(ns, [sys.executable, "-m", "zfast.lab.echo", "--name", f"be{i + 1}",
                            "--port", str(TARGET_TCP), "--udp-port", str(TARGET_UDP)],
                       stdout=open("/dev/null", "w"))
            for i, ns in enumerate(backends)]


def wait_answering(proc, state_dir: Path, timeout: float, what: str) -> Client:
    """The API client of the daemon just started as proc, once it answers; RuntimeError
    if it exits first or stays silent for timeout seconds."""
    client = Client(state_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            client.get("/status")
            return client
        except ApiError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")


def start_zfast(topo: Topology, ns: str, config_path: Path, state_dir: Path,
                timeout: float = 60.0, cwd: Path | None = None):
    """`zfast up -c config_path` in namespace ns; (process, API client) once it answers."""
    proc = topo.popen(ns, [sys.executable, "-m", "zfast.cli", "up", "-c", str(config_path)],
                      cwd=cwd)
    return proc, wait_answering(proc, state_dir, timeout, f"zfast up ({config_path})")


@dataclass
class Lab:
    topo: Topology
    client: str
    lb: str
    switch: str
    backends: list[str]                       # namespace of each backend
    weights: list[int]
    extra_clients: list[str]                  # more client namespaces, each on its own port
    node_name: str
    state_dir: Path
    config_path: Path
    node_proc: object = None
    servers: list = field(default_factory=list)
    mode: str = "auto"                        # the node's attach mode (auto: tc on these veths)

    @property
    def backend4(self) -> list[str]:
        return [backend_addrs(i)[0] for i in range(len(self.backends))]

    @property
    def backend6(self) -> list[str]:
        return [backend_addrs(i)[1] for i in range(len(self.backends))]

    def client_addr(self, n: int) -> str:
        """IPv4 address of client n (0 = the main client, 1.. = extra clients)."""
        return CLIENT4 if n == 0 else f"10.2.{n}.2"

    def project(self, weights: list[int] | None = None, backends: list[int] | None = None) -> dict:
        """The node's project file as a dict; backends: which backend numbers to include."""
        weights = weights or self.weights
        chosen = range(len(self.backends)) if backends is None else backends

        def service(name, vip, family):
            return {
                "name": name, "vip": vip,
                "ports": [{"port": TCP_PORT, "proto": "tcp", "target_port": TARGET_TCP},
                          {"port": UDP_PORT, "proto": "udp", "target_port": TARGET_UDP}],
                "backends": [{"address": backend_addrs(i)[family], "weight": weights[i]} for i in chosen],
            }

        return {
            "project": "lab",
            "node": {"name": self.node_name, "state_dir": str(self.state_dir),
                     "interfaces": [{"name": "pub0", "role": "public"},
                                    {"name": "priv0", "role": "private"}]
                                   + [{"name": f"pub{n}", "role": "public"}
                                      for n in range(1, len(self.extra_clients) + 1)],
                     "mode": self.mode},
            "datapath": {"flow_table": 65536, "max_services": 8, "max_backends": 64},
            "services": [service("app", VIP4, 0), service("app6", VIP6, 1)],
        }

    def write_config(self, project: dict, path: Path | None = None) -> Path:
        path = path or self.config_path
        path.write_text(yaml.safe_dump(project, sort_keys=False))
        return path

    def start_servers(self) -> None:
        self.servers += start_echo_servers(self.topo, self.backends)

    def start_node(self, timeout: float = 60.0) -> Client:
        self.write_config(self.project())
        self.node_proc, client = start_zfast(self.topo, self.lb, self.config_path, self.state_dir,
                                             timeout)
        return client

    def stop_node(self) -> int | None:
        if self.node_proc is None:
            return None
        self.node_proc.terminate()
        try:
            return self.node_proc.wait(timeout=15)
        finally:
            self.node_proc = None


def _remove_node_state(state_dir: Path) -> None:
    """What a lab node leaves: pinned maps of an unclean stop, its state dir."""
    try:
        down(state_dir)
    except Exception:
        pass
    shutil.rmtree(state_dir, ignore_errors=True)


def _senders_offload_off(topo: Topology, senders: list[tuple[str, str]]) -> None:
    """The old lab, kept for the one test about it: senders fill in full checksums (TX
    offload off), and the balancer runs native XDP, which needs nothing else of the links
    (zfast itself gives the veth peers it redirects to NAPI)."""
    for ns, ifname in senders:
        topo.offload_off(ns, ifname)


def build(topo: Topology, n_backends: int = 3, weights: list[int] | None = None,
          name: str = "lab", extra_clients: int = 0, offloads: bool = True) -> Lab:
    """extra_clients: more client namespaces, client n on 10.2.n.2/24 (fd02:n::2/64)
    behind the balancer's port pubN. Links are as `ip link add` makes them (offloads on,
    GRO off); offloads=False turns the senders' offloads off and attaches native XDP."""
    weights = weights or [1] * n_backends
    client = topo.add_ns("cli")
    lb = topo.add_ns("lb", router=True)
    switch = topo.add_ns("sw")
    topo.veth(client, "eth0", lb, "pub0", [f"{CLIENT4}/24", f"{CLIENT6}/64"],
              ["10.0.0.1/24", "fd00::1/64", f"{VIP4}/32", f"{VIP6}/128"])
    topo.bridge(switch, "br0")
    topo.veth(lb, "priv0", switch, "lbp", ["10.1.0.1/24", "fd01::1/64"], [])
    topo.attach_to_bridge(switch, "lbp", "br0")
    backends = []
    for i in range(n_backends):
        ns = topo.add_ns(f"be{i + 1}")
        a4, a6 = backend_addrs(i)
        topo.veth(ns, "eth0", switch, f"bp{i + 1}", [f"{a4}/24", f"{a6}/64"], [])
        topo.attach_to_bridge(switch, f"bp{i + 1}", "br0")
        topo.route(ns, "default", "10.1.0.1")
        topo.route(ns, "default", "fd01::1")
        backends.append(ns)
    topo.route(client, "default", "10.0.0.1")
    topo.route(client, "default", "fd00::1")
    extras = []
    for n in range(1, extra_clients + 1):
        ns = topo.add_ns(f"cli{n + 1}")
        topo.veth(ns, "eth0", lb, f"pub{n}", [f"10.2.{n}.2/24", f"fd02:{n:x}::2/64"],
                  [f"10.2.{n}.1/24", f"fd02:{n:x}::1/64"])
        topo.route(ns, "default", f"10.2.{n}.1")
        topo.route(ns, "default", f"fd02:{n:x}::1")
        extras.append(ns)
    if not offloads:
        _senders_offload_off(topo, [(ns, "eth0") for ns in [client, *backends, *extras]])
    node_name = f"{name}-{client.split('-')[2] if client.count('-') >= 3 else 'x'}"
    state_dir = Path("/run/zfast") / node_name
    state_dir.mkdir(parents=True, exist_ok=True)
    topo.at_close(lambda: _remove_node_state(state_dir))
    return Lab(topo, client, lb, switch, backends, weights, extras, node_name, state_dir,
               state_dir / "project.yaml", mode="auto" if offloads else "native")


# ---- the active/standby pair ------------------------------------------------------------
#
#   client ns ── pubsw (br0) ──┬── lb-a pub0 10.0.0.11 ── lb-a priv0 10.1.0.251 ──┬── privsw (br0) ── backends
#   10.0.0.100                 └── lb-b pub0 10.0.0.12 ── lb-b priv0 10.1.0.252 ──┘   10.1.0.N
#                                  lb-a sync0 10.203.0.1 ═══ lb-b sync0 10.203.0.2
#
# The VIPs 10.0.0.10 / fd00::10 (public) and the backends' gateway 10.1.0.1 / fd01::1
# belong to the pair: the active node answers ARP/ND for them from XDP.

PAIR_CLIENT4, PAIR_CLIENT6 = "10.0.0.100", "fd00::100"
GATEWAY4, GATEWAY6 = "10.1.0.1", "fd01::1"


@dataclass
class PairNode:
    name: str
    ns: str
    state_dir: Path
    config_path: Path
    priority: int
    sync4: str
    peer4: str
    priv4: str
    peer_priv4: str
    proc: object = None


@dataclass
class PairLab:
    topo: Topology
    client: str
    backends: list[str]
    weights: list[int]
    nodes: list[PairNode]
    key_file: Path
    heartbeat_ms: int = 50
    servers: list = field(default_factory=list)
    mode: str = "auto"

    def project(self, i: int, weights: list[int] | None = None, links: bool = True) -> dict:
        node = self.nodes[i]
        weights = weights or self.weights

        def service(name, vip, family):
            return {"name": name, "vip": vip,
                    "ports": [{"port": TCP_PORT, "proto": "tcp", "target_port": TARGET_TCP},
                              {"port": UDP_PORT, "proto": "udp", "target_port": TARGET_UDP}],
                    "backends": [{"address": backend_addrs(b)[family], "weight": weights[b]}
                                 for b in range(len(self.backends))]}

        return {
            "project": "pairlab",
            "node": {"name": node.name, "state_dir": str(node.state_dir), "mode": self.mode,
                     "interfaces": [{"name": "pub0", "role": "public"},
                                    {"name": "priv0", "role": "private"}]},
            "ha": {"peer": node.peer4, "bind": node.sync4, "priority": node.priority,
                   "key_file": str(self.key_file), "heartbeat_ms": self.heartbeat_ms,
                   "vips": [VIP4, VIP6, GATEWAY4, GATEWAY6],
                   # heartbeats over the private network too: a broken sync link alone
                   # must not make two actives
                   "links": [{"bind": node.priv4, "peer": node.peer_priv4}] if links else []},
            # one store for both (one machine): an apply on either reaches the other
            "store": {"kind": "sqlite", "path": str(self.store_path)},
            "datapath": {"flow_table": 65536, "max_services": 8, "max_backends": 64},
            "services": [service("app", VIP4, 0), service("app6", VIP6, 1)],
        }

    @property
    def store_path(self) -> Path:
        return self.nodes[0].state_dir.parent / f"{self.nodes[0].name[:-2]}-store.sqlite"

    def start_servers(self) -> None:
        self.servers += start_echo_servers(self.topo, self.backends)

    def start_node(self, i: int, project: dict | None = None, timeout: float = 60.0) -> Client:
        node = self.nodes[i]
        node.config_path.write_text(yaml.safe_dump(project or self.project(i), sort_keys=False))
        node.proc, client = start_zfast(self.topo, node.ns, node.config_path, node.state_dir,
                                        timeout)
        return client

    def api(self, i: int) -> Client:
        return Client(self.nodes[i].state_dir)

    def role(self, i: int) -> str | None:
        try:
            return self.api(i).get("/status")["role"]
        except ApiError:
            return None

    def wait_role(self, i: int, role: str, timeout: float = 10.0) -> float:
        start = time.time()
        while time.time() - start < timeout:
            if self.role(i) == role:
                return time.time() - start
            time.sleep(0.02)
        raise TimeoutError(f"{self.nodes[i].name} did not become {role} in {timeout} s "
                           f"(it is {self.role(i)})")

    def kill(self, i: int, links_down: bool = True) -> None:
        """The node dies: daemon SIGKILLed, its links taken down."""
        node = self.nodes[i]
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
            node.proc = None
        if links_down:
            for ifname in ("pub0", "priv0", "sync0"):
                self.topo.run(node.ns, ["ip", "link", "set", ifname, "down"], check=False)


def build_pair(topo: Topology, n_backends: int = 3, weights: list[int] | None = None,
               heartbeat_ms: int = 50, name: str = "pair", offloads: bool = True) -> PairLab:
    """Links as `ip link add` makes them; offloads=False as in build()."""
    weights = weights or [1] * n_backends
    client = topo.add_ns("cli")
    pubsw = topo.add_ns("pubsw")
    privsw = topo.add_ns("privsw")
    topo.bridge(pubsw, "br0")
    topo.bridge(privsw, "br0")
    topo.veth(client, "eth0", pubsw, "cp", [f"{PAIR_CLIENT4}/24", f"{PAIR_CLIENT6}/64"], [])
    topo.attach_to_bridge(pubsw, "cp", "br0")
    backends = []
    for i in range(n_backends):
        ns = topo.add_ns(f"be{i + 1}")
        a4, a6 = backend_addrs(i)
        topo.veth(ns, "eth0", privsw, f"bp{i + 1}", [f"{a4}/24", f"{a6}/64"], [])
        topo.attach_to_bridge(privsw, f"bp{i + 1}", "br0")
        topo.route(ns, "default", GATEWAY4)
        topo.route(ns, "default", GATEWAY6)
        backends.append(ns)
    if not offloads:
        _senders_offload_off(topo, [(ns, "eth0") for ns in [client, *backends]])
    tag = client.split("-")[2] if client.count("-") >= 3 else "x"
    nodes = []
    for i, letter in enumerate("ab"):
        ns = topo.add_ns(f"lb{letter}", router=True)
        topo.veth(ns, "pub0", pubsw, f"p{letter}", [f"10.0.0.{11 + i}/24", f"fd00::{11 + i:x}/64"], [])
        topo.attach_to_bridge(pubsw, f"p{letter}", "br0")
        topo.veth(ns, "priv0", privsw, f"q{letter}", [f"10.1.0.{251 + i}/24", f"fd01::{251 + i:x}/64"], [])
        topo.attach_to_bridge(privsw, f"q{letter}", "br0")
        node_name = f"{name}-{tag}-{letter}"
        state_dir = Path("/run/zfast") / node_name
        state_dir.mkdir(parents=True, exist_ok=True)
        topo.at_close(lambda d=state_dir: _remove_node_state(d))
        nodes.append(PairNode(node_name, ns, state_dir, state_dir / "project.yaml",
                              priority=200 - 100 * i, sync4=f"10.203.0.{1 + i}",
                              peer4=f"10.203.0.{2 - i}", priv4=f"10.1.0.{251 + i}",
                              peer_priv4=f"10.1.0.{252 - i}"))
    topo.veth(nodes[0].ns, "sync0", nodes[1].ns, "sync0", ["10.203.0.1/30"], ["10.203.0.2/30"])
    key_file = nodes[0].state_dir / "ha.key"
    write_key(key_file)
    pair = PairLab(topo, client, backends, weights, nodes, key_file, heartbeat_ms,
                   mode="auto" if offloads else "native")
    store = pair.store_path
    topo.at_close(lambda: [Path(str(store) + sfx).unlink(missing_ok=True) for sfx in ("", "-wal", "-shm")])
    return pair
