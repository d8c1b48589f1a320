"""The public ports' firewall, from the project file into the data plane.

Each public port gets a slot (1..max_public_ports-1; slot 0 is the
project-wide deny list). Its rules go into an LPM trie keyed by (slot,
family, CIDR). Two tries alternate: a new rule set is written whole into the
idle one, then ``config`` flips to it and bumps the rule generation, which
makes established flows ask the firewall again at their next packet.

The same rules answer ``zfast fw test`` here in Python, with the data plane's
semantics: project-wide deny first, then the longest prefix of the port's
rules (deny wins at an equal prefix), then the port's default policy.
"""

from __future__ import annotations

import ctypes
import ipaddress
from dataclasses import dataclass, field

import numpy as np

from zfast.config import IPNetwork, Project, PublicPort
from zfast.dataplane.loader import DatapathError, Loaded
from zfast.dataplane.reasons import defines
from zfast.reconcile.services import Slots

ALLOW, DENY = defines()["ZF_FW_ALLOW"], defines()["ZF_FW_DENY"]
ACTION_NAME = {ALLOW: "allow", DENY: "deny"}
PROJECT_SLOT = defines()["ZF_FW_PROJECT_SLOT"]

# numpy views of struct fw_key / fw_rule (bpf/zfast_shared.h); checked against BCC's
# ctypes classes at load, so a change of the C struct fails loudly here.
FW_KEY = np.dtype([("prefixlen", "<u4"), ("slot", "u1", 2), ("family", "u1"),
                   ("addr", "u1", 16), ("pad", "u1")])
FW_RULE = np.dtype([("action", "u1"), ("pad", "u1", 3), ("id", "<u4")])
FW_PORT = np.dtype([("policy", "u1"), ("pad", "u1", 3), ("burst", "<u4"), ("interval_ns", "<u8")])


def layout_mismatch(dtype: np.dtype, cls: type[ctypes.Structure]) -> str | None:
    """How a numpy view differs from the C struct BCC made the class from: every C field
    at the same offset with the same size, the view's other fields only padding, the same
    total size; None when they agree."""
    c = {name: (getattr(cls, name).offset, getattr(cls, name).size)
         for name, *_ in cls._fields_ if not name.startswith("__pad")}
    py = {name: (dtype.fields[name][1], dtype.fields[name][0].itemsize) for name in dtype.names}
    wrong = [f"{n}: C {c[n]}, numpy {py.get(n)}" for n in c if py.get(n) != c[n]]
    wrong += [f"{n}: not in the C struct" for n in py if n not in c and not n.startswith("pad")]
    if ctypes.sizeof(cls) != dtype.itemsize:
        wrong.append(f"{ctypes.sizeof(cls)} bytes in C, {dtype.itemsize} in numpy")
    return "; ".join(wrong) or None


def listener(pp: PublicPort) -> tuple:
    return (pp.address, pp.port, pp.proto)


def rule_key(slot: int, network: IPNetwork) -> tuple:
    """A rule's identity: (slot, IP version, network address as int, prefix length).

    Plain ints, not the ipaddress object: its __hash__ is Python code, and a rule key is
    hashed a dozen times per apply (100,000 rules: seconds, not tenths)."""
    return (slot, network.version, int(network.network_address), network.prefixlen)


def _decode_key(k: list) -> tuple:
    """A rule key as export() wrote it: [slot, version, address, prefix], or [slot, CIDR]."""
    return rule_key(k[0], ipaddress.ip_network(k[1])) if len(k) == 2 else tuple(k)


def key_network(key: tuple) -> IPNetwork:
    cls = ipaddress.IPv4Network if key[1] == 4 else ipaddress.IPv6Network
    return cls((key[2], key[3]))


@dataclass(frozen=True)
class Rule:
    slot: int
    network: IPNetwork = field(compare=False)   # compared through key
    action: int
    source: str          # where it comes from in the file, for people
    key: tuple = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "key", rule_key(self.slot, self.network))


def desired_rules(project: Project, slot_of: dict[tuple, int]) -> dict[tuple, Rule]:
    """rule_key(slot, network) -> Rule for the whole project; deny wins at an equal prefix."""
    rules: dict[tuple, Rule] = {}

    def add(rule: Rule) -> None:
        old = rules.get(rule.key)
        if old is None or (rule.action == DENY and old.action != DENY):
            rules[rule.key] = rule

    for i, net in enumerate(project.project_deny):
        add(Rule(PROJECT_SLOT, net, DENY, f"firewall.deny[{i}]"))
    for i, pp in enumerate(project.public_ports):
        slot = slot_of[listener(pp)]
        for kind, action in (("allow", ALLOW), ("deny", DENY)):
            for j, net in enumerate(getattr(pp.firewall, kind)):
                add(Rule(slot, net, action, f"public_ports[{i}].firewall.{kind}[{j}]"))
    return rules


def explain(project: Project, src: str, pp: PublicPort) -> dict:
    """Which rule decides for a source on a public port, and why (data-plane semantics)."""
    addr = ipaddress.ip_address(src)
    if addr.version != pp.address.version:
        return {"verdict": "deny", "rule": None,
                "why": f"{src} is IPv{addr.version}; the port listens on IPv{pp.address.version}"}
    hits = [(net, i) for i, net in enumerate(project.project_deny) if addr in net]
    if hits:
        net, i = max(hits, key=lambda h: h[0].prefixlen)
        return {"verdict": "deny", "rule": f"firewall.deny[{i}] {net}",
                "why": "on the project-wide deny list (checked before every port)"}
    candidates = [(net, "deny", j) for j, net in enumerate(pp.firewall.deny) if addr in net]
    candidates += [(net, "allow", j) for j, net in enumerate(pp.firewall.allow) if addr in net]
    if candidates:
        # longest prefix; at an equal prefix deny (sorted first) wins
        best = max(candidates, key=lambda c: (c[0].prefixlen, c[1] == "deny"))
        net, kind, j = best
        return {"verdict": kind, "rule": f"firewall.{kind}[{j}] {net}",
                "why": f"longest matching prefix (/{net.prefixlen})"}
    return {"verdict": pp.firewall.policy, "rule": None,
            "why": f"no rule matches: the port's default policy is {pp.firewall.policy}"}


class FirewallTable:
    def __init__(self, dp: Loaded):
        self.dp = dp
        self.slots = Slots(dp.sizes.max_public_ports, first=1)
        self.rule_ids = Slots(dp.sizes.max_rules)
        self.tries: list[dict[tuple, tuple[int, int]]] = [{}, {}]  # key -> (action, id)
        self.live = 0
        self.gen = 0
        self._unsynced = True  # the maps may not hold self.rules yet (new, or restored)
        self.rules: dict[tuple, Rule] = {}
        self.ports: dict[tuple, PublicPort] = {}
        for cls, dtype in ((dp.table("fw_rules0").Key, FW_KEY), (dp.table("fw_rules0").Leaf, FW_RULE),
                           (dp.table("fw_ports").Leaf, FW_PORT)):
            wrong = layout_mismatch(dtype, cls)
            if wrong:
                raise DatapathError(f"{cls.__name__}: the C struct and firewall.py differ: {wrong}")

    def slot_map(self, project: Project) -> dict[tuple, int]:
        """Slots for the project's public ports (new ones allocated, nothing released)."""
        return {listener(pp): self.slots.get(listener(pp))[0] for pp in project.public_ports}

    def check_capacity(self, project: Project) -> list[str]:
        new = {listener(pp) for pp in project.public_ports} - set(self.slots.used)
        if len(new) > len(self.slots.free):
            return [f"public_ports: no room for {len(new)} more ports"]
        return []

    def apply(self, project: Project) -> list[str]:
        """Write port policies and rules; flip to them. Call before the services entries
        that point at new slots are written; call release() after they are removed."""
        changes = []
        policy_changed = False
        slot_of = self.slot_map(project)
        # 1. port policies (rate limit, default) for every slot in use
        ports = np.zeros(len(project.public_ports), dtype=FW_PORT)
        keys = np.zeros(len(project.public_ports), dtype=np.uint32)
        for i, pp in enumerate(project.public_ports):
            keys[i] = slot_of[listener(pp)]
            ports[i]["policy"] = ALLOW if pp.firewall.policy == "allow" else DENY
            if pp.firewall.limit:
                ports[i]["burst"] = pp.firewall.limit.burst
                ports[i]["interval_ns"] = 1_000_000_000 // pp.firewall.limit.new_per_s
            old = self.ports.get(listener(pp))
            if old is None:
                changes.append(f"+ public port {_show(pp)} -> {pp.service}:{pp.target_port}")
            elif old.firewall != pp.firewall:
                changes.append(f"~ firewall of {_show(pp)}")
                policy_changed |= old.firewall.policy != pp.firewall.policy
        self.dp.update_batch("fw_ports", keys, ports)

        # 2. the rule set, into the idle trie, then flip
        rules = desired_rules(project, slot_of)
        if rules != self.rules or self._unsynced:
            added = len(rules.keys() - self.rules.keys())
            removed = len(self.rules.keys() - rules.keys())
            self._write_trie(1 - self.live, rules)
            self.live = 1 - self.live
            self.gen += 1
            self.dp.update_config(fw_trie=self.live, fw_gen=self.gen)
            if self.rules or rules:
                changes.append(f"~ firewall rules: {len(rules)} ({added} added, {removed} removed),"
                               f" generation {self.gen}")
            self.rules = rules
            self._unsynced = False
        elif policy_changed:
            # Same rules, another default policy: established flows must ask again too.
            self.gen += 1
            self.dp.update_config(fw_trie=self.live, fw_gen=self.gen)
            changes.append(f"~ firewall policy, generation {self.gen}")
        for key in [k for k in self.ports if k not in slot_of]:
            changes.append(f"- public port {_show(self.ports[key])}")
        self.ports = {listener(pp): pp for pp in project.public_ports}
        return changes

    def release(self, project: Project) -> None:
        """Free the slots of public ports the project no longer has."""
        wanted = {listener(pp) for pp in project.public_ports}
        for key in [k for k in self.slots.used if k not in wanted]:
            self.slots.release(key)

    def _write_trie(self, trie: int, rules: dict[tuple, Rule]) -> None:
        name = f"fw_rules{trie}"
        held = self.tries[trie]
        stale = [k for k in held if k not in rules]
        if stale:
            self.dp.delete_batch(name, _keys(stale))
        # Release the ids of rules that go away before taking new ones: a new set as big
        # as the old one (100k rules replaced by another 100k) must fit max_rules.
        for key in [k for k in self.rule_ids.used if k not in rules]:
            self.rule_ids.release(key)
        wanted_ids = {}
        for key in rules:
            wanted_ids[key] = self.rule_ids.get(key)[0]
        changed = [k for k, r in rules.items() if held.get(k) != (r.action, wanted_ids[k])]
        values = np.zeros(len(changed), dtype=FW_RULE)
        values["action"] = [rules[k].action for k in changed]
        values["id"] = [wanted_ids[k] for k in changed]
        self.dp.update_batch(name, _keys(changed), values)
        self.tries[trie] = {k: (r.action, wanted_ids[k]) for k, r in rules.items()}

    # ---- restart: the allocations survive the daemon ------------------------------

    def export(self) -> dict:
        return {
            "slots": self.slots.export(lambda k: [str(k[0]), k[1], k[2]]),
            # rule keys as their ints: no formatting of 100,000 CIDRs on every apply
            "rule_ids": self.rule_ids.export(list),
            "live": self.live, "gen": self.gen,
            "tries": [[[*k, a, i] for k, (a, i) in trie.items()] for trie in self.tries],
        }

    def restore(self, data: dict) -> None:
        """Take over a previous daemon's slots, rule ids and tries; the next apply writes
        the rules into the idle trie and flips, as always."""
        self.slots.restore(data["slots"], lambda k: (ipaddress.ip_address(k[0]), k[1], k[2]))
        self.rule_ids.restore(data["rule_ids"], _decode_key)
        self.live, self.gen = data["live"], data["gen"]
        self.tries = [{_decode_key(e[:-2]): (e[-2], e[-1]) for e in trie} for trie in data["tries"]]
        self.rules = {}
        self._unsynced = True

    # ---- read back ---------------------------------------------------------------

    def counters(self) -> list[dict]:
        out = []
        for key, pp in self.ports.items():
            slot = self.slots.used[key]
            base = slot * 3
            allowed = self.dp.percpu_sum("port_stats", base)
            denied = self.dp.percpu_sum("port_stats", base + 1)
            limited = self.dp.percpu_sum("port_stats", base + 2)
            out.append({"port": pp.port, "proto": pp.proto, "address": str(pp.address),
                        "service": pp.service, "target_port": pp.target_port,
                        "packets": allowed[0] + denied[0] + limited[0],
                        "allowed": allowed[0], "denied": denied[0] + limited[0],
                        "rate_limited": limited[0]})
        return out

    def rule_counters(self) -> list[dict]:
        out = []
        for key, rule in self.rules.items():
            rid = self.rule_ids.used.get(key)
            packets, nbytes = self.dp.percpu_sum("rule_stats", rid) if rid is not None else (0, 0)
            out.append({"rule": rule.source, "cidr": str(rule.network),
                        "action": ACTION_NAME[rule.action], "packets": packets, "bytes": nbytes})
        return out


def _keys(keys: list[tuple]) -> np.ndarray:
    """struct fw_key of each rule_key, in one array (no per-element numpy writes)."""
    arr = np.zeros(len(keys), dtype=FW_KEY)
    if not keys:
        return arr
    slots, families, addrs, prefixes = zip(*keys)
    arr["prefixlen"] = np.asarray(prefixes, dtype=np.uint32) + 24
    slots = np.asarray(slots, dtype=np.uint16)
    arr["slot"][:, 0] = slots >> 8
    arr["slot"][:, 1] = slots & 0xFF
    arr["family"] = families
    raw = b"".join(a.to_bytes(16, "big") if f == 6 else a.to_bytes(4, "big") + _PAD12
                   for f, a in zip(families, addrs))
    arr["addr"] = np.frombuffer(raw, dtype=np.uint8).reshape(len(keys), 16)
    return arr


_PAD12 = bytes(12)


def _show(pp: PublicPort) -> str:
    host = f"[{pp.address}]" if pp.address.version == 6 else str(pp.address)
    return f"{host}:{pp.port}/{pp.proto}"
