"""Native XDP on virtio-net (cloud VMs): what the guest's driver needs, read from the device.

virtio_net (Linux 6.1, Debian 12's kernel; `virtnet_xdp_set`) attaches an XDP program only if:
- the host lets the guest turn its receive offloads off (feature CTRL_GUEST_OFFLOADS), or
  offers none of them (GUEST_TSO4/TSO6/ECN/UFO/CSUM): XDP must see whole, checksummed frames.
  With the control feature the driver turns them off itself while XDP is on; without it only
  the hypervisor can (qemu: guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,
  guest_csum=off);
- a frame fits one page: the MTU at most PAGE_SIZE - 32 (struct padded_vnet_hdr), 4064 with
  4 KiB pages, before 6.3 added multi-buffer XDP. Measured in Debian's 6.1.0-57 guest: 4064
  attaches, 4065 is refused with EINVAL alone (the driver logs "XDP requires MTU less than
  4064"), which is all an attach would otherwise say;
- with mergeable receive buffers, the header may share a descriptor (ANY_LAYOUT or VERSION_1).

It then wants one transmit queue per CPU for XDP_TX and redirects on top of the queues in use:
with fewer, 6.1 still attaches, and sends those frames through shared queues under a lock
(slower, not refused; the driver logs "XDP request 3 queues but max is 1"). The note says so,
and how to get lock-free sends: 2 x CPUs queue pairs (the driver uses one per CPU itself),
or fewer in use. zfast does not change the channels itself: that moves receive spreading,
the operator's choice.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

# virtio-net feature bits (include/uapi/linux/virtio_net.h, virtio_config.h)
GUEST_CSUM, CTRL_GUEST_OFFLOADS = 1, 2
GUEST_TSO4, GUEST_TSO6, GUEST_ECN, GUEST_UFO = 7, 8, 9, 10
MRG_RXBUF = 15
ANY_LAYOUT, VERSION_1 = 27, 32
RX_OFFLOADS = {GUEST_CSUM: "guest_csum", GUEST_TSO4: "guest_tso4", GUEST_TSO6: "guest_tso6",
               GUEST_ECN: "guest_ecn", GUEST_UFO: "guest_ufo"}

PADDED_VNET_HDR = 32     # sizeof(struct padded_vnet_hdr), virtio_net.c


def max_mtu(page_size: int = 4096) -> int:
    """The largest MTU 6.1's virtio_net attaches XDP at: a frame and its header in a page."""
    return page_size - PADDED_VNET_HDR


def has(features: str, bit: int) -> bool:
    """features: the device's feature bits as sysfs shows them, a '0'/'1' string, bit 0 first."""
    return bit < len(features) and features[bit] == "1"


def problems(features: str, mtu: int, release: tuple[int, int] = (6, 1),
             page_size: int = 4096) -> list[str]:
    """Why virtio_net would refuse native XDP, each in a phrase (empty: it should attach)."""
    out = []
    offered = [name for bit, name in RX_OFFLOADS.items() if has(features, bit)]
    if offered and not has(features, CTRL_GUEST_OFFLOADS):
        out.append("the host implements receive offloads (" + ", ".join(offered) + ") and "
                   "does not let the guest turn them off: turn them off in the hypervisor "
                   "(qemu: " + ",".join(f"{n}=off" for n in offered) + ")")
    if has(features, MRG_RXBUF) and not (has(features, ANY_LAYOUT) or has(features, VERSION_1)):
        out.append("mergeable buffers without ANY_LAYOUT/VERSION_1: the header needs a "
                   "descriptor of its own")
    if release < (6, 3) and mtu > max_mtu(page_size):
        out.append(f"MTU {mtu} is above {max_mtu(page_size)}, the most XDP takes on virtio-net "
                   f"before Linux 6.3 (a frame must fit one page): lower the MTU")
    return out


def queue_note(current: int, maximum: int, cpus: int, ifname: str = "IFACE") -> str:
    """A phrase when XDP_TX and redirects go through shared queues under a lock (6.1 wants
    one more transmit queue per CPU on top of those in use); empty when it has enough. The
    driver uses min(maximum, cpus) queue pairs by default: a VM needs 2 x CPUs of them, or
    fewer in use."""
    if current + cpus <= maximum:
        return ""
    fix = f"give the VM {2 * cpus} queue pairs (qemu: queues=N on the tap, mq=on on the NIC)"
    if maximum > cpus:
        fix += f", or use {maximum - cpus} (ethtool -L {ifname} combined {maximum - cpus})"
    return (f"virtio-net: {current} of {maximum} queue pairs in use and XDP wants {cpus} more "
            f"(one per CPU): XDP_TX and redirects share queues under a lock; {fix}")


# ---- reading the device -----------------------------------------------------------------------


def driver(ifname: str) -> str | None:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{ifname}/device/driver"))
    except OSError:
        return None


def is_virtio(ifname: str) -> bool:
    return driver(ifname) == "virtio_net"


def features(ifname: str) -> str:
    return Path(f"/sys/class/net/{ifname}/device/features").read_text().strip()


def mtu(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/mtu").read_text())


def kernel_release() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def channels(ifname: str) -> tuple[int, int] | None:
    """(combined queues in use, most the device has), from ethtool -l; None if unknown."""
    res = subprocess.run(["ethtool", "-l", ifname], capture_output=True, text=True)
    if res.returncode:
        return None
    found = re.findall(r"Combined:\s*(\d+)", res.stdout)
    return (int(found[1]), int(found[0])) if len(found) == 2 else None


def refusal(ifname: str) -> list[str]:
    """problems() of the device ifname (a virtio-net NIC)."""
    return problems(features(ifname), mtu(ifname), kernel_release(), os.sysconf("SC_PAGE_SIZE"))


def attach_note(ifname: str) -> str:
    ch = channels(ifname)
    return queue_note(ch[0], ch[1], os.cpu_count() or 1, ifname) if ch else ""
