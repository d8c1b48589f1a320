"""Keeps the kernel's neighbour entries on the node's interfaces confirmed.

The data plane takes its next hops' MACs from the kernel's neighbour table (the FIB
lookup), but a packet it forwards never passes the kernel's neighbour state machine:
an entry that went STALE is not probed again until the kernel itself sends through
it. A neighbour that changes its MAC without announcing it (no gratuitous ARP or
unsolicited NA; a Linux bridge that takes a new port's lower MAC is one) then keeps
its old MAC for as long as only XDP talks to it, and every packet to it is lost.

So, every few seconds, each STALE entry on the node's interfaces is handed back to the
kernel with NTF_USE, as if the kernel had just sent through it: it moves to DELAY, then
PROBE, and is confirmed by a unicast probe to the MAC it has. A neighbour that moved on
does not answer that; with mcast_resolicit (0 by default, set on the node's interfaces
here) the kernel then asks by broadcast and learns the new MAC. Without it the entry would
fail, and a reply from a VIP cannot be handed to the kernel to resolve (its source is a
local address: the kernel drops it as a martian). This is what "managed" neighbours
(NTF_EXT_MANAGED) do for offloaded forwarding, without making an entry for every address. A bare rtnetlink socket, as in nexthops.py: a netlink
library would cost a small daemon ~20 MiB.
"""

from __future__ import annotations

import os
import socket
import struct

# linux/rtnetlink.h, linux/neighbour.h, linux/netlink.h
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NDA_DST = 1
NTF_USE = 0x01
NUD_STALE = 0x04

_NLMSGHDR = struct.Struct("=IHHII")     # len, type, flags, seq, pid
_NDMSG = struct.Struct("=BxxxiHBB")     # family, pad, ifindex, state, flags, type
_RTATTR = struct.Struct("=HH")          # len, type

MAX_PER_SWEEP = 4096   # entries nudged in one sweep at most: the work stays bounded
MCAST_RESOLICIT = 3    # broadcast probes after the unicast ones failed (the kernel's default: 0)


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    raw = _RTATTR.pack(_RTATTR.size + len(payload), kind) + payload
    return raw.ljust(_align(len(raw)), b"\0")


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def parse_neighbours(data: bytes):
    """(family, ifindex, state, destination bytes) of each RTM_NEWNEIGH in a dump reply,
    and whether the dump ended (NLMSG_DONE) in this datagram."""
    out, done, off = [], False, 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
            if err:
                raise OSError(-err, os.strerror(-err))
        elif kind == RTM_NEWNEIGH:
            body = off + _NLMSGHDR.size
            family, ifindex, state, _, _ = _NDMSG.unpack_from(data, body)
            dst, a = None, body + _NDMSG.size
            while a + _RTATTR.size <= off + length:
                alen, akind = _RTATTR.unpack_from(data, a)
                if alen < _RTATTR.size:
                    break
                if akind == NDA_DST:
                    dst = data[a + _RTATTR.size:a + alen]
                a += _align(alen)
            if dst is not None:
                out.append((family, ifindex, state, dst))
        off += _align(length)
    return out, done


class NeighbourKeeper:
    """sweep(): nudge every STALE IPv4/IPv6 neighbour on the given interfaces."""

    def __init__(self, interfaces: list[str]):
        self.interfaces = list(interfaces)
        self.nudged = 0           # entries handed back to the kernel, all sweeps
        self._seq = 0

    def _ifindexes(self) -> set[int]:
        found = set()
        for name in self.interfaces:   # looked up each sweep: a link may be re-made
            try:
                found.add(socket.if_nametoindex(name))
            except OSError:
                pass
        return found

    def stale(self, sock: socket.socket) -> list[tuple[int, int, bytes]]:
        self._seq += 1
        sock.send(_message(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, self._seq,
                           _NDMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)))
        ours, out, done = self._ifindexes(), [], False
        while not done:
            entries, done = parse_neighbours(sock.recv(1 << 16))
            out += [(fam, idx, dst) for fam, idx, state, dst in entries
                    if state == NUD_STALE and idx in ours
                    and fam in (socket.AF_INET, socket.AF_INET6)]
        return out

    def nudge(self, sock: socket.socket, family: int, ifindex: int, dst: bytes) -> None:
        self._seq += 1
        body = _NDMSG.pack(family, ifindex, 0, NTF_USE, 0) + _attr(NDA_DST, dst)
        sock.send(_message(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK, self._seq, body))
        parse_neighbours(sock.recv(1 << 12))   # the ack: raises on an error

    def ask_by_broadcast(self) -> None:
        """mcast_resolicit on each interface, IPv4 and IPv6, where it is still 0 (checked
        each sweep: a link that is made again starts from the default)."""
        for name in self.interfaces:
            for family in ("ipv4", "ipv6"):
                path = f"/proc/sys/net/{family}/neigh/{name}/mcast_resolicit"
                try:
                    with open(path, "r+") as f:
                        if f.read().strip() == "0":
                            f.seek(0)
                            f.write(str(MCAST_RESOLICIT))
                except OSError:   # no such link (yet), or IPv6 off on it
                    continue

    def sweep(self) -> int:
        """One pass; returns how many entries were nudged. OSError if netlink fails."""
        self.ask_by_broadcast()
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
            sock.settimeout(2.0)
            n = 0
            for family, ifindex, dst in self.stale(sock)[:MAX_PER_SWEEP]:
                try:
                    self.nudge(sock, family, ifindex, dst)
                    n += 1
                except OSError:   # gone meanwhile (ENOENT): nothing to keep
                    continue
            self.nudged += n
            return n
