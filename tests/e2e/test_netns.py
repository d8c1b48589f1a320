"""zfast.lab.netns end to end: real namespaces, veths, ping and TCP through them. Needs root."""

import os
import socket
import subprocess
import threading

import pytest

from zfast.lab.netns import Topology, cleanup_stale, in_ns, list_netns

pytestmark = pytest.mark.usefixtures("need_root")   # tests/e2e/conftest.py


@pytest.fixture
def pair():
    with Topology(prefix="zft") as t:
        a, b = t.add_ns("a"), t.add_ns("b")
        t.veth(a, "eth0", b, "eth0",
               addrs_a=["10.99.0.1/24", "fd99::1/64"],
               addrs_b=["10.99.0.2/24", "fd99::2/64"])
        yield t, a, b


def _thread_netns_ino():
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.parametrize("dst", ["10.99.0.2", "fd99::2"])
def test_ping(pair, dst):
    t, a, _ = pair
    p = t.run(a, ["ping", "-c1", "-W1", dst], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("family,dst", [(socket.AF_INET, "10.99.0.2"), (socket.AF_INET6, "fd99::2")])
def test_tcp_echo_via_in_ns(pair, family, dst):
    t, a, b = pair
    before = _thread_netns_ino()
    with in_ns(b):
        assert _thread_netns_ino() != before
        srv = socket.create_server((dst, 0), family=family)
    assert _thread_netns_ino() == before, "in_ns did not restore the thread's namespace"
    port = srv.getsockname()[1]
    srv.settimeout(5)

    def echo():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(conn.recv(1024))

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    try:
        with t.in_ns("a"):       # short names work through the Topology
            cli = socket.create_connection((dst, port), timeout=5)
        with cli:
            cli.sendall(b"hello zfast")
            assert cli.recv(1024) == b"hello zfast"
    finally:
        th.join(5)
        srv.close()


def test_query_helpers(pair):
    t, a, b = pair
    assert t.ifindex(a, "eth0") > 1
    mac = t.mac(b, "eth0")
    assert len(mac.split(":")) == 6
    t.offload_off(a, "eth0")
    t.gro_on(b, "eth0")
    feats = t.run(a, ["ethtool", "-k", "eth0"], capture_output=True, text=True, check=True).stdout
    assert "tx-checksumming: off" in feats
    assert t.run(a, ["sysctl", "-n", "net.ipv4.ip_forward"], capture_output=True,
                 text=True).stdout.strip() == "0"


def test_router_bridge_and_routes():
    # client -- router -- bridge(backends): v4 and v6 routed through a forwarding namespace
    with Topology(prefix="zft") as t:
        c, r, s1, s2 = (t.add_ns("c"), t.add_ns("r", router=True), t.add_ns("s1"), t.add_ns("s2"))
        t.veth(c, "eth0", r, "c0", ["10.98.1.2/24", "fd98:1::2/64"], ["10.98.1.1/24", "fd98:1::1/64"])
        t.bridge(r, "br0", ["10.98.2.1/24", "fd98:2::1/64"])
        for i, s in enumerate((s1, s2), start=2):
            t.veth(s, "eth0", r, f"s{i}", [f"10.98.2.{i}/24", f"fd98:2::{i}/64"])
            t.attach_to_bridge(r, f"s{i}", "br0")
            t.route(s, "default", "10.98.2.1")
            t.route(s, "default", "fd98:2::1")
        t.route(c, "10.98.2.0/24", "10.98.1.1")
        t.route(c, "fd98:2::/64", "fd98:1::1")
        for dst in ("10.98.2.2", "10.98.2.3", "fd98:2::2", "fd98:2::3"):
            p = t.run(c, ["ping", "-c1", "-W1", dst], capture_output=True, text=True)
            assert p.returncode == 0, f"{dst}: {p.stdout}{p.stderr}"


def test_close_removes_everything_and_is_idempotent():
    t = Topology(prefix="zft")
    names = [t.add_ns(n) for n in ("x", "y")]
    host_if = t.hostif("h")
    t.veth(None, host_if, names[0], "eth0")        # one end in the host namespace
    t.veth(names[0], "eth1", names[1], "eth0")
    proc = t.popen(names[1], ["sleep", "60"])
    assert set(names) <= set(list_netns())
    t.close()
    assert proc.poll() is not None, "close() left a process running"
    assert not set(names) & set(list_netns())
    assert subprocess.run(["ip", "link", "show", host_if], capture_output=True).returncode != 0
    t.close()                                      # second close: no error


def test_close_after_error_in_with_block():
    with pytest.raises(RuntimeError):
        with Topology(prefix="zft") as t:
            made = t.add_ns("boom")
            raise RuntimeError("test failure mid-build")
    assert made not in list_netns()


def test_cleanup_stale():
    dead = subprocess.Popen(["true"])
    dead.wait()                                     # a pid that no longer runs
    stale = f"zft-{dead.pid}-beef-left"
    live = f"zft-{os.getpid()}-beef-mine"
    for n in (stale, live):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        removed = cleanup_stale("zft")
        assert stale in removed
        assert stale not in list_netns()
        assert live in list_netns(), "cleanup_stale removed a namespace of a live process"
    finally:
        for n in (stale, live):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
