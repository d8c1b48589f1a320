"""The VM tier's network on the host: the guest's two virtio-net NICs are qemu taps in a
namespace of their own, bridged to a client and to backends in namespaces; the backends count
what reaches them, the client sends TCP and UDP through the VIP.

    cli ns              wire ns (qemu runs here)                         be1, be2 ns
    eth0 10.0.0.2 -- brpub -- tpub == guest NIC 1: 10.0.0.1, VIP 10.0.0.10
                             tpriv == guest NIC 2: 10.1.0.1 -- brpriv -- eth0 10.1.0.2, .3

    python -m zfast.lab.vmnet serve --name be1 --out FILE   # a counting backend
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zfast.lab.netns import Topology, in_ns
from zfast.lab.topology import TARGET_TCP, TARGET_UDP, TCP_PORT, UDP_PORT, VIP4

CLIENT = "10.0.0.2"
GUEST_PUB, GUEST_PRIV = "10.0.0.1", "10.1.0.1"
BACKENDS = ["10.1.0.2", "10.1.0.3"]
# the guest's NICs, found in the guest by these MACs
PUB_MAC, PRIV_MAC = "52:54:00:7a:00:01", "52:54:00:7a:00:02"
TAPS = {"pub": ("tpub", PUB_MAC), "priv": ("tpriv", PRIV_MAC)}
# a third NIC on the public bridge, no address and no XDP: pktgen in the guest sends from it
# to the public NIC's MAC, so its frames come back in through zfast like a client's
GEN_MAC = "52:54:00:7a:00:03"
GEN_TAP = ("tgen", GEN_MAC)
PKTGEN_SRC = "10.0.0.50"


def taps(pktgen: bool = False) -> dict[str, tuple[str, str]]:
    return {**TAPS, "gen": GEN_TAP} if pktgen else dict(TAPS)


def nic_opts(queues: int = 1, pktgen: bool = False) -> list[str]:
    """qemu options for the NICs on the taps of the wire namespace (two, three with pktgen's).
    queues > 1: a multi-queue tap and virtio-net (2 vectors a queue pair, plus config and
    control)."""
    opts = []
    for role, (tap, mac) in taps(pktgen).items():
        mq = f",queues={queues}" if queues > 1 else ""
        dev = f",mq=on,vectors={2 * queues + 2}" if queues > 1 else ""
        opts += ["-netdev", f"tap,id={role},ifname={tap},script=no,downscript=no{mq}",
                 "-device", f"virtio-net-pci,netdev={role},mac={mac}{dev}"]
    return opts


@dataclass
class HostNet:
    topo: Topology
    wire: str
    client: str
    backends: list[str]
    counts: list[Path]

    def received(self) -> list[dict]:
        return [json.loads(p.read_text()) if p.exists() else {"tcp": 0, "udp": 0}
                for p in self.counts]


def build(topo: Topology, run_dir: Path, queues: int = 1, pktgen: bool = False) -> HostNet:
    wire = topo.add_ns("wire")
    client = topo.add_ns("cli")
    for role, (tap, _mac) in taps(pktgen).items():
        mq = ["multi_queue"] if queues > 1 else []
        topo.run(wire, ["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", *mq],
                 check=True)
        bridge = "brpub" if role == "gen" else f"br{role}"
        if role != "gen":
            topo.bridge(wire, bridge)
        topo.attach_to_bridge(wire, tap, bridge)
        topo.run(wire, ["ip", "link", "set", tap, "up"], check=True)
    topo.veth(client, "eth0", wire, "cpub", [f"{CLIENT}/24"], [])
    topo.attach_to_bridge(wire, "cpub", "brpub")
    topo.route(client, "default", GUEST_PUB)
    backends, counts = [], []
    for i, addr in enumerate(BACKENDS):
        ns = topo.add_ns(f"be{i + 1}")
        topo.veth(ns, "eth0", wire, f"bp{i + 1}", [f"{addr}/24"], [])
        topo.attach_to_bridge(wire, f"bp{i + 1}", "brpriv")
        topo.route(ns, "default", GUEST_PRIV)
        out = run_dir / f"be{i + 1}.json"
        topo.popen(ns, [sys.executable, "-m", "zfast.lab.vmnet", "serve", "--name", f"be{i + 1}",
                        "--out", str(out)], stdout=subprocess_devnull())
        backends.append(ns)
        counts.append(out)
    return HostNet(topo, wire, client, backends, counts)


def subprocess_devnull():
    return open(os.devnull, "w")


# ---- traffic ---------------------------------------------------------------------------------


def wait_vip(client_ns: str, timeout: float) -> float:
    """Seconds until the VIP accepts a TCP connection from the client (not counted: the
    receivers' counts are read before and after the measured traffic)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < timeout:
        try:
            tcp_round(client_ns, b"warm-up")
            return time.monotonic() - start
        except OSError as err:
            last = err
            time.sleep(1)
    raise TimeoutError(f"the VIP {VIP4}:{TCP_PORT} did not answer within {timeout:.0f} s "
                       f"({last})")


def tcp_round(client_ns: str, payload: bytes, timeout: float = 10.0) -> str:
    """One TCP connection through the VIP: a line out, the echo back; the backend's name."""
    with in_ns(client_ns):
        s = socket.create_connection((VIP4, TCP_PORT), timeout=timeout)
    with s:
        s.sendall(payload + b"\n")
        f = s.makefile("rb")
        line = f.readline()
        if not line.startswith(b"be") or not line.rstrip().endswith(payload):
            raise OSError(f"TCP answer {line!r}")
        return line.split()[0].decode()


def udp_rounds(client_ns: str, count: int, per_flow: int = 10, timeout: float = 5.0
               ) -> tuple[int, dict[str, int]]:
    """count datagrams through the VIP, one at a time, each answered, per_flow from each
    socket (a source port: a flow, which the balancer keeps on one backend): (answers, per
    backend)."""
    answered, by = 0, {}
    s = None
    try:
        for i in range(count):
            if i % per_flow == 0:
                if s is not None:
                    s.close()
                with in_ns(client_ns):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.settimeout(timeout)
            payload = f"u{i}".encode()
            s.sendto(payload, (VIP4, UDP_PORT))
            try:
                while True:
                    data, _ = s.recvfrom(2048)
                    name, _, echo = data.partition(b" ")
                    if echo == payload:
                        break
            except socket.timeout:
                continue
            answered += 1
            by[name.decode()] = by.get(name.decode(), 0) + 1
    finally:
        if s is not None:
            s.close()
    return answered, by


def drive(net: HostNet, tcp: int, udp: int) -> dict:
    """tcp connections and udp datagrams from the client; what the client saw answered and
    what each backend counted (the difference over the run)."""
    before = net.received()
    tcp_ok, tcp_by = 0, {}
    for i in range(tcp):
        try:
            name = tcp_round(net.client, f"t{i}".encode())
        except OSError:
            continue
        tcp_ok += 1
        tcp_by[name] = tcp_by.get(name, 0) + 1
    udp_ok, udp_by = udp_rounds(net.client, udp)
    time.sleep(0.5)
    after = net.received()
    at = [{k: a[k] - b[k] for k in ("tcp", "udp")} for a, b in zip(after, before)]
    return {"sent": {"tcp": tcp, "udp": udp},
            "answered": {"tcp": tcp_ok, "udp": udp_ok},
            "answered_by": {"tcp": tcp_by, "udp": udp_by},
            "received": {f"be{i + 1}": c for i, c in enumerate(at)}}


def verdict(result: dict) -> list[str]:
    """What is wrong with a traffic result (empty: exact counts, both backends used)."""
    problems = []
    for proto in ("tcp", "udp"):
        sent = result["sent"][proto]
        got = sum(c[proto] for c in result["received"].values())
        if got != sent:
            problems.append(f"{proto}: {sent} sent, {got} at the backends")
        if result["answered"][proto] != sent:
            problems.append(f"{proto}: {sent} sent, {result['answered'][proto]} answered")
        if sent >= 10 and sum(1 for c in result["received"].values() if c[proto]) < 2:
            problems.append(f"{proto}: not spread over both backends")
    return problems


# ---- a backend that counts -------------------------------------------------------------------


def serve(name: str, out: Path, tcp_port: int = TARGET_TCP, udp_port: int = TARGET_UDP) -> None:
    """TCP: each line echoed as '<name> <line>', a connection counted once; UDP: each
    datagram answered '<name> <datagram>' and counted. Counts go to out (JSON) at each one."""
    counts = {"tcp": 0, "udp": 0}
    lock = threading.Lock()
    tag = name.encode()

    def count(proto: str) -> None:
        with lock:
            counts[proto] += 1

    def flush() -> None:        # every 0.1 s, not at every datagram: pktgen sends thousands
        written = None
        while True:
            with lock:
                now = dict(counts)
            if now != written:
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(now))
                os.replace(tmp, out)
                written = now
            time.sleep(0.1)

    class TCP(socketserver.StreamRequestHandler):
        def handle(self):
            counted = False
            for line in self.rfile:
                if not counted and not line.startswith(b"warm-up"):
                    count("tcp")
                    counted = True
                self.wfile.write(tag + b" " + line)

    class UDP(socketserver.DatagramRequestHandler):
        def handle(self):
            count("udp")
            self.wfile.write(tag + b" " + self.rfile.read())

    class TCPServer(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    out.write_text(json.dumps(counts))
    threading.Thread(target=flush, daemon=True).start()
    udp = socketserver.UDPServer(("0.0.0.0", udp_port), UDP, bind_and_activate=False)
    udp.socket.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
    udp.server_bind()
    udp.server_activate()
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    TCPServer(("0.0.0.0", tcp_port), TCP).serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m zfast.lab.vmnet")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="a counting TCP/UDP backend")
    s.add_argument("--name", required=True)
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    serve(args.name, args.out)


if __name__ == "__main__":
    main()
