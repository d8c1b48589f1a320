"""Services and backends, from the project file into the data plane's maps.

Reconciles desired services with what the maps hold, in an order that never
breaks a live flow:
  1. backends are written (new ones UP) before any ring points at them;
  2. a changed Maglev table goes into the service's spare ring, and only then
     do the service's (VIP, port, proto) entries switch to it, one atomic map
     update each: a packet sees the old table or the new, never a mix;
  3. removed backends and services are unhooked last; their established
     flows drain (flow entries carry the backend's address, not a pointer).
Indices (service slot, backend slot) stay with their name/address across
applies, so counters and flows keep meaning the same thing.

Health (zfast/controllers/health.py reports it through set_health()): an unhealthy
backend of a service with a ``health`` section leaves the service's Maglev table
(rebuilt through the spare ring) and is flagged DOWN, so that its established flows
are balanced again at their next packet. The record outlives apply(): a file applied
again does not bring a down backend back. Weight 0 still drains a healthy backend.
When every backend with weight > 0 is down the service fails open: all of them stay
in the table, flagged UP, as if there were no checks (docs/datapath.md, Decisions).
"""

from __future__ import annotations

import ctypes
import ipaddress
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from zfast.config import PublicPort, Service
from zfast.dataplane.loader import (
    AF,
    BACKEND_DOWN,
    BACKEND_UP,
    NO_BACKEND,
    PROTO,
    DatapathError,
    IPAddress,
    Loaded,
    get_addr,
    set_addr,
)
from zfast.dataplane.reasons import defines
from zfast.reconcile import maglev

MAX_SERVICE_PORTS = defines()["ZF_MAX_SERVICE_PORTS"]


class Slots:
    """Index allocator that hands out the longest-free slot first.

    Reusing a slot late keeps a just-removed backend's counters and draining
    flows apart from whatever takes its place.
    """

    def __init__(self, size: int, first: int = 0):
        self.free = deque(range(first, size))
        self.used: dict = {}

    def get(self, name) -> tuple[int, bool]:
        """(slot, is_new) for name."""
        if name in self.used:
            return self.used[name], False
        if not self.free:
            raise DatapathError(f"no free slot for {name} (all {len(self.used)} in use)")
        slot = self.free.popleft()
        self.used[name] = slot
        return slot, True

    def release(self, name) -> None:
        slot = self.used.pop(name, None)
        if slot is not None:
            self.free.append(slot)

    def export(self, encode=lambda k: k) -> dict:
        return {"free": list(self.free), "used": [[encode(k), v] for k, v in self.used.items()]}

    def restore(self, data: dict, decode=lambda k: k) -> None:
        self.free = deque(data["free"])
        self.used = {decode(k): v for k, v in data["used"]}


@dataclass
class _Installed:
    """What the maps hold for one service."""
    index: int
    ring_gen: int = 0
    table: np.ndarray | None = None                       # backend slots per ring slot
    backends: dict[IPAddress, int] = field(default_factory=dict)  # address -> slot
    weights: dict[IPAddress, int] = field(default_factory=dict)
    keys: dict[tuple, tuple] = field(default_factory=dict)  # (addr, port, proto) -> (target, fw slot)
    spec: Service | None = None
    fail_open: bool = False    # every backend with weight > 0 is unhealthy: all stay in


class ServiceTable:
    def __init__(self, dp: Loaded):
        self.dp = dp
        self.services: dict[str, _Installed] = {}
        self.service_slots = Slots(dp.sizes.max_services)
        self.backend_slots = Slots(dp.sizes.max_backends)
        # (service, address) the health checks say are down; kept across apply()
        self.unhealthy: set[tuple[str, IPAddress]] = set()
        # apply() and set_health() come from different threads (API, health controller)
        self.lock = threading.RLock()

    # ---- one map entry at a time ---------------------------------------

    def _service_key(self, vip: IPAddress, port: int, proto: str):
        key = self.dp.table("services").Key()
        set_addr(key.vip, vip)
        key.port = _htons(port)
        key.proto = PROTO[proto]
        key.family = AF[vip.version]
        return key

    def _write_backend(self, slot: int, address: IPAddress, flags: int) -> None:
        table = self.dp.table("backends")
        value = table.Leaf()
        set_addr(value.addr, address)
        value.family = AF[address.version]
        value.flags = flags
        table[table.Key(slot)] = value

    # ---- reconcile -------------------------------------------------------

    def check_capacity(self, services: tuple[Service, ...]) -> list[str]:
        """Problems that would make apply() fail half-way; checked before touching anything."""
        problems = []
        ports = sum(len(s.ports) for s in services)
        if ports > MAX_SERVICE_PORTS:
            problems.append(f"services: {ports} (VIP, port) entries, the data plane holds {MAX_SERVICE_PORTS}")
        if len(services) > self.dp.sizes.max_services:
            problems.append(f"services: {len(services)} services, datapath.max_services is "
                            f"{self.dp.sizes.max_services}")
        wanted = {(s.name, b.address) for s in services for b in s.backends}
        kept = set(self.backend_slots.used) & wanted
        if len(wanted - kept) > len(self.backend_slots.free):
            problems.append(f"backends: {len(wanted)} backends, datapath.max_backends is "
                            f"{self.dp.sizes.max_backends}")
        return problems

    def apply(self, services: tuple[Service, ...], public_ports: tuple[PublicPort, ...] = (),
              slot_of: dict[tuple, int] | None = None) -> list[str]:
        """Make the maps hold exactly these services and the public ports that lead to them
        (slot_of: the firewall slot of each public port); returns what changed."""
        problems = self.check_capacity(services)
        if problems:
            raise DatapathError("; ".join(problems))
        changes: list[str] = []
        wanted = {s.name: s for s in services}
        with self.lock:
            for svc in services:
                entries = {(svc.vip, p.port, p.proto): (p.target_port, 0) for p in svc.ports}
                for pp in public_ports:
                    if pp.service == svc.name:
                        key = (pp.address, pp.port, pp.proto)
                        entries[key] = (pp.target_port, (slot_of or {})[key])
                changes += self._apply_service(svc, entries)
            for name in [n for n in self.services if n not in wanted]:
                changes += self._remove_service(name)
        return changes

    # ---- health ------------------------------------------------------------

    def set_health(self, service: str, address: IPAddress, healthy: bool) -> list[str]:
        """Record what the health checks say of one backend; when that changes the maps
        (the backend is installed, its service has a health section), rebuild the
        service's ring through the spare and rewrite its flags. Returns what changed."""
        return self.set_health_many([(service, address, healthy)])

    def set_health_many(self, reports: list[tuple[str, IPAddress, bool]]) -> list[str]:
        """set_health() of many backends, each service's ring rebuilt once."""
        changes: list[str] = []
        with self.lock:
            before = set(self.unhealthy)
            touched: dict[str, _Installed] = {}
            for service, address, healthy in reports:
                key = (service, address)
                if healthy == (key not in self.unhealthy):
                    continue
                if healthy:
                    self.unhealthy.discard(key)
                else:
                    self.unhealthy.add(key)
                inst = self.services.get(service)
                if (inst is None or inst.spec is None or inst.spec.health is None
                        or address not in inst.backends):
                    continue    # recorded; it counts once the backend is installed with checks
                changes.append(f"~ backend {service} {address} "
                               f"{'healthy' if healthy else 'unhealthy'}")
                touched[service] = inst
            try:
                for inst in touched.values():
                    changes += self._apply_service(inst.spec, dict(inst.keys))
            except Exception:
                self.unhealthy = before     # not taken: the same reports again redo it all
                raise
        return changes

    def _down(self, svc: Service) -> set[IPAddress]:
        """Backends of svc the health checks took out (none without a health section)."""
        if svc.health is None:
            return set()
        return {b.address for b in svc.backends if (svc.name, b.address) in self.unhealthy}

    def is_healthy(self, service: str, address: IPAddress) -> bool:
        inst = self.services.get(service)
        if inst is None or inst.spec is None or inst.spec.health is None:
            return True
        return (service, address) not in self.unhealthy

    def _apply_service(self, svc: Service, entries: dict[tuple, tuple]) -> list[str]:
        changes = []
        inst = self.services.get(svc.name)
        if inst is None:
            index, _ = self.service_slots.get(svc.name)
            _zero_percpu(self.dp.table("service_stats"), index)
            inst = self.services[svc.name] = _Installed(index=index)
            changes.append(f"+ service {svc.name} ({svc.vip})")

        # 1. backends first
        wanted = {b.address: b.weight for b in svc.backends}
        down = self._down(svc)
        live = [a for a, w in wanted.items() if w > 0]
        fail_open = bool(live) and all(a in down for a in live)
        if fail_open != inst.fail_open:
            changes.append(f"! service {svc.name}: every backend is unhealthy, all stay in "
                           f"rotation (fail open)" if fail_open else
                           f"~ service {svc.name}: a backend is healthy again, fail open ends")
            inst.fail_open = fail_open
        if fail_open:
            down = set()
        for address, weight in wanted.items():
            slot, new = self.backend_slots.get((svc.name, address))
            if new:
                _zero_percpu(self.dp.table("backend_stats"), slot)
                changes.append(f"+ backend {svc.name} {address} weight {weight}")
            elif inst.weights.get(address) != weight:
                changes.append(f"~ backend {svc.name} {address} weight {inst.weights.get(address)} -> {weight}")
            # weight 0: keeps its flows, gets no new ones (not UP, not DOWN);
            # unhealthy: DOWN, its flows are balanced again at their next packet
            flags = BACKEND_DOWN if address in down else BACKEND_UP if weight > 0 else 0
            self._write_backend(slot, address, flags)
            inst.backends[address] = slot
        inst.weights = dict(wanted)

        # 2. the Maglev table, swapped in through the spare ring
        table = self._build_ring(svc, inst, down)
        if inst.table is None or not np.array_equal(table, inst.table):
            # a first table goes to ring 0; every later one to the spare ring
            gen = 1 - inst.ring_gen if inst.table is not None else 0
            self.dp.write_ring(inst.index * 2 + gen, table)
            inst.ring_gen, inst.table = gen, table
            changes += self._write_keys(svc, inst, entries, force=True)
        else:
            changes += self._write_keys(svc, inst, entries, force=False)

        # 3. removed backends drain
        for address in [a for a in inst.backends if a not in wanted]:
            slot = inst.backends.pop(address)
            self._write_backend(slot, address, 0)
            self.backend_slots.release((svc.name, address))
            changes.append(f"- backend {svc.name} {address} (draining)")
        inst.spec = svc
        return changes

    def _build_ring(self, svc: Service, inst: _Installed, down: set = frozenset()) -> np.ndarray:
        size = self.dp.sizes.maglev_size
        live = [(str(a), w) for a, w in inst.weights.items() if w > 0 and a not in down]
        if not live:
            return np.full(size, NO_BACKEND, dtype=np.uint32)
        picks = maglev.build_table(live, size)
        slots = np.array([inst.backends[ip_of(k)] for k, _ in live], dtype=np.uint32)
        return slots[picks]

    def _write_keys(self, svc: Service, inst: _Installed, wanted: dict[tuple, tuple],
                    force: bool) -> list[str]:
        table = self.dp.table("services")
        changes = []
        for (vip, port, proto), (target, slot) in wanted.items():
            if not force and inst.keys.get((vip, port, proto)) == (target, slot):
                continue
            value = table.Leaf()
            value.index = inst.index
            value.ring = inst.index * 2 + inst.ring_gen
            value.target_port = _htons(target)
            value.fw_port = slot
            table[self._service_key(vip, port, proto)] = value
            if inst.keys.get((vip, port, proto)) != (target, slot):
                changes.append(f"+ port {svc.name} {_hostport(vip, port)}/{proto} -> {target}")
        for key in [k for k in inst.keys if k not in wanted]:
            vip, port, proto = key
            try:
                del table[self._service_key(vip, port, proto)]
            except KeyError:
                pass
            changes.append(f"- port {svc.name} {_hostport(vip, port)}/{proto}")
        inst.keys = wanted
        return changes

    def _remove_service(self, name: str) -> list[str]:
        inst = self.services.pop(name)
        table = self.dp.table("services")
        for vip, port, proto in inst.keys:
            try:
                del table[self._service_key(vip, port, proto)]
            except KeyError:
                pass
        for address, slot in inst.backends.items():
            self._write_backend(slot, address, 0)
            self.backend_slots.release((name, address))
        for gen in (0, 1):      # its rings' memory back (the service keys are gone)
            self.dp.clear_ring(inst.index * 2 + gen)
        self.service_slots.release(name)
        return [f"- service {name} (flows drain)"]

    # ---- restart: the allocations survive the daemon -------------------------

    def export(self) -> dict:
        return {
            "service_slots": self.service_slots.export(),
            "backend_slots": self.backend_slots.export(lambda k: [k[0], str(k[1])]),
            "services": {name: {"index": inst.index, "ring_gen": inst.ring_gen,
                                "backends": {str(a): s for a, s in inst.backends.items()},
                                "weights": {str(a): w for a, w in inst.weights.items()},
                                "keys": [[str(a), p, pr, t, sl]
                                         for (a, p, pr), (t, sl) in inst.keys.items()]}
                         for name, inst in self.services.items()},
        }

    def restore(self, data: dict) -> None:
        """Take over the allocations of a previous daemon. Every ring is then written again
        into its spare and flipped at the next apply (the live one is never edited)."""
        self.service_slots.restore(data["service_slots"])
        self.backend_slots.restore(data["backend_slots"], lambda k: (k[0], ip_of(k[1])))
        self.services = {
            name: _Installed(index=d["index"], ring_gen=d["ring_gen"],
                             table=np.empty(0, dtype=np.uint32),  # unknown: differs from any
                             backends={ip_of(a): s for a, s in d["backends"].items()},
                             weights={ip_of(a): w for a, w in d["weights"].items()},
                             keys={(ip_of(a), p, pr): (t, sl) for a, p, pr, t, sl in d["keys"]})
            for name, d in data["services"].items()}

    def translate_flow(self, key, value) -> bool:
        """Give a flow replicated from the peer this node's own service, backend and
        firewall slots (each daemon allocates its own). False: not a service here."""
        services = self.dp.table("services")
        sk = services.Key()
        ctypes.memmove(ctypes.byref(sk.vip), ctypes.byref(key.dst), 16)
        sk.port, sk.proto, sk.family = key.dport, key.proto, key.family
        try:
            sv = services[sk]
        except KeyError:
            return False
        value.service, value.fw_port = sv.index, sv.fw_port
        value.backend = NO_BACKEND
        address = get_addr(value.addr, key.family)
        for inst in self.services.values():
            if inst.index == sv.index:
                value.backend = inst.backends.get(address, NO_BACKEND)
                break
        return True

    # ---- read back ----------------------------------------------------------

    def counters(self) -> list[dict]:
        """Per service and backend: packets and bytes clients sent."""
        out = []
        with self.lock:
            for name, inst in self.services.items():
                packets, nbytes = self.dp.percpu_sum("service_stats", inst.index)
                backends = []
                for address, slot in inst.backends.items():
                    bp, bb = self.dp.percpu_sum("backend_stats", slot)
                    backends.append({"address": str(address), "packets": bp, "bytes": bb,
                                     "weight": inst.weights.get(address, 0),
                                     "healthy": self.is_healthy(name, address)})
                out.append({"name": name, "vip": str(inst.spec.vip) if inst.spec else None,
                            "packets": packets, "bytes": nbytes, "backends": backends,
                            "fail_open": inst.fail_open})
        return out


def _htons(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), "little")


def _hostport(vip: IPAddress, port: int) -> str:
    return f"[{vip}]:{port}" if vip.version == 6 else f"{vip}:{port}"


def ip_of(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def _zero_percpu(table, slot: int) -> None:
    """Reset one slot of a per-CPU counter array on every CPU."""
    values = table.getvalue(table.Key(slot))
    for v in values:
        v.packets = 0
        v.bytes = 0
    table[table.Key(slot)] = values
