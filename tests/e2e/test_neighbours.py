"""A neighbour that changes its MAC without announcing it is found again. Needs root.

The data plane takes next-hop MACs from the kernel's neighbour table, but what it forwards
never passes the kernel's neighbour state machine: a STALE entry is probed again only when
the kernel itself sends through it. A client whose MAC changed silently (no gratuitous ARP:
Linux sends none unless arp_notify is set) kept getting its answers at the old MAC, for ever,
as long as it did not ARP for the VIP itself. The node hands every STALE entry on its
interfaces back to the kernel (zfast/dataplane/neighbours.py), which probes it, finds it
failed, and resolves it anew.

The client here never ARPs for the VIP (a permanent entry, as behind a router that does not
re-ARP in time), and the balancer's entry for the client is made STALE at once rather than
after its reachable time (15-45 s): what is tested is the node's probing, not the timers.
"""

import subprocess
import time

import pytest

from tests.e2e.kit import lab, traffic
from tests.e2e.kit.kernel import mac_of
from zfast.lab import topology

NEW_MAC = "02:5a:00:00:00:99"
RECOVER_S = 20.0    # the sweep (2 s) + DELAY (5 s) + three unicast probes (3 s), with slack

pytestmark = pytest.mark.usefixtures("need_root")   # tests/e2e/conftest.py


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                          text=True).stdout


def sysctl(ns: str, key: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", key], check=True,
                          capture_output=True, text=True).stdout.strip()


def neighbour_mac(ns: str, dev: str, address: str) -> str | None:
    out = ip(ns, "neigh", "show", address, "dev", dev).split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else None


def answered(env, count: int = 1, timeout: float = 0.5) -> int:
    got, failures, _ = traffic.udp_answers(env.lab.client, topology.VIP4, topology.UDP_PORT,
                                           count, timeout=timeout, tries=1)
    return sum(got.values())


@pytest.fixture
def env():
    with lab.lab_env("zfnb") as e:
        yield e


def test_a_client_whose_mac_changes_silently_gets_its_answers_again(env):
    client, lb = env.lab.client, env.lab.lb
    start = time.monotonic()      # the node answers once its services are in
    while time.monotonic() - start < 20 and not answered(env):
        pass
    assert answered(env, 20, timeout=2.0) == 20
    assert sysctl(lb, "net.ipv4.neigh.pub0.mcast_resolicit") == "3"   # set by the node
    assert sysctl(lb, "net.ipv6.neigh.pub0.mcast_resolicit") == "3"
    old = neighbour_mac(lb, "pub0", topology.CLIENT4)
    assert old == mac_of(client, "eth0")

    ip(client, "link", "set", "eth0", "address", NEW_MAC)   # flushes the client's neighbours
    ip(client, "neigh", "replace", topology.VIP4, "lladdr", mac_of(lb, "pub0"), "dev", "eth0",
       "nud", "permanent")
    ip(lb, "neigh", "change", topology.CLIENT4, "dev", "pub0", "lladdr", old, "nud", "stale")
    assert answered(env) == 0, "answers still reach the client at its old MAC: no test"

    start = time.monotonic()
    while time.monotonic() - start < RECOVER_S and not answered(env):
        pass
    took = time.monotonic() - start
    assert took < RECOVER_S, f"no answer {RECOVER_S:.0f} s after the client's MAC changed"
    assert neighbour_mac(lb, "pub0", topology.CLIENT4) == NEW_MAC
    assert answered(env, 20, timeout=2.0) == 20
    print(f"\nanswers again {took:.1f} s after the client's MAC changed")
