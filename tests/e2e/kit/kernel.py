"""What the kernel holds for a namespace, read with ip and tc: programs attached to its
links, their MACs, neighbour entries, the processes in it; and taking a program off."""

from __future__ import annotations

import json
import subprocess


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


def link_mac(ns: str, ifname: str) -> bytes:
    """The MAC address of ns/ifname, as bytes."""
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname],
                         capture_output=True, text=True, check=True).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def mac_of(ns: str, ifname: str) -> str:
    return link_mac(ns, ifname).hex(":")


def neighbour(ns: str, address: str) -> str | None:
    """The MAC ns's neighbour table holds for address (None: no entry or no address)."""
    out = subprocess.run(["ip", "-n", ns, "-j", "neigh", "show", "to", address],
                         capture_output=True, text=True, check=True).stdout
    entries = [e for e in json.loads(out or "[]") if e.get("lladdr")]
    return entries[0]["lladdr"] if entries else None
