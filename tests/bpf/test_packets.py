"""The data plane, packet by packet, through BPF_PROG_RUN (needs root): XDP and tc.

The case table (tests/fixtures/packets.py) gives, for each case, the packet in, the verdict,
the exact packet out and the reason counters that must move. Then: flows spread over
backends as the Maglev ring says, service and backend counters count exactly what clients
send, and no truncated, garbled or random packet makes the program abort or go uncounted.
"""

from __future__ import annotations

import ctypes
import difflib
import ipaddress
import random
import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP, ICMPerror, TCPerror, UDPerror
from scapy.layers.inet6 import IPv6ExtHdrFragment
from scapy.layers.l2 import Ether
from scapy.packet import NoPayload, Raw

from tests.fixtures import packets as fx
from zfast import config
from zfast.dataplane.flowage import sweep
from zfast.dataplane.loader import PROTO, get_addr, set_addr
from zfast.dataplane.progrun import XDP_ACTIONS
from zfast.dataplane.reasons import by_name, reasons

ETH_HLEN = 14  # BPF_PROG_RUN refuses shorter XDP frames (EINVAL)

# ---- helpers ----------------------------------------------------------------------------------


def counter_deltas(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    """Reasons whose (packets, bytes) changed, with the change."""
    return {name: (after[name][0] - before[name][0], after[name][1] - before[name][1])
            for name in after if after[name] != before[name]}


def show(raw: bytes) -> list[str]:
    return Ether(raw).show(dump=True).splitlines()


def packet_diff(got: bytes, want: bytes) -> str:
    lines = difflib.unified_diff(show(want), show(got), "expected", "got", lineterm="", n=2)
    return f"\nexpected {want.hex()}\ngot      {got.hex()}\n" + "\n".join(lines)


def _layers(pkt):
    while not isinstance(pkt, NoPayload):
        yield pkt
        pkt = pkt.payload


def _in_fragment(layer) -> bool:
    """Is this layer inside an IP fragment (its checksum covers bytes not here)?"""
    under = layer.underlayer
    while under is not None:
        if isinstance(under, IPv6ExtHdrFragment):
            return True
        if isinstance(under, IP) and (under.flags.MF or under.frag):
            return True
        under = under.underlayer
    return False


def _checked_field(layer) -> str | None:
    """The checksum field scapy can recompute for this layer, or None to leave it."""
    if isinstance(layer, (TCPerror, UDPerror, ICMPerror)):
        return None        # quoted L4: its checksum covers bytes the error does not carry
    names = {f.name for f in layer.fields_desc}
    field = "chksum" if "chksum" in names else "cksum" if "cksum" in names else None
    if field is None or isinstance(layer, Raw):
        return None
    if isinstance(layer, (TCP, UDP)) and _in_fragment(layer):
        return None
    if isinstance(layer, UDP) and layer.chksum == 0 and isinstance(layer.underlayer, IP):
        return None        # IPv4 UDP without a checksum
    return field


def checksum_problems(raw: bytes) -> list[str]:
    """Each checksum of the packet that differs from the one scapy computes."""
    problems = []
    for depth, layer in enumerate(_layers(Ether(raw))):
        field = _checked_field(layer)
        if field is None:
            continue
        copy = Ether(raw)
        setattr(list(_layers(copy))[depth], field, None)
        rebuilt = bytes(copy)
        if rebuilt != raw:
            right = getattr(list(_layers(Ether(rebuilt)))[depth], field)
            problems.append(f"{layer.name}.{field} is {getattr(layer, field):#06x}, "
                            f"should be {right:#06x}")
    return problems


def run_counted(lb, packets, ingress: str) -> list[str]:
    """Run each packet and check it is counted once, under a reason whose action it took.

    Returns the names of the reasons, in order.
    """
    names = []
    with_action = {r.name: r.action for r in reasons()}
    before = lb.reasons()
    for raw in packets:
        result = lb.run(raw, ingress)
        assert result.action in ("drop", "pass", "redirect"), \
            f"returned {result.action} ({result.retval}) for {raw.hex()}"
        after = lb.reasons()
        deltas = counter_deltas(before, after)
        assert len(deltas) == 1 and list(deltas.values()) == [(1, len(raw))], \
            f"counted {deltas} for one packet of {len(raw)} bytes: {raw.hex()}"
        (name,) = deltas
        assert with_action[name] == result.action, \
            f"reason {name} is a {with_action[name]}, the program returned {result.action}"
        names.append(name)
        before = after
    return names


def total_packets(counters: dict) -> int:
    return sum(packets for packets, _ in counters.values())


# ---- the case table ------------------------------------------------------------------------------


def test_case_descriptions_are_unique():
    descriptions = [c.description for c in fx.CASES]
    assert len(descriptions) == len(set(descriptions))


def test_cases_name_known_reasons():
    known = {r.name for r in reasons()}
    for c in fx.CASES:
        assert set(c.reasons) <= known, c.description
        assert {by_name(n).action for n in c.reasons} == {c.verdict}, c.description


def _no_skb_from(raw: bytes) -> bool:
    """A frame whose IP header is cut short: the kernel builds no skb of it (BPF_PROG_RUN
    of a tc program refuses it with EINVAL, as a real receive path drops it before tc)."""
    return (raw[12:14] == b"\x08\x00" and len(raw) < 14 + 20) or \
        (raw[12:14] == b"\x86\xdd" and len(raw) < 14 + 40)


@pytest.mark.parametrize("hook", ["xdp", "tc"])
@pytest.mark.parametrize("case", fx.CASES, ids=str)
def test_packet(lb, case, hook):
    """Every case through both hooks: one pipeline, the same bytes out, the same counters."""
    for packet, ingress in case.before:
        assert lb.run(packet, ingress, hook).action == "redirect", f"set-up packet {packet!r}"
    raw = bytes(case.packet)
    want = raw if case.out is None else bytes(case.out)
    before = lb.reasons()

    if hook == "tc" and _no_skb_from(raw):
        with pytest.raises(OSError) as err:
            lb.run(raw, case.ingress, hook)
        assert err.value.errno == 22 and lb.reasons() == before
        return
    result = lb.run(raw, case.ingress, hook)

    deltas = counter_deltas(before, lb.reasons())
    assert result.action == case.verdict, f"reasons counted: {deltas}"
    if case.verdict != "drop":      # a dropped packet goes nowhere: its bytes do not matter
        assert result.data == want, packet_diff(result.data, want)
    assert deltas == {name: (n, n * len(raw)) for name, n in case.reasons.items()}
    if case.out is not None:        # what the program wrote has every checksum right
        assert checksum_problems(result.data) == []


def test_checksum_checker_sees_a_bad_checksum():
    """The checker the cases rely on does flag a wrong checksum, inner or outer."""
    case = next(c for c in fx.CASES if c.reasons == {"fwd_icmp": 1})
    good = bytes(case.out)
    assert checksum_problems(good) == []
    for offset in (14 + 10, 14 + 20 + 2, 14 + 20 + 8 + 10):   # IP, ICMP, quoted IP checksums
        bad = bytearray(good)
        bad[offset] ^= 0x01
        assert checksum_problems(bytes(bad)), offset


# ---- balancing ------------------------------------------------------------------------------


from zfast.dataplane.flowhash import flow_hash  # noqa: E402  (the Python twin of zf_flow_hash)


def ring_backend(lb, vip: str, port: int, proto: str, src: str, sport: int) -> str:
    """The backend the maps name for a new flow: ring[hash(5-tuple) % size]."""
    dp = lb.dp
    services = dp.table("services")
    key = services.Key()
    set_addr(key.vip, ipaddress.ip_address(vip))
    key.port = socket.htons(port)
    key.proto = PROTO[proto]
    key.family = ipaddress.ip_address(vip).version
    service = services[key]
    size = dp.sizes.maglev_size
    h = flow_hash(src, vip, sport, port, PROTO[proto])
    slot = int(dp.read_ring(service.ring)[h % size])
    backends = dp.table("backends")
    backend = backends[backends.Key(slot)]
    return str(get_addr(backend.addr, backend.family))


def test_new_flows_follow_the_maglev_ring_over_both_backends(lb):
    macs = {fx.BACKEND4: fx.BACKEND_MAC, fx.BACKEND4_B: fx.BACKEND_B_MAC}
    chosen = {address: 0 for address in macs}
    for sport in range(20000, 20200):
        first = lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4_SPREAD) / fx.syn(sport=sport)),
                       fx.PUB)
        again = lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4_SPREAD) / fx.ack(sport=sport)),
                       fx.PUB)
        assert first.action == again.action == "redirect"
        out, out_again = Ether(first.data), Ether(again.data)
        backend = out[IP].dst
        assert backend == ring_backend(lb, fx.VIP4_SPREAD, 80, "tcp", fx.CLIENT4, sport)
        assert out.dst == macs[backend] and out[TCP].dport == 8080
        assert out_again[IP].dst == backend, "a known flow changed its backend"
        chosen[backend] += 1
    # Maglev gives each backend half the ring; 200 flows land within ~10 % of that.
    assert all(n >= 75 for n in chosen.values()), chosen


@pytest.mark.parametrize("service,vip,backend,client,ip", [
    ("web4", fx.VIP4, fx.BACKEND4, fx.CLIENT4, fx.ip4),
    ("web6", fx.VIP6, fx.BACKEND6, fx.CLIENT6, fx.ip6),
])
def test_service_and_backend_counters_count_what_clients_send(lb, service, vip, backend,
                                                              client, ip):
    installed = lb.services.services[service]
    slots = {"service_stats": installed.index,
             "backend_stats": installed.backends[ipaddress.ip_address(backend)]}
    before = {name: lb.dp.percpu_sum(name, slot) for name, slot in slots.items()}

    counted = [fx.from_client(ip(client, vip) / UDP(sport=fx.CPORT + i % 3, dport=53)
                              / Raw(b"x" * (7 * i))) for i in range(12)]
    counted += [fx.from_client(ip(client, vip) / fx.syn(sport=fx.CPORT + i)) for i in range(3)]
    counted += [fx.from_client(ip(client, vip) / fx.ack(sport=fx.CPORT + i)) for i in range(3)]
    results = lb.run_all(counted, fx.PUB)
    assert [r.action for r in results] == ["redirect"] * len(counted)
    # Not what clients send to the service: replies, expired TTLs, other ports.
    replies = [fx.from_backend(ip(backend, client) / fx.udp(sport=5353, dport=fx.CPORT + i))
               for i in range(3)]
    assert [r.action for r in lb.run_all(replies, fx.PRIV)] == ["redirect"] * 3
    expired = fx.from_client(ip(client, vip, 1) / fx.udp(sport=fx.CPORT + 50))
    other = fx.from_client(ip(client, vip) / fx.udp(dport=54))
    assert [r.action for r in lb.run_all([expired, other], fx.PUB)] == ["pass", "pass"]

    want = (len(counted), sum(len(bytes(p)) for p in counted))
    for name, slot in slots.items():
        got = lb.dp.percpu_sum(name, slot)
        assert (got[0] - before[name][0], got[1] - before[name][1]) == want, name


def test_a_dropped_udp6_datagram_without_checksum_leaves_no_trace(lb):
    installed = lb.services.services["web6"]
    slots = {"service_stats": installed.index,
             "backend_stats": installed.backends[ipaddress.ip_address(fx.BACKEND6)]}
    before = {name: lb.dp.percpu_sum(name, slot) for name, slot in slots.items()}
    result = lb.run(fx.from_client(fx.ip6(fx.CLIENT6, fx.VIP6) / fx.udp(chksum=0)), fx.PUB)
    assert result.action == "drop"
    assert {name: lb.dp.percpu_sum(name, slot) for name, slot in slots.items()} == before
    assert list(lb.dp.table("flows").keys()) == []


def test_flows_of_a_second_client_port_are_separate(lb):
    """Two flows, two pairs of entries; the reply of each goes back to its own port."""
    for sport in (fx.CPORT, fx.CPORT + 1):
        assert lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4) / fx.syn(sport=sport)),
                      fx.PUB).action == "redirect"
    assert len(list(lb.dp.table("flows").keys())) == 4
    for sport in (fx.CPORT, fx.CPORT + 1):
        result = lb.run(fx.from_backend(fx.ip4(fx.BACKEND4, fx.CLIENT4) / fx.syn_ack(dport=sport)),
                        fx.PRIV)
        out = Ether(result.data)
        assert (out[IP].src, out[TCP].sport, out[TCP].dport) == (fx.VIP4, 80, sport)


# ---- robustness -------------------------------------------------------------------------------


def _set_up(lb, case) -> bytes:
    for packet, ingress in case.before:
        lb.run(packet, ingress)
    return bytes(case.packet)


@pytest.mark.parametrize("name", sorted(fx.ROBUSTNESS_SAMPLES))
def test_every_truncation_is_counted_and_never_aborts(lb, name):
    case = fx.ROBUSTNESS_SAMPLES[name]
    raw = _set_up(lb, case)
    for n in range(ETH_HLEN):
        with pytest.raises(OSError):    # the kernel refuses frames shorter than Ethernet
            lb.run(raw[:n], case.ingress)
    run_counted(lb, [raw[:n] for n in range(ETH_HLEN, len(raw))], case.ingress)


@pytest.mark.parametrize("name", sorted(fx.ROBUSTNESS_SAMPLES))
def test_bit_flips_are_counted_and_never_abort(lb, name):
    case = fx.ROBUSTNESS_SAMPLES[name]
    raw = _set_up(lb, case)
    rng = random.Random(f"flips {name}")
    flipped = []
    for _ in range(60):
        data = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        flipped.append(bytes(data))
    run_counted(lb, flipped, case.ingress)


def _garbage(rng: random.Random) -> bytes:
    """Random bytes; most behind a plausible Ethernet (and IP version) header to go deeper."""
    body = rng.randbytes(rng.randint(0, 200))
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(ETH_HLEN) + body
    ethertype = [b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x88\xa8"][kind - 1]
    eth = bytes.fromhex(fx.LB_PUB_MAC.replace(":", "")) + rng.randbytes(6) + ethertype
    if kind in (3, 4):        # a tag, then IPv4 or IPv6
        body = rng.randbytes(2) + rng.choice([b"\x08\x00", b"\x86\xdd"]) + body
    if body[:4] and kind in (1, 2):
        version = 0x45 if kind == 1 else 0x60
        body = bytes([version | (body[0] & 0x0F if kind == 1 else 0)]) + body[1:]
    return eth + body


@pytest.mark.parametrize("ingress", [fx.PUB, fx.PRIV])
def test_random_garbage_is_counted_and_never_aborts(lb, ingress):
    rng = random.Random(f"garbage {ingress}")
    packets = [_garbage(rng) for _ in range(300)]
    before = total_packets(lb.reasons())
    names = run_counted(lb, packets, ingress)
    assert total_packets(lb.reasons()) - before == len(packets)
    assert len(set(names)) > 1      # the garbage reached more than one verdict


def test_xdp_actions_are_the_known_ones():
    assert {XDP_ACTIONS[a] for a in (1, 2, 4)} == {r.action for r in reasons()}


# ---- idle flows ---------------------------------------------------------------------------------


def test_idle_sweep_ages_then_removes_both_entries_of_a_silent_flow(lb):
    """zfast/dataplane/flowage.py: a packet marks its entry SEEN; a sweep turns SEEN into nothing and
    nothing into AGED; a forward entry still AGED goes with its reply entry."""
    flows = lb.dp.table("flows")
    busy, silent = fx.CPORT, fx.CPORT + 1
    for sport in (busy, silent):
        assert lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4) / fx.syn(sport=sport)),
                      fx.PUB).action == "redirect"
    assert len(list(flows.keys())) == 4

    def ports():
        return sorted((socket.ntohs(k.sport), socket.ntohs(k.dport)) for k in flows.keys())

    before = ports()
    assert sweep(flows) == {"entries": 4, "aged": 4, "deleted": 0}   # all new: AGED
    for _ in range(3):
        # the busy flow sends between sweeps (both ways); the silent one does not
        assert lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4) / fx.ack(sport=busy)),
                      fx.PUB).action == "redirect"
        assert lb.run(fx.from_backend(fx.ip4(fx.BACKEND4, fx.CLIENT4) / fx.syn_ack(dport=busy)),
                      fx.PRIV).action == "redirect"
        result = sweep(flows)
        assert len(list(flows.keys())) == 2, ports()
    assert all(silent not in pair for pair in ports()) and ports() == [p for p in before if silent not in p]
    assert result["deleted"] == 0
    # the busy flow falls silent: aged at the next sweep, gone at the one after
    sweep(flows)
    assert len(list(flows.keys())) == 2
    assert sweep(flows)["deleted"] == 2
    assert list(flows.keys()) == []


def test_a_flow_that_goes_takes_its_reply_entry_even_when_replies_still_come(lb):
    """The forward entry decides: a client silent for a period goes, and its reply entry
    with it, not written back aged by the same sweep (it used to be, and lived one more)."""
    flows = lb.dp.table("flows")
    sport = fx.CPORT + 7
    assert lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4) / fx.syn(sport=sport)),
                  fx.PUB).action == "redirect"
    assert sweep(flows) == {"entries": 2, "aged": 2, "deleted": 0}
    assert lb.run(fx.from_backend(fx.ip4(fx.BACKEND4, fx.CLIENT4) / fx.syn_ack(dport=sport)),
                  fx.PRIV).action == "redirect"        # only the backend speaks
    assert sweep(flows) == {"entries": 2, "aged": 0, "deleted": 2}
    assert list(flows.keys()) == []


# ---- an egress XDP frames cannot reach ------------------------------------------------------


@pytest.mark.parametrize("hook", ["xdp", "tc"])
def test_an_egress_marked_tx_kernel_is_left_to_the_kernel_by_xdp(lb, hook):
    """ZF_TX_KERNEL on priv0 (a veth whose peer has no NAPI, zfast/dataplane/egress.py): the XDP
    program rewrites the packet for its backend and passes it for the kernel to forward,
    TTL and MACs untouched (the kernel does both); tc redirects skbs, which need no NAPI."""
    idx = lb.ifindex[fx.PRIV]
    lb.dp.set_tx_kernel(idx, True)
    try:
        before = lb.reasons()
        result = lb.run(fx.UDP4, fx.PUB, hook)
        deltas = counter_deltas(before, lb.reasons())
        if hook == "tc":
            assert result.action == "redirect" and set(deltas) == {"fwd_new"}
            return
        assert result.action == "pass" and deltas == {"pass_egress": (1, len(bytes(fx.UDP4)))}
        got = Ether(result.data)
        sent = Ether(bytes(fx.UDP4))
        assert got[IP].dst == fx.BACKEND4 and got[UDP].dport == 5353
        assert got[IP].ttl == sent[IP].ttl and got.dst == sent.dst and got.src == sent.src
        assert checksum_problems(result.data) == []
    finally:
        lb.dp.set_tx_kernel(idx, False)
    assert lb.dp.table("tx_flags")[lb.dp.table("tx_flags").Key(idx)].value == 0


# ---- the flow sync's ring buffer --------------------------------------------------------------


def test_new_flows_are_reported_on_the_ring_buffer_while_sync_is_on(lb):
    """What the pair's flow sync reads (zfast.ha.sync): one event per new forward entry,
    its key and value as the flows map has them."""
    flows = lb.dp.table("flows")
    size = ctypes.sizeof(flows.Key) + ctypes.sizeof(flows.Leaf)
    events: list[bytes] = []
    lb.dp.bpf[b"flow_events"].open_ring_buffer(
        lambda ctx, data, n: events.append(ctypes.string_at(data, n)))
    lb.dp.bpf.ring_buffer_consume()
    events.clear()
    lb.dp.update_config(sync=1)
    try:
        for sport in (fx.CPORT, fx.CPORT + 1):
            assert lb.run(fx.from_client(fx.ip4(fx.CLIENT4, fx.VIP4) / fx.syn(sport=sport)),
                          fx.PUB).action == "redirect"
        lb.dp.bpf.ring_buffer_poll(100)
    finally:
        lb.dp.update_config(sync=0)
    assert len(events) >= 2 and {len(e) for e in events} == {size}
    entries = {bytes(k): bytes(v) for k, v in flows.items()}
    sports = set()
    for e in events:
        key, value = e[:ctypes.sizeof(flows.Key)], e[ctypes.sizeof(flows.Key):]
        assert entries.get(key) == value
        sports.add(flows.Key.from_buffer_copy(key).sport)
    assert {socket.htons(fx.CPORT), socket.htons(fx.CPORT + 1)} <= sports


def test_rings_take_memory_for_the_services_in_use_only(lb):
    """A Maglev ring is an inner map made when a service needs it (bpf/maps.h): none
    up front for ZF_MAX_RINGS, none left behind by a service that is gone."""
    dp, table = lb.dp, lb.services

    def rings() -> set[int]:
        return {r for r in range(2 * dp.sizes.max_services) if dp.read_ring(r) is not None}

    def in_use() -> set[int]:
        return {inst.index * 2 + inst.ring_gen for inst in table.services.values()}

    specs = list(config.parse(fx.PROJECT).services)
    assert in_use() <= rings() and len(rings()) <= 2 * len(specs)
    assert all(len(dp.read_ring(r)) == dp.sizes.maglev_size for r in rings())
    gone = table.services[specs[0].name].index
    try:
        table.apply(tuple(specs[1:]))
        assert in_use() <= rings() and not rings() & {gone * 2, gone * 2 + 1}
    finally:
        table.apply(tuple(specs))
    assert in_use() <= rings() and len(rings()) <= 2 * len(specs)

