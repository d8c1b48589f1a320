"""The balancer the packet tests run against: one namespace, the program, the services.

Built once per module (compiling the program takes seconds): a namespace "lb" that routes,
with pub0 towards a client namespace and priv0 towards a backend namespace, fixed MACs and
permanent neighbour entries (tests/fixtures/packets.py has the numbers), so that
bpf_fib_lookup answers the same every run. Packets go through BPF_PROG_RUN with the thread
inside "lb": the ingress ifindex and the FIB are looked up in the caller's namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures import packets as fx
from zfast import config
from zfast.dataplane.loader import Loaded
from zfast.dataplane.progrun import RunResult, run_tc, run_xdp
from zfast.lab.netns import Topology, in_ns
from zfast.reconcile.services import ServiceTable


def pytest_itemcollected(item):
    """Every test under tests/bpf is marked `bpf` here, not in each file (called through
    the item's own hook proxy: only for items under this directory)."""
    item.add_marker(pytest.mark.bpf)


@dataclass
class Balancer:
    dp: Loaded                   # compiled by BCC, or loaded from the program cache
    services: ServiceTable
    topology: Topology
    ns: str                      # full name of the "lb" namespace
    ifindex: dict[str, int]      # fx.PUB / fx.PRIV -> ifindex of pub0 / priv0

    def run(self, packet, ingress: str, hook: str = "xdp") -> RunResult:
        """One packet (bytes or scapy) through the program of `hook` (xdp: xdp_zfast, tc:
        tc_zfast, the same pipeline), as if it came in on `ingress`."""
        with in_ns(self.ns):
            if hook == "tc":
                return run_tc(self.dp.fn_tc.fd, bytes(packet), self.ifindex[ingress])
            return run_xdp(self.dp.prog_fd, bytes(packet), self.ifindex[ingress])

    def run_all(self, packets, ingress: str) -> list[RunResult]:
        with in_ns(self.ns):
            return [run_xdp(self.dp.prog_fd, bytes(p), self.ifindex[ingress]) for p in packets]

    def reasons(self) -> dict[str, tuple[int, int]]:
        return self.dp.reason_counters()

    def forget_flows(self) -> None:
        self.dp.table("flows").clear()
        self.dp.table("frags").clear()


def _require_root() -> None:
    # Fail, don't skip: a CI that silently skips these would test nothing.
    assert os.geteuid() == 0, ("the BPF packet tests need root (BPF_PROG_RUN, network "
                               "namespaces); run ./run.sh test as root")


# The VM tier (zfast.lab.vmguest) compiles once per kernel, not once per run: it names a
# program cache that outlives the guest, and runs the fixtures against the cached load only
# (a BCC compile takes minutes under emulation; the compiled load is the host tier's).
CACHE_ENV = "ZFAST_TEST_PROGRAM_CACHE"
LOADS_ENV = "ZFAST_TEST_LOADS"
LOADS = ("compiled", "cached")


def loads() -> list[str]:
    """The loads the fixtures run against: both, or those $ZFAST_TEST_LOADS names."""
    wanted = os.environ.get(LOADS_ENV, "").split(",") if os.environ.get(LOADS_ENV) else LOADS
    unknown = sorted(set(wanted) - set(LOADS))
    assert not unknown, f"${LOADS_ENV}: {', '.join(unknown)} not among {', '.join(LOADS)}"
    return list(wanted)


@pytest.fixture(scope="session")
def program_cache(tmp_path_factory) -> Path:
    """A program cache of the test session's own (zfast.dataplane.progcache), or the one
    $ZFAST_TEST_PROGRAM_CACHE names (kept from run to run)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return tmp_path_factory.mktemp("progcache")


def load(sizes: config.Datapath, how: str, cache: Path) -> Loaded:
    """The program compiled by BCC with no cache ("compiled"), or loaded from a cache
    entry without LLVM ("cached"; the first load of a session compiles and writes it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZFAST_CACHE_DIR", "off" if how == "compiled" else str(cache))
        dp = Loaded(sizes)
        if how == "cached" and dp.cache == "miss":
            dp.bpf.cleanup()
            dp = Loaded(sizes)
    assert dp.cache == {"compiled": "off", "cached": "hit"}[how]
    return dp


@pytest.fixture(scope="module", params=loads())
def balancer(request, program_cache):
    """Every packet test runs against both: the program as BCC loads it after compiling,
    and as zfast.dataplane.progcache loads it from an entry (its own maps and table classes)."""
    _require_root()
    project = config.parse(fx.PROJECT)
    with Topology(prefix="zfpkt") as t:
        lb, client, backend = t.add_ns("lb", router=True), t.add_ns("client"), t.add_ns("backend")
        t.veth(lb, fx.LB_IFNAMES[fx.PUB], client, "eth0", fx.LB_PUB_ADDRS, fx.CLIENT_ADDRS)
        t.veth(lb, fx.LB_IFNAMES[fx.PRIV], backend, "eth0", fx.LB_PRIV_ADDRS, fx.BACKEND_ADDRS)
        for ns, ifname, mac in ((lb, fx.LB_IFNAMES[fx.PUB], fx.LB_PUB_MAC),
                                (lb, fx.LB_IFNAMES[fx.PRIV], fx.LB_PRIV_MAC),
                                (client, "eth0", fx.CLIENT_MAC),
                                (backend, "eth0", fx.BACKEND_MAC)):
            t.run(ns, ["ip", "link", "set", "dev", ifname, "address", mac], check=True)
        for side, address, mac in fx.NEIGHBOURS:
            t.run(lb, ["ip", "neigh", "replace", address, "lladdr", mac,
                       "dev", fx.LB_IFNAMES[side], "nud", "permanent"], check=True)
        ifindex = {side: t.ifindex(lb, name) for side, name in fx.LB_IFNAMES.items()}

        dp = load(project.datapath, request.param, program_cache)
        try:
            services = ServiceTable(dp)
            services.apply(project.services)
            yield Balancer(dp, services, t, lb, ifindex)
        finally:
            dp.bpf.cleanup()


@pytest.fixture
def lb(balancer):
    """The balancer with no flows: every test starts from the same state."""
    balancer.forget_flows()
    return balancer
