"""The firewall's control plane without a kernel: `zfast fw test`'s explain(), the rule set
it derives from a project, and what FirewallTable writes into the maps.

The maps are the shared fake data plane (tests/fakes: the C structs of bpf/zfast_shared.h,
the bytes FirewallTable writes through its numpy views); a small Python model of
bpf/firewall.h's zf_firewall() reads them back
(project-wide slot 0 first, then the longest prefix of the port's slot, then the port's
policy). For random rule sets that model and explain() must agree on every source: what
`zfast fw test` says is what the data plane would do.
"""

from __future__ import annotations

import ipaddress
import random

import numpy as np
import pytest

from tests.fakes.dataplane import FakeDataplane
from zfast.config import parse
from zfast.reconcile import firewall
from zfast.reconcile.firewall import (
    ALLOW,
    DENY,
    FW_KEY,
    FW_RULE,
    FirewallTable,
    _keys,
    desired_rules,
    explain,
    key_network,
    listener,
    rule_key,
)

# ---------------------------------------------------------------- projects

def project(ports: list[dict], deny: list[str] = (), max_rules: int = 1024) -> dict:
    return {
        "project": "fw", "datapath": {"max_rules": max_rules, "max_public_ports": 8},
        "services": [{"name": "app", "vip": "10.0.0.10", "ports": [{"port": 80, "proto": "tcp"}],
                      "backends": [{"address": "10.1.0.2"}]},
                     {"name": "app6", "vip": "fd00::10", "ports": [{"port": 80, "proto": "tcp"}],
                      "backends": [{"address": "fd01::2"}]}],
        "public_ports": ports,
        "firewall": {"deny": list(deny)},
    }


def port(number: int, fw: dict, address: str = "203.0.113.10", proto: str = "tcp") -> dict:
    service = "app6" if ":" in address else "app"
    return {"port": number, "proto": proto, "address": address, "service": service,
            "firewall": fw}


# ---------------------------------------------------------------- explain

@pytest.fixture
def p():
    return parse(project(
        [port(2222, {"policy": "deny",
                     "allow": ["198.51.100.0/24", "10.0.0.0/8", "10.9.0.0/16"],
                     "deny": ["198.51.100.7/32", "10.9.0.0/16", "10.0.0.0/9"]}),
         port(2223, {"policy": "allow", "deny": ["2001:db8:bad::/48"],
                     "allow": ["2001:db8:bad:1::/64"]}, address="2001:db8::10")],
        deny=["192.0.2.0/24", "2001:db8:dead::/48"]))


@pytest.mark.parametrize("src, verdict, rule, why", [
    ("198.51.100.8", "allow", "firewall.allow[0] 198.51.100.0/24", "/24"),
    ("198.51.100.7", "deny", "firewall.deny[0] 198.51.100.7/32", "/32"),        # longer wins
    ("10.1.2.3", "deny", "firewall.deny[2] 10.0.0.0/9", "/9"),                  # /9 beats /8
    ("10.200.2.3", "allow", "firewall.allow[1] 10.0.0.0/8", "/8"),
    ("10.9.1.1", "deny", "firewall.deny[1] 10.9.0.0/16", "/16"),                # equal: deny
    ("203.0.113.1", "deny", None, "default policy is deny"),
    ("192.0.2.200", "deny", "firewall.deny[0] 192.0.2.0/24", "project-wide"),
    ("2001:db8::1", "deny", None, "IPv6"),                                      # wrong family
])
def test_explain_v4_port(p, src, verdict, rule, why):
    r = explain(p, src, p.public_ports[0])
    assert r["verdict"] == verdict, r
    assert r["rule"] == rule, r
    assert why in r["why"], r


@pytest.mark.parametrize("src, verdict, rule", [
    ("2001:db8:bad::1", "deny", "firewall.deny[0] 2001:db8:bad::/48"),
    ("2001:db8:bad:1::1", "allow", "firewall.allow[0] 2001:db8:bad:1::/64"),
    ("2001:db8:1::1", "allow", None),                                           # policy allow
    ("2001:db8:dead::1", "deny", "firewall.deny[1] 2001:db8:dead::/48"),        # project-wide
    ("198.51.100.8", "deny", None),                                             # v4 on a v6 port
])
def test_explain_v6_port(p, src, verdict, rule):
    r = explain(p, src, p.public_ports[1])
    assert (r["verdict"], r["rule"]) == (verdict, rule), r


def test_project_wide_deny_beats_a_longer_port_allow():
    q = parse(project([port(2222, {"policy": "allow", "allow": ["192.0.2.7/32"]})],
                      deny=["192.0.2.0/24"]))
    r = explain(q, "192.0.2.7", q.public_ports[0])
    assert r["verdict"] == "deny" and "192.0.2.0/24" in r["rule"] and "project-wide" in r["why"]


def test_explain_refuses_what_is_not_an_address(p):
    with pytest.raises(ValueError):
        explain(p, "not-an-ip", p.public_ports[0])


# ---------------------------------------------------------------- the rule set

def test_desired_rules_slots_and_equal_prefix(p):
    slot_of = {listener(pp): i + 1 for i, pp in enumerate(p.public_ports)}
    rules = desired_rules(p, slot_of)
    # 2 project-wide + 6 + 2 port rules, the equal-prefix pair 10.9.0.0/16 counted once
    assert len(rules) == 2 + 5 + 2
    equal = rules[rule_key(1, ipaddress.ip_network("10.9.0.0/16"))]
    assert equal.action == DENY and equal.source == "public_ports[0].firewall.deny[1]"
    project_wide = [r for r in rules.values() if r.slot == firewall.PROJECT_SLOT]
    assert {str(r.network) for r in project_wide} == {"192.0.2.0/24", "2001:db8:dead::/48"}
    assert all(r.action == DENY for r in project_wide)
    assert rules[rule_key(2, ipaddress.ip_network("2001:db8:bad:1::/64"))].action == ALLOW


def test_rule_key_round_trip_and_struct_layout():
    rnd = random.Random(5)
    keys, expected = [], []
    for _ in range(500):
        v6 = rnd.random() < 0.5
        bits = 128 if v6 else 32
        plen = rnd.randrange(0, bits + 1)
        addr = (rnd.getrandbits(bits) >> (bits - plen) << (bits - plen)) if plen else 0
        net = (ipaddress.IPv6Network if v6 else ipaddress.IPv4Network)((addr, plen))
        slot = rnd.randrange(0, 65536)
        key = rule_key(slot, net)
        assert key_network(key) == net and key[1] == net.version
        assert firewall._decode_key(list(key)) == key
        assert firewall._decode_key([slot, str(net)]) == key     # the older export format
        keys.append(key)
        # struct fw_key: u32 prefixlen (24 + CIDR), u8 slot[2] big endian, u8 family,
        # u8 addr[16] (a v4 address first, zeros after), u8 pad
        expected.append(int.to_bytes(24 + plen, 4, "little") + slot.to_bytes(2, "big")
                        + bytes([net.version]) + net.network_address.packed.ljust(16, b"\0")
                        + b"\0")
    arr = _keys(keys)
    assert arr.dtype == FW_KEY and FW_KEY.itemsize == 24
    assert arr.tobytes() == b"".join(expected)
    assert _keys([]).shape == (0,)


# ---------------------------------------------------------------- FirewallTable on fake maps

def fw_state(dp: FakeDataplane) -> tuple[int, int]:
    """(live trie, rule generation) as struct zf_config holds them."""
    c = dp.config()
    return c.fw_trie, c.fw_gen


def trie(dp: FakeDataplane, number: int) -> dict[tuple, tuple[int, int]]:
    """{(prefixlen, slot, family, addr bytes): (action, id)} of one trie, read through the
    product's numpy views of struct fw_key / fw_rule."""
    out = {}
    for k, v in dp.table(f"fw_rules{number}").raw().items():
        key = np.frombuffer(k, dtype=FW_KEY)[0]
        rule = np.frombuffer(v, dtype=FW_RULE)[0]
        out[(int(key["prefixlen"]), int(key["slot"][0]) << 8 | int(key["slot"][1]),
             int(key["family"]), bytes(key["addr"]))] = (int(rule["action"]), int(rule["id"]))
    return out


def verdict(dp: FakeDataplane, src: str, slot: int, rules: dict | None = None) -> str:
    """bpf/firewall.h zf_firewall() over the fake's maps (rules: the live trie, decoded)."""
    rules = trie(dp, fw_state(dp)[0]) if rules is None else rules
    addr = ipaddress.ip_address(src)
    data = addr.packed.ljust(16, b"\0")

    def lookup(s):
        want = s.to_bytes(2, "big") + bytes([addr.version]) + data
        best = None
        for (plen, kslot, fam, kaddr), value in rules.items():
            have = kslot.to_bytes(2, "big") + bytes([fam]) + kaddr
            if _prefix_equal(want, have, plen) and (best is None or plen > best[0]):
                best = (plen, value)
        return best[1] if best else None

    r = lookup(firewall.PROJECT_SLOT)
    if r and r[0] == DENY:
        return "deny"
    r = lookup(slot)
    if r:
        return "allow" if r[0] == ALLOW else "deny"
    return "deny" if dp.table("fw_ports")[slot].policy == DENY else "allow"


def _prefix_equal(a: bytes, b: bytes, bits: int) -> bool:
    whole, rest = divmod(bits, 8)
    if a[:whole] != b[:whole]:
        return False
    if rest:
        mask = (0xFF << (8 - rest)) & 0xFF
        return (a[whole] & mask) == (b[whole] & mask)
    return True


def table_for(proj) -> tuple[FirewallTable, FakeDataplane]:
    dp = FakeDataplane(proj.datapath)
    return FirewallTable(dp), dp


def agree(fw: FirewallTable, dp: FakeDataplane, proj, sources: list[str]) -> None:
    live = trie(dp, fw_state(dp)[0])
    for pp in proj.public_ports:
        slot = fw.slots.used[listener(pp)]
        for src in sources:
            if ipaddress.ip_address(src).version != pp.address.version:
                continue        # such a packet never reaches this port's service
            model = verdict(dp, src, slot, live)
            said = explain(proj, src, pp)
            assert model == said["verdict"], (src, str(pp.address), pp.port, model, said)


def test_apply_writes_what_explain_says():
    q = parse(project(
        [port(2222, {"policy": "deny", "allow": ["198.51.100.0/24", "10.9.0.0/16"],
                     "deny": ["198.51.100.7/32", "10.9.0.0/16"]}),
         port(2223, {"policy": "allow", "deny": ["2001:db8:bad::/48"]}, address="2001:db8::10")],
        deny=["192.0.2.0/24"]))
    fw, dp = table_for(q)
    changes = fw.apply(q)
    assert any("firewall rules: 5 (5 added, 0 removed)" in c for c in changes), changes
    agree(fw, dp, q, ["198.51.100.8", "198.51.100.7", "10.9.3.3", "192.0.2.9", "203.0.113.5",
                      "2001:db8:bad::1", "2001:db8::1"])
    # the same project again: nothing to write, no new generation
    gen, writes = fw_state(dp)[1], dp.batch_writes
    assert fw.apply(q) == []
    assert fw_state(dp)[1] == gen and dp.batch_writes - writes == len(q.public_ports)  # fw_ports only


def _random_project(rnd: random.Random, max_rules: int) -> dict:
    def v4(plen):
        a = rnd.choice([0x0A000000, 0xC6336400, 0xCB007100]) | rnd.getrandbits(12) << 8
        return str(ipaddress.IPv4Network((a >> (32 - plen) << (32 - plen), plen)))

    def v6(plen):
        a = 0x20010DB8 << 96 | rnd.getrandbits(24) << 72
        return str(ipaddress.IPv6Network((a >> (128 - plen) << (128 - plen), plen)))

    def rules(make, lens, n):
        return sorted({make(rnd.choice(lens)) for _ in range(n)})

    n = max_rules // 6
    return project(
        [port(2222, {"policy": rnd.choice(["allow", "deny"]),
                     "allow": rules(v4, [8, 16, 20, 24, 32], n),
                     "deny": rules(v4, [8, 16, 20, 24, 32], n)}),
         port(2222, {"policy": rnd.choice(["allow", "deny"]),
                     "allow": rules(v4, [16, 24], n), "deny": rules(v4, [16, 24], n)},
              proto="udp"),
         port(2223, {"policy": rnd.choice(["allow", "deny"]),
                     "allow": rules(v6, [32, 48, 64, 128], n // 2),
                     "deny": rules(v6, [32, 48, 64, 128], n // 2)}, address="2001:db8::10")],
        deny=rules(v4, [24, 32], 3) + rules(v6, [48], 2), max_rules=max_rules)


def _sources(rnd: random.Random, proj) -> list[str]:
    """Addresses in, at the edges of and next to every rule, and some random ones."""
    out = set()
    nets = list(proj.project_deny) + [n for pp in proj.public_ports
                                      for n in pp.firewall.allow + pp.firewall.deny]
    for net in nets:
        out.add(str(net.network_address))
        out.add(str(net.broadcast_address))
        out.add(str(net.network_address + rnd.randrange(net.num_addresses)))
        if int(net.broadcast_address) + 1 < 2 ** net.max_prefixlen:
            out.add(str(net.broadcast_address + 1))
    for _ in range(50):
        out.add(str(ipaddress.IPv4Address(0x0A000000 | rnd.getrandbits(24))))
    return sorted(out)


@pytest.mark.parametrize("seed", range(4))
def test_random_rule_sets_model_and_explain_agree_across_replacements(seed):
    rnd = random.Random(seed)
    max_rules = 240
    first = parse(_random_project(rnd, max_rules))
    fw, dp = table_for(first)
    fw.apply(first)
    agree(fw, dp, first, _sources(rnd, first))
    for _ in range(3):   # replaced whole, again and again: the tries alternate
        nxt = parse(_random_project(rnd, max_rules))
        live_before = fw_state(dp)[0]
        fw.apply(nxt)
        assert fw_state(dp)[0] == 1 - live_before
        agree(fw, dp, nxt, _sources(rnd, nxt))
        ids = [i for _, i in trie(dp, fw_state(dp)[0]).values()]
        assert len(ids) == len(set(ids)), "two live rules share a counter"
        assert all(0 <= i < max_rules for i in ids)


def test_a_full_rule_set_is_replaced_by_another_full_one():
    """max_rules rules replaced by max_rules different ones (100k by 100k, in small):
    rule ids must be freed before new ones are taken."""
    def full(base):
        return parse(project([port(2222, {"policy": "deny", "allow": [
            str(ipaddress.IPv4Address(base + i)) + "/32" for i in range(16)]})], max_rules=16))

    a, b = full(0x0A000000), full(0x0B000000)
    fw, dp = table_for(a)
    fw.apply(a)
    changes = fw.apply(b)
    assert any("firewall rules: 16 (16 added, 16 removed)" in c for c in changes), changes
    slot = fw.slots.used[listener(b.public_ports[0])]
    assert verdict(dp, "11.0.0.3", slot) == "allow" and verdict(dp, "10.0.0.3", slot) == "deny"
    fw.apply(a)
    assert verdict(dp, "10.0.0.3", slot) == "allow" and verdict(dp, "11.0.0.3", slot) == "deny"


def test_a_policy_change_alone_makes_established_flows_ask_again():
    """The data plane re-checks an established flow when the generation changes; a new
    default policy with the same rules must change it too (else allow -> deny would leave
    established connections of now-denied sources open)."""
    open_ = parse(project([port(2222, {"policy": "allow"})]))
    closed = parse(project([port(2222, {"policy": "deny"})]))
    fw, dp = table_for(open_)
    fw.apply(open_)
    gen = fw_state(dp)[1]
    slot = fw.slots.used[listener(open_.public_ports[0])]
    fw.apply(closed)
    assert fw_state(dp)[1] != gen, "policy allow -> deny, but the rule generation did not change"
    assert verdict(dp, "198.51.100.1", slot) == "deny"
    gen = fw_state(dp)[1]
    fw.apply(closed)
    assert fw_state(dp)[1] == gen, "nothing changed, yet a new generation"


def test_export_restore_then_apply_keeps_the_maps_right():
    rnd = random.Random(11)
    a = parse(_random_project(rnd, 120))
    b = parse(_random_project(rnd, 120))
    fw, dp = table_for(a)
    fw.apply(a)
    fw.apply(b)
    saved = fw.export()
    # a new daemon over the same (pinned) maps
    fw2 = FirewallTable(dp)
    fw2.restore(saved)
    assert fw2.tries == fw.tries and fw2.live == fw.live and fw2.gen == fw.gen
    assert fw2.rule_ids.used == fw.rule_ids.used
    fw2.apply(a)
    agree(fw2, dp, a, _sources(rnd, a))
    # the idle trie is the previous set exactly, nothing stale left behind
    assert len(trie(dp, 1 - fw_state(dp)[0])) == len(desired_rules(
        b, {listener(pp): fw2.slots.used[listener(pp)] for pp in b.public_ports}))
