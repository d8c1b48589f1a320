"""The names of the statistics series: how a sample becomes named values (`flatten`), and
`SeriesKey`, a name parsed back into its parts.

Series names (``/`` separates the parts; no part holds a ``/``)::

    service/<name>/packets|bytes
    backend/<service>/<address>/packets|bytes|weight|healthy
    port/<address>/<port>/<proto>/packets|allowed|denied|rate_limited
    drop/<reason>                     packets (reason as in stats' "drops")
    verdict/<reason>/packets|bytes
    flows                             entries of the flow table (gauge)
    cpu/<instance>                    CPU time, microseconds (counter)
    memory/<instance>                 bytes (gauge)
    map/<name>/entries|max            fill of a BPF map (gauges)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

# The parts after the kind, for each kind (SeriesKey's fields of that name)
_PARTS = {
    "service": ("service", "field"),
    "backend": ("service", "address", "field"),
    "port": ("address", "port", "proto", "field"),
    "drop": ("reason",),
    "verdict": ("reason", "field"),
    "flows": (),
    "cpu": ("instance",),
    "memory": ("instance",),
    "map": ("map", "field"),
}

# Series that are gauges (everything else is a counter)
_GAUGE_SUFFIXES = ("/weight", "/healthy", "/entries", "/max")


def is_gauge(name: str) -> bool:
    return name == "flows" or name.startswith("memory/") or name.endswith(_GAUGE_SUFFIXES)


@dataclass(frozen=True)
class SeriesKey:
    """A series name, parsed: its kind and the parts that kind has (the others None)."""

    kind: str                       # service, backend, port, drop, verdict, flows, cpu, memory, map
    service: str | None = None      # service, backend
    address: str | None = None      # backend: its address; port: the public one ("*": any)
    port: int | None = None         # port
    proto: str | None = None        # port
    reason: str | None = None       # drop, verdict
    instance: str | None = None     # cpu, memory
    map: str | None = None          # map
    field: str | None = None        # the last part: packets, bytes, weight, entries, ...

    @classmethod
    def parse(cls, name: str) -> SeriesKey | None:
        """The key of a name; None for a name outside the scheme above."""
        kind, *rest = name.split("/")
        parts = _PARTS.get(kind)
        if parts is None or len(rest) != len(parts):
            return None
        values: dict = dict(zip(parts, rest))
        if "port" in values:
            if not values["port"].isdigit():
                return None
            values["port"] = int(values["port"])
        return cls(kind, **values)

    @property
    def name(self) -> str:
        return "/".join([self.kind, *(str(getattr(self, p)) for p in _PARTS[self.kind])])

    def sibling(self, **parts) -> str:
        """The name of the series with these parts changed: key.sibling(field="bytes")."""
        return replace(self, **parts).name


def flatten(stats: Mapping, resources: Mapping[str, tuple[int, int]] | None = None,
            maps: Mapping[str, tuple[int, int]] | None = None) -> tuple[list[str], list[int], dict]:
    """A stats dict (Node.stats()) as (names, integer values, meta)."""
    # f-strings rather than SeriesKey(...).name: this runs every tick over every backend.
    pairs: list[tuple[str, int]] = []
    add = pairs.append
    vips = {}
    for svc in stats.get("services", ()):
        n = svc["name"]
        vips[n] = svc.get("vip")
        add((f"service/{n}/packets", svc["packets"]))
        add((f"service/{n}/bytes", svc["bytes"]))
        for be in svc.get("backends", ()):
            prefix = f"backend/{n}/{be['address']}/"
            add((prefix + "packets", be["packets"]))
            add((prefix + "bytes", be["bytes"]))
            if "weight" in be:
                add((prefix + "weight", be["weight"]))
            if "healthy" in be:
                add((prefix + "healthy", 1 if be["healthy"] else 0))
    for pp in stats.get("public_ports", ()):
        prefix = f"port/{pp.get('address', '*')}/{pp['port']}/{pp['proto']}/"
        for key in ("packets", "allowed", "denied", "rate_limited"):
            if key in pp:
                add((prefix + key, pp[key]))
    for reason, packets in stats.get("drops", {}).items():
        add((f"drop/{reason}", packets))
    for reason, v in stats.get("verdicts", {}).items():
        add((f"verdict/{reason}/packets", v["packets"]))
        add((f"verdict/{reason}/bytes", v["bytes"]))
    flows = stats.get("flows")
    if flows is None and maps and "flows" in maps:
        flows = maps["flows"][0]
    if flows is not None:
        add(("flows", flows))
    for inst, (cpu, mem) in (resources or {}).items():
        add((f"cpu/{inst}", cpu))
        add((f"memory/{inst}", mem))
    for name, (entries, most) in (maps or {}).items():
        add((f"map/{name}/entries", entries))
        add((f"map/{name}/max", most))
    names = [name for name, _ in pairs]
    values = [value for _, value in pairs]
    return names, values, {"services": vips}
