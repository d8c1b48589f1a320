"""Egress ports: can each take XDP frames, and what the kernel dropped sending there.

An XDP program redirects frames into the ports it forwards to. The kernel drops such a
frame, counting it only in the port's own statistics, when the port cannot take it:
a veth whose peer has no NAPI (no XDP program there, GRO off) is the case users meet.
`check_xdp_target` finds that when zfast attaches and whenever links change, and either
makes the port able to (GRO on the peer, where zfast can reach the peer's namespace) or
has the XDP program hand that egress to the kernel's forwarding (ZF_TX_KERNEL). The tc
program redirects skbs, which need neither.

`kernel_drops` reads the kernel's own count of what it dropped after the program had
decided to forward (`ethtool -S`, through the ioctl, and sysfs): frames a redirect could
not hand on, counted at the port they came in on (this kernel fails the redirect into a
veth without NAPI at once, and veth counts it in its rx_queue_N_drops); frames the
driver failed to send, counted at the port they were to leave by; and the port's
tx_dropped (skbs, as tc redirects them).
"""

from __future__ import annotations

import array
import fcntl
import json
import re
import socket
import struct
import subprocess
from dataclasses import dataclass

NETNS_DIR = "/run/netns"

# linux/sockios.h, linux/ethtool.h
SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSTATS = 0x1D
ETHTOOL_GSSET_INFO = 0x37
ETH_SS_STATS = 1
ETH_GSTRING_LEN = 32

# Driver statistics that count XDP frames the port failed to send: veth's
# tx_queue_N_xdp_xmit_errors and rx_queue_N_xdp_tx_errors, virtio's xdp_tx_drops,
# mlx5's tx_xdp_err, ... (an XDP_DROP verdict, rx_queue_N_xdp_drops, is not one).
_XDP_TX_ERROR = re.compile(r"xdp.*(xmit|tx).*(err|drop)|(xmit|tx).*xdp.*(err|drop)")
# ... and frames a redirect could not hand on, counted where they came in: veth's
# rx_queue_N_drops, mlx5's rx_xdp_redirect_err, ...
_XDP_REDIRECT_ERROR = re.compile(r"^rx_queue_\d+_drops$|redirect.*err")


@dataclass(frozen=True)
class TargetCheck:
    ifname: str
    xdp_ok: bool        # XDP frames redirected there arrive
    action: str | None  # "gro_on_peer" | "kernel" | None (nothing to do)
    detail: str         # for the event: what was found and done


def _ethtool_stats(ifname: str) -> dict[str, int]:
    """`ethtool -S IFNAME` through SIOCETHTOOL; {} where the driver has none."""
    name = ifname.encode()[:15].ljust(16, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        def call(buf: bytes) -> bytes:
            data = array.array("B", buf)         # the kernel writes into it: keep it alive
            ptr, _ = data.buffer_info()
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, name + struct.pack("P", ptr) + b"\0" * 16)
            return data.tobytes()

        try:
            # struct ethtool_sset_info: cmd, reserved, sset_mask (u64), then data[] (u32 each)
            info = call((struct.pack("IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_STATS, 0)))
        except OSError:
            return {}
        mask = struct.unpack_from("Q", info, 8)[0]
        if not mask & (1 << ETH_SS_STATS):
            return {}
        count = struct.unpack_from("I", info, 16)[0]
        if count == 0:
            return {}
        strings = call((struct.pack("III", ETHTOOL_GSTRINGS, ETH_SS_STATS, count)
                                 + b"\0" * (count * ETH_GSTRING_LEN)))
        stats = call((struct.pack("II", ETHTOOL_GSTATS, count) + b"\0" * (8 * count)))
    names = [strings[12 + i * ETH_GSTRING_LEN: 12 + (i + 1) * ETH_GSTRING_LEN].split(b"\0", 1)[0].decode()
             for i in range(count)]
    values = struct.unpack_from(f"{count}Q", stats, 8)
    return dict(zip(names, values))


def kernel_drops(ifname: str) -> dict[str, int]:
    """What the kernel dropped at ifname after the program decided to forward:
    {"xdp_redirect_errors", "xdp_xmit_errors", "tx_dropped"}."""
    stats = _ethtool_stats(ifname)
    xdp = sum(v for k, v in stats.items() if _XDP_TX_ERROR.search(k))
    redirect = sum(v for k, v in stats.items() if _XDP_REDIRECT_ERROR.search(k))
    dropped = proc_net_dev().get(ifname, {}).get("tx_dropped", 0)
    return {"xdp_redirect_errors": redirect, "xdp_xmit_errors": xdp, "tx_dropped": dropped}


_PROC_NET_DEV = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo", "rx_frame",
                 "rx_compressed", "rx_multicast", "tx_bytes", "tx_packets", "tx_errors",
                 "tx_dropped", "tx_fifo", "tx_colls", "tx_carrier", "tx_compressed")


def proc_net_dev() -> dict[str, dict[str, int]]:
    """Every interface's counters from /proc/thread-self/net/dev: the calling thread's
    namespace, even where /sys is another one's (a daemon started by `nsenter --net`)."""
    out = {}
    with open("/proc/thread-self/net/dev") as f:
        for line in f.readlines()[2:]:
            name, _, numbers = line.partition(":")
            out[name.strip()] = dict(zip(_PROC_NET_DEV, map(int, numbers.split())))
    return out


def xdp_lost(drops: dict[str, int]) -> int:
    """XDP frames lost after the program: what a rise of is an event and a problem."""
    return drops["xdp_redirect_errors"] + drops["xdp_xmit_errors"]


def _ip_json(*args: str, ns: str | None = None) -> list:
    out = subprocess.run(["ip", *(["-n", ns] if ns else []), "-d", "-j", *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return []
    return json.loads(out.stdout or "[]")


def _netns_by_id(nsid: int) -> str | None:
    """The name (in /run/netns) of the namespace this one knows as nsid, if it has one."""
    for entry in _ip_json("netns", "list-id"):
        if entry.get("nsid") == nsid and entry.get("name"):
            return entry["name"]
    return None


def _gro_on(ns: str | None, ifname: str) -> bool | None:
    """Is GRO on for ifname in namespace ns (None: this one)? None when unknown."""
    argv = ["ethtool", "-k", ifname]
    if ns:
        argv = ["nsenter", f"--net={NETNS_DIR}/{ns}", *argv]
    out = subprocess.run(argv, capture_output=True, text=True)
    m = re.search(r"^generic-receive-offload:\s*(on|off)", out.stdout, re.M)
    return None if m is None else m.group(1) == "on"


def veth_peer(ifname: str) -> tuple[str | None, str | None, bool] | None:
    """(namespace name or None for this one, peer name, peer found) of a veth; None if
    ifname is not a veth. The namespace name is None also when it has none we can use."""
    links = _ip_json("link", "show", "dev", ifname)
    if not links or links[0].get("linkinfo", {}).get("info_kind") != "veth":
        return None
    link = links[0]
    if "link_netnsid" not in link:
        return None, link.get("link"), link.get("link") is not None
    ns = _netns_by_id(link["link_netnsid"])
    if ns is None:
        return None, None, False
    peer_index = link.get("link_index")
    for other in _ip_json("link", "show", ns=ns):
        if other.get("ifindex") == peer_index:
            return ns, other["ifname"], True
    return ns, None, False


def check_xdp_target(ifname: str) -> TargetCheck:
    """Can XDP frames redirected into ifname arrive? If not, turn GRO on at the veth
    peer when it can be reached; else the caller sends that egress through the kernel."""
    peer = veth_peer(ifname)
    if peer is None:
        return TargetCheck(ifname, True, None, "not a veth")
    ns, name, found = peer
    where = f"{name} in namespace {ns}" if ns else str(name)
    if not found:
        return TargetCheck(ifname, False, "kernel",
                           f"{ifname} is a veth whose peer zfast cannot reach (a namespace without "
                           "a name in /run/netns): XDP frames there would be dropped, so the kernel "
                           "forwards that egress")
    info = _ip_json("link", "show", "dev", name, ns=ns)
    if info and info[0].get("xdp"):
        return TargetCheck(ifname, True, None, f"peer {where} has an XDP program (NAPI)")
    gro = _gro_on(ns, name)
    if gro:
        return TargetCheck(ifname, True, None, f"peer {where} has GRO on (NAPI)")
    argv = ["ethtool", "-K", name, "gro", "on"]
    if ns:
        argv = ["nsenter", f"--net={NETNS_DIR}/{ns}", *argv]
    subprocess.run(argv, capture_output=True, text=True)
    if _gro_on(ns, name):
        return TargetCheck(ifname, True, "gro_on_peer",
                           f"peer {where} had no NAPI (no XDP program, GRO off): "
                           "zfast turned GRO on there so XDP frames arrive")
    return TargetCheck(ifname, False, "kernel",
                       f"peer {where} has no NAPI (no XDP program, GRO off) and GRO could not be "
                       "turned on: XDP frames there would be dropped, so the kernel forwards that egress")

