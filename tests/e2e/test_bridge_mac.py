"""A host bridge keeps its MAC while instances are plugged in and out. Needs root.

A Linux bridge whose MAC was never set takes the lowest MAC of its ports. Under `zfast core
up` that changed the host's MAC whenever an instance (the spare, a repair's successor) was
plugged in with a lower one; the active balancer, forwarding in XDP with the old MAC in a
neighbour entry the kernel never probes again, sent every reply to the host into the void
(seen as ACME validations from the host timing out in test_routing_core). The core pins
the MAC of the bridges it plugs into (zfast.core.runtime.pin_bridge_mac); the labs' bridges
have a MAC of their own from the start.
"""

import subprocess

import pytest

from tests.e2e.kit.kernel import mac_of
from zfast.core.runtime import pin_bridge_mac
from zfast.lab.netns import Topology, in_ns

LOWEST = "02:00:00:00:00:01"      # below any random locally administered MAC but 02:00:00:00:00:00


pytestmark = pytest.mark.usefixtures("need_root")   # tests/e2e/conftest.py


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, text=True).stdout


def plug_lowest(ns: str, bridge: str) -> None:
    """A port with the lowest MAC there is joins the bridge (as an instance's veth may)."""
    ip(ns, "link", "add", "zfbm0", "address", LOWEST, "type", "veth", "peer", "name", "zfbm1")
    ip(ns, "link", "set", "zfbm0", "master", bridge, "up")


@pytest.fixture
def host():
    with Topology(prefix="zfbm") as t:
        ns = t.add_ns("host")
        ip(ns, "link", "add", "br0", "type", "bridge")     # as an operator makes one
        ip(ns, "link", "set", "br0", "up")
        yield t, ns


def test_a_bridge_whose_mac_was_never_set_follows_its_lowest_port(host):
    """The kernel's behaviour the pinning is for: without it the host's MAC changes."""
    _, ns = host
    plug_lowest(ns, "br0")
    assert mac_of(ns, "br0") == LOWEST


def test_a_pinned_bridge_keeps_its_mac_as_ports_join_and_leave(host):
    _, ns = host
    with in_ns(ns):
        before = pin_bridge_mac("br0")
    assert before == mac_of(ns, "br0") != LOWEST
    plug_lowest(ns, "br0")
    assert mac_of(ns, "br0") == before
    ip(ns, "link", "del", "zfbm0")
    assert mac_of(ns, "br0") == before


def test_the_labs_bridges_have_a_mac_of_their_own(host):
    t, ns = host
    t.bridge(ns, "br1")
    before = mac_of(ns, "br1")
    plug_lowest(ns, "br1")
    assert mac_of(ns, "br1") == before
