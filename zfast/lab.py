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

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zfast.api import ApiError, Client
from zfast.netns import Topology

VIP4 = "10.0.0.10"
VIP6 = "fd00::10"
CLIENT4, CLIENT6 = "10.0.0.2", "fd00::2"
TCP_PORT, TARGET_TCP = 80, 8080
UDP_PORT, TARGET_UDP = 53, 5353


def backend_addrs(i: int) -> tuple[str, str]:
    return f"10.1.0.{i + 2}", f"fd01::{i + 2:x}"


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
                     "mode": "native"},
            "datapath": {"flow_table": 65536, "max_services": 8, "max_backends": 64},
            "services": [service("app", VIP4, 0), service("app6", VIP6, 1)],
        }

    def write_config(self, project: dict, path: Path | None = None) -> Path:
        path = path or self.config_path
        path.write_text(yaml.safe_dump(project, sort_keys=False))
        return path

    def start_servers(self) -> None:
        for i, ns in enumerate(self.backends):
            self.servers.append(self.topo.popen(ns, [sys.executable, "-m", "zfast.echo", "--name",
                                                     f"be{i + 1}", "--port", str(TARGET_TCP),
                                                     "--udp-port", str(TARGET_UDP)],
                                                stdout=open("/dev/null", "w")))

    def start_node(self, timeout: float = 60.0) -> Client:
        self.write_config(self.project())
        self.node_proc = self.topo.popen(self.lb, [sys.executable, "-m", "zfast.cli", "up", "-c",
                                                   str(self.config_path)])
        client = Client(self.state_dir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.node_proc.poll() is not None:
                raise RuntimeError(f"zfast up exited with {self.node_proc.returncode}")
            try:
                client.get("/status")
                return client
            except ApiError:
                time.sleep(0.2)
        raise RuntimeError("zfast up did not answer in time")

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
    import shutil

    from zfast.node import down
    try:
        down(state_dir)
    except Exception:
        pass
    shutil.rmtree(state_dir, ignore_errors=True)


def build(topo: Topology, n_backends: int = 3, weights: list[int] | None = None,
          name: str = "lab", extra_clients: int = 0) -> Lab:
    """extra_clients: more client namespaces, client n on 10.2.n.2/24 (fd02:n::2/64)
    behind the balancer's port pubN."""
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
        # Senders fill in full checksums (an XDP NAT cannot fix a partial one);
        # receivers of redirected frames need NAPI, which GRO turns on.
        topo.offload_off(ns, "eth0")
        topo.gro_on(ns, "eth0")
        backends.append(ns)
    topo.route(client, "default", "10.0.0.1")
    topo.route(client, "default", "fd00::1")
    topo.offload_off(client, "eth0")
    topo.gro_on(client, "eth0")
    extras = []
    for n in range(1, extra_clients + 1):
        ns = topo.add_ns(f"cli{n + 1}")
        topo.veth(ns, "eth0", lb, f"pub{n}", [f"10.2.{n}.2/24", f"fd02:{n:x}::2/64"],
                  [f"10.2.{n}.1/24", f"fd02:{n:x}::1/64"])
        topo.route(ns, "default", f"10.2.{n}.1")
        topo.route(ns, "default", f"fd02:{n:x}::1")
        topo.offload_off(ns, "eth0")
        topo.gro_on(ns, "eth0")
        extras.append(ns)
    topo.gro_on(switch, "lbp")
    node_name = f"{name}-{client.split('-')[2] if client.count('-') >= 3 else 'x'}"
    state_dir = Path("/run/zfast") / node_name
    state_dir.mkdir(parents=True, exist_ok=True)
    topo.at_close(lambda: _remove_node_state(state_dir))
    return Lab(topo, client, lb, switch, backends, weights, extras, node_name, state_dir,
               state_dir / "project.yaml")
