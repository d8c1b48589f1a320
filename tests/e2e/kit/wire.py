"""Frames on the wire of the pair lab, through AF_PACKET sockets: the heartbeats a node
sends, the UDP datagrams as the backends see them, who answers an ARP request."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import socket
import struct
import subprocess
import threading
import time

from tests.e2e.kit.kernel import link_mac
from tests.e2e.kit.pair import HA_PORT, PairEnv
from tests.e2e.kit.traffic import UdpFlow
from zfast.lab import topology
from zfast.lab.netns import in_ns

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

    def judge(self, flow: UdpFlow) -> dict:
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
    mac = link_mac(ns, ifname)
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
