"""tools/: the XDP traffic generator and the sink (the benchmark's command line:
tests/unit/test_bench_cli.py).

Needs root (namespaces, XDP, BPF_PROG_RUN): fails, never skips, without it. tools/ is a
package, imported from the repo root that pytest.ini's `pythonpath` puts on sys.path.
"""

import ipaddress
import os
import time
from pathlib import Path

import pytest
from scapy.all import Ether

from tools.sink import Sink
from tools.trafficgen import FlowSpec, Generator, GenError, dev_info, run_pktgen
from zfast.dataplane.progrun import run_xdp
from zfast.lab.netns import Topology

SRC, DST = "10.77.0.1", "10.77.0.2"


@pytest.fixture(autouse=True)
def _need_root():
    # Fail, don't skip: a CI that silently skips these would test nothing.
    assert os.geteuid() == 0, "tools tests need root (namespaces, XDP); run ./run.sh test as root"


@pytest.fixture(scope="module")
def pair():
    with Topology(prefix="zftt") as t:
        gen, sink = t.add_ns("gen"), t.add_ns("sink")
        t.veth(gen, "g0", sink, "s0", [f"{SRC}/24"], [f"{DST}/24"])
        yield t, gen, sink


def _spec(gen_ns, sink_ns, **kw):
    _, smac = dev_info(gen_ns, "g0")
    _, dmac = dev_info(sink_ns, "s0")
    kw.setdefault("flows", 100)
    return FlowSpec(src_mac=smac, dst_mac=dmac, src=ipaddress.ip_address(SRC),
                    dst=ipaddress.ip_address(DST), dport=5000, **kw)


def test_generator_sends_and_sink_counts(pair):
    t, gen_ns, sink_ns = pair
    with Sink(sink_ns, "s0", match=DST) as sink:   # XDP on s0 also turns its NAPI on
        gen = Generator(_spec(gen_ns, sink_ns), gen_ns, "g0")
        before = sink.counts()
        res = gen.run(2.0)
        time.sleep(0.1)   # the last batch drains
        after = sink.counts()
    got = after.packets - before.packets
    assert res.sent >= 100_000, f"generator sent only {res.sent} packets in 2 s"
    # a full veth ring drops some when both CPUs send into it at once
    assert got >= 0.5 * res.sent, f"sink counted {got} of {res.sent} sent"
    # the kernel's own few (IPv6 MLD, router solicitations) are not ours
    assert after.matched - before.matched >= got - 100, "frames at the sink not to the destination"
    assert res.pps > 50_000


def test_generator_rate(pair):
    t, gen_ns, sink_ns = pair
    with Sink(sink_ns, "s0") as sink:
        gen = Generator(_spec(gen_ns, sink_ns), gen_ns, "g0")
        res = gen.run(1.0, rate=20_000)
        assert sink.counts().packets > 0
    assert 10_000 <= res.sent <= 30_000, f"--rate 20000 for 1 s sent {res.sent}"


@pytest.mark.parametrize("src,dst,proto", [("10.1.0.1", "10.2.0.2", "udp"),
                                           ("fd00::1", "fd00::2", "tcp-syn")])
def test_frames_are_what_python_builds(src, dst, proto):
    """Non-live BPF_PROG_RUN hands back the frame: flow i as FlowSpec.frame(i), checksums valid."""
    spec = FlowSpec(src_mac=b"\x02" * 6, dst_mac=b"\x04" * 6, src=ipaddress.ip_address(src),
                    dst=ipaddress.ip_address(dst), dport=80, sport=60000, flows=300,
                    vary="both", ports_per_addr=7, proto=proto, size=90)
    gen = Generator(spec, None, "lo")
    for i in range(310):
        r = run_xdp(gen.prog_fd, gen.packet)
        assert r.action == "redirect"
        assert r.data == spec.frame(i), f"frame {i} differs"
    pkt = Ether(spec.frame(299))
    l3, l4 = pkt.payload, pkt.payload.payload
    want = l4.chksum
    del l4.chksum
    if l3.version == 4:
        del l3.chksum
    again = Ether(bytes(pkt))
    assert again.payload.payload.chksum == want
    assert str(spec.flow(299)[0]) == str(again.payload.src)


def test_pktgen_mode_is_clear(pair):
    t, gen_ns, sink_ns = pair
    spec = _spec(gen_ns, sink_ns)
    if not Path("/proc/net/pktgen").exists():
        with pytest.raises(GenError, match="pktgen"):
            run_pktgen(spec, t.ns(gen_ns), "g0", 0.5, [0])
    else:  # a kernel with pktgen: it must really send
        with Sink(sink_ns, "s0") as sink:
            res = run_pktgen(spec, t.ns(gen_ns), "g0", 1.0, [0])
            assert res.sent > 0 and sink.counts().packets > 0

