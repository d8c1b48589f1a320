"""The shared fake data plane (tests/fakes) is the product's: its maps are the ones
bpf/maps.h declares, sized as zfast.dataplane.loader sizes them, with the C structs the
product's numpy views and conventions expect; and its maps behave as BCC's tables do.
(tests/bpf/test_layouts.py holds its structs to BCC's classes of a real compile.)"""

from __future__ import annotations

import ctypes
import ipaddress

import numpy as np
import pytest

from tests.fakes.cstructs import map_decls, structs, view_mismatches
from tests.fakes.dataplane import FakeDataplane
from zfast import config
from zfast.dataplane import flowage
from zfast.dataplane.loader import AF, addr_words, get_addr, map_sizes, set_addr
from zfast.reconcile import firewall

SIZES = config.Datapath(maglev_size=251, flow_table=8, max_services=4, max_backends=16,
                        max_public_ports=8, max_rules=32)


@pytest.fixture
def dp() -> FakeDataplane:
    return FakeDataplane(SIZES)


def test_every_map_of_maps_h_at_the_size_the_loader_gives_it(dp):
    assert set(dp.maps) == set(map_decls())
    sized = map_sizes(SIZES)
    # the devmap is BCC's own macro, not a ZF_MAP: not faked
    assert set(sized) - set(dp.maps) == {"tx_ports"}
    assert {n: dp.table(n).max_entries for n in sized if n in dp.maps} == \
        {n: v for n, v in sized.items() if n in dp.maps}
    assert dp.table("ring_template").max_entries == SIZES.maglev_size
    assert dp.table("config").max_entries == 1


@pytest.mark.parametrize("view, table, side", [
    (firewall.FW_KEY, "fw_rules0", "Key"), (firewall.FW_RULE, "fw_rules0", "Leaf"),
    (firewall.FW_KEY, "fw_rules1", "Key"), (firewall.FW_RULE, "fw_rules1", "Leaf"),
    (firewall.FW_PORT, "fw_ports", "Leaf")])
def test_the_firewalls_numpy_views_are_the_fakes_structs(dp, view, table, side):
    cls = getattr(dp.table(table), side)
    assert view_mismatches(view, cls) == []
    assert firewall.layout_mismatch(view, cls) is None       # the product's own check agrees


def test_a_moved_field_is_found():
    moved = np.dtype([("action", "u1"), ("pad", "u1", 3), ("id", "<u2"), ("more", "<u2")])
    wrong = view_mismatches(moved, structs()["fw_rule"])
    assert any(w.startswith("id:") for w in wrong) and any(w.startswith("more:") for w in wrong)


def test_what_the_product_assumes_of_the_structs(dp):
    flows = dp.table("flows")
    # the idle-flow sweeper finds its fields by name (zfast.dataplane.flowage)
    layout = flowage.layout_of(flows)
    assert layout["key_size"] == ctypes.sizeof(structs()["flow_key"])
    assert set(layout["key"]) == set(flowage.KEY_FIELDS)
    # the standby's flow events are a forward entry's key then its value (zfast.ha.sync)
    assert ctypes.sizeof(structs()["flow_event"]) == ctypes.sizeof(flows.Key) + ctypes.sizeof(flows.Leaf)
    assert structs()["flow_event"].value.offset == ctypes.sizeof(flows.Key)
    # an address is 16 bytes, a v4 one first (loader.addr_words, set_addr/get_addr)
    key = dp.table("services").Key()
    for address in (ipaddress.ip_address("10.0.0.10"), ipaddress.ip_address("fd00::10")):
        set_addr(key.vip, address)
        assert bytes(key.vip) == addr_words(address)
        assert get_addr(key.vip, AF[address.version]) == address


def test_arrays_have_every_slot_and_refuse_others(dp):
    backends = dp.table("backends")
    assert backends[3].flags == 0 and len(backends) == SIZES.max_backends
    value = backends.Leaf()
    value.flags = 1
    backends[backends.Key(3)] = value
    value.flags = 2                                   # a value read or written is a copy
    assert backends[3].flags == 1
    del backends[3]                                   # an array slot is zeroed, not removed
    assert backends[3].flags == 0
    with pytest.raises(IndexError):
        backends[SIZES.max_backends]


def test_hash_maps_hold_what_was_written_and_no_more(dp):
    services = dp.table("services")
    key = services.Key()
    key.port = 80
    with pytest.raises(KeyError):
        services[key]
    with pytest.raises(KeyError):
        del services[key]
    services[key] = services.Leaf()
    assert list(services) and len(services) == 1
    vips = dp.table("vips")
    for i in range(vips.max_entries):
        k = vips.Key()
        k.family = 4
        k.addr.w[0] = i
        vips[k] = vips.Leaf(1)
    with pytest.raises(OSError):                      # a full hash map refuses a new key
        k.addr.w[0] = vips.max_entries
        vips[k] = vips.Leaf(1)
    flows = dp.table("flows")
    for port in range(flows.max_entries + 1):         # an LRU map drops its oldest instead
        k = flows.Key()
        k.sport = port
        flows[k] = flows.Leaf()
    assert len(flows) == flows.max_entries


def test_a_key_or_value_of_another_size_is_a_layout_bug(dp):
    with pytest.raises(TypeError):
        dp.table("services")[ctypes.c_uint32(1)] = dp.table("services").Leaf()
    with pytest.raises(TypeError):
        dp.table("backends")[1] = (ctypes.c_uint8 * 18)()
    keys = np.zeros(2, dtype=np.uint64)               # 8-byte keys for a u32-keyed array
    with pytest.raises(ValueError):
        dp.update_batch("fw_ports", keys, np.zeros(2, dtype=firewall.FW_PORT))


def test_per_cpu_arrays_have_a_value_per_cpu(dp):
    stats = dp.table("service_stats")
    values = stats.getvalue(stats.Key(1))
    assert len(values) == dp.cpus
    values[0].packets, values[1].packets, values[1].bytes = 2, 3, 100
    stats[stats.Key(1)] = values
    assert dp.percpu_sum("service_stats", 1) == (5, 100)
    assert dp.percpu_all("service_stats", 2).tolist() == [[0, 0], [5, 100]]


def test_rings_config_and_batches_as_the_loader_has_them(dp):
    ids = np.arange(SIZES.maglev_size, dtype=np.uint32) % 3
    dp.write_ring(5, ids)
    assert np.array_equal(dp.read_ring(5), ids) and dp.ring_writes == 1
    with pytest.raises(ValueError):
        dp.write_ring(6, ids[:-1])
    dp.clear_ring(5)
    dp.clear_ring(5)
    assert dp.read_ring(5) is None
    dp.update_config(fw_trie=1, fw_gen=7)
    dp.update_config(sync=1)
    c = dp.config()
    assert (c.fw_trie, c.fw_gen, c.sync) == (1, 7, 1)
    keys = np.zeros(2, dtype=firewall.FW_KEY)
    keys["prefixlen"] = [24 + 8, 24 + 16]
    rules = np.zeros(2, dtype=firewall.FW_RULE)
    rules["id"] = [4, 5]
    dp.update_batch("fw_rules0", keys, rules)
    assert dp.batch_writes == 2 and len(dp.table("fw_rules0")) == 2
    dp.delete_batch("fw_rules0", keys[:1])
    with pytest.raises(KeyError):                     # stricter than the loader, on purpose
        dp.delete_batch("fw_rules0", keys[:1])
    assert [r["id"] for r in np.frombuffer(b"".join(dp.table("fw_rules0").raw().values()),
                                            dtype=firewall.FW_RULE)] == [5]
