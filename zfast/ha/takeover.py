"""Claiming and releasing the pair's VIPs.

The VIPs are never kernel addresses on a zfast node: the data plane answers
ARP and neighbour solicitations for them (bpf/ha.h) while the node's lease
runs. Claiming them means: renew the lease, then announce with gratuitous
ARP (IPv4) and unsolicited neighbour advertisements (IPv6) so that clients,
switches and backends move to this node's MAC at once, not when their caches
expire. Releasing them means ending the lease.
"""

from __future__ import annotations

import socket
import time

from zfast.dataplane.loader import AF, Loaded, set_addr

ETH_P_ALL = 0x0003


def _mac_bytes(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def interface_macs() -> dict[int, tuple[str, str]]:
    """ifindex -> (name, MAC) of this namespace's Ethernet interfaces (`ip netns exec`
    mounts the namespace's own /sys, so /sys/class/net is this namespace's)."""
    out = {}
    for idx, name in socket.if_nameindex():
        try:
            with open(f"/sys/class/net/{name}/address") as f:
                mac = f.read().strip()
        except OSError:
            mac = ""
        if mac and mac != "00:00:00:00:00:00":
            out[idx] = (name, mac)
    return out


class VipHolder:
    def __init__(self, dp: Loaded, vips, interfaces: list[str]):
        self.dp = dp
        self.vips = list(vips)
        self.interfaces = list(interfaces)
        self.held = False
        self.announced = 0
        self.frames: dict[str, list[bytes]] = {}

    def setup(self) -> None:
        """Tell the data plane which addresses are VIPs and each interface's MAC."""
        table = self.dp.table("vips")
        for vip in self.vips:
            key = table.Key()
            set_addr(key.addr, vip)
            key.family = AF[vip.version]
            table[key] = table.Leaf(1)
        self.refresh_macs()

    def refresh_macs(self) -> None:
        macs = self.dp.table("if_macs")
        for idx, (_, mac) in interface_macs().items():
            if idx < self.dp.sizes.max_ifindex:
                value = macs.Leaf()
                for i, b in enumerate(_mac_bytes(mac)):
                    value.mac[i] = b
                macs[macs.Key(idx)] = value

    def renew(self, lease_s: float) -> None:
        """Hold the VIPs for lease_s more seconds (CLOCK_MONOTONIC, as bpf_ktime_get_ns)."""
        self.dp.update_config(active_until_ns=time.monotonic_ns() + int(lease_s * 1e9))
        self.held = True

    def release(self) -> None:
        self.dp.update_config(active_until_ns=0)
        self.held = False

    def prepare(self) -> None:
        """Build the announcements ahead of time: a takeover only sends them."""
        self.frames = self._frames()

    def _frames(self) -> dict[str, list[bytes]]:
        # scapy takes ~0.2 s to import (cryptography with it): paid here, in prepare(), which
        # Pair.start calls once its sockets listen, not when the daemon imports the pair
        from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6  # noqa: PLC0415
        from scapy.layers.l2 import ARP, Ether  # noqa: PLC0415

        by_name = {name: mac for name, mac in interface_macs().values()}
        out = {}
        for ifname in self.interfaces:
            mac = by_name.get(ifname)
            if not mac:
                continue
            frames = out[ifname] = []
            for vip in self.vips:
                if vip.version == 4:
                    for op in (1, 2):  # request and reply: hosts differ in which they heed
                        frames.append(bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") /
                                            ARP(op=op, hwsrc=mac, psrc=str(vip),
                                                hwdst="ff:ff:ff:ff:ff:ff" if op == 2 else "00:00:00:00:00:00",
                                                pdst=str(vip))))
                else:
                    frames.append(bytes(Ether(src=mac, dst="33:33:00:00:00:01") /
                                        IPv6(src=str(vip), dst="ff02::1", hlim=255) /
                                        ICMPv6ND_NA(tgt=str(vip), R=0, S=0, O=1) /
                                        ICMPv6NDOptDstLLAddr(lladdr=mac)))
        return out

    def announce(self) -> None:
        """Gratuitous ARP and unsolicited NA for every VIP on every interface."""
        for ifname, frames in (self.frames or self._frames()).items():
            try:
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as s:
                    s.bind((ifname, 0))
                    for frame in frames:
                        s.send(frame)
            except OSError:
                continue  # an interface going away must not stop the others
        self.announced += 1
