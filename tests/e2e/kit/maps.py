"""A node's pinned maps (/run/zfast/bpffs/<node>/) as bpftool shows them: what a test reads
while a daemon runs, or after it died."""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess

from zfast.dataplane.reasons import defines, reasons
from zfast.paths import pin_dir

# The maps that hold what a project file says (rings are left out: 1M slots; the services
# entries name the ring in use, so a ring flip shows there).
STATE_MAPS = ("services", "backends", "fw_ports", "config", "vips")

# Fields the daemon changes by itself, whatever the file says: the next-hop generation
# (bumped on route/neighbour changes and every few seconds) and the HA lease deadline.
VOLATILE = {"config": ("nh_gen", "active_until_ns")}

FORWARD = defines()["ZF_DIR_FORWARD"]   # flow_value.dir of a forward entry


def map_dump(node: str, name: str) -> list:
    """`bpftool map dump pinned /run/zfast/bpffs/<node>/<name> -j`: the entries."""
    path = pin_dir(node) / name
    p = subprocess.run(["bpftool", "map", "dump", "pinned", str(path), "-j"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"bpftool map dump {path}: {p.stderr.strip()}"
    return json.loads(p.stdout)


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
        if v["dir"] != FORWARD:
            continue
        fam = k["family"]
        out[(_addr(k["src"]["w"], fam), _port(k["sport"]),
             _addr(k["dst"]["w"], fam), _port(k["dport"]))] = _addr(v["addr"]["w"], fam)
    return out


def forward_flows(node: str) -> int:
    """Forward entries in a node's pinned flows map: the flows it would dump."""
    count = 0
    for entry in map_dump(node, "flows"):
        value = entry.get("formatted", {}).get("value")
        if value is None:
            raise AssertionError(f"bpftool shows no BTF-formatted value: {entry}")
        if value.get("dir") == FORWARD:
            count += 1
    return count


def reason_counters(node: str) -> dict[str, int]:
    """Packets per verdict reason, summed over CPUs, read from the pinned map (works while
    no daemon runs)."""
    names = [r.name for r in reasons()]
    out = {}
    for e in map_dump(node, "reason_stats"):
        f = e["formatted"]
        idx = f["key"]
        if idx < len(names):
            out[names[idx]] = sum(int(c["value"]["packets"]) for c in f["values"])
    return out
