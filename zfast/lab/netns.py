"""Throw-away network-namespace topologies for the demo, end-to-end tests and benchmarks.

    with Topology() as t:
        a, b = t.add_ns("a"), t.add_ns("b")
        t.veth(a, "eth0", b, "eth0", ["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
        t.run(a, ["ping", "-c1", "-W1", "10.0.0.2"], check=True)
        with in_ns(b):
            srv = socket.create_server(("10.0.0.2", 8080))   # socket lives in b

Links and addresses are made with the `ip` command (iproute2): its behaviour is stable
across versions and its errors are readable, while pyroute2's API has changed a lot
between releases. Switching a thread's namespace (`in_ns`) is a plain setns(2).

Namespace names are ``<prefix>-<pid>-<tag>-<name>``: unique per process (the random tag
lets one process hold several topologies), and the pid lets `cleanup_stale` remove what a
crashed run left behind. Interface names inside a namespace are used as given (each
namespace has its own); links in the host namespace (ns=None) must have unique names:
`Topology.hostif` makes one.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

__all__ = ["Topology", "TopologyError", "in_ns", "cleanup_stale", "list_netns"]

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"          # where `ip netns add` keeps its bind mounts
IFNAMSIZ = 15                     # max interface name length (IFNAMSIZ - 1)
_CLONE_NEWNET = 0x40000000


class TopologyError(RuntimeError):
    """A command that builds or queries the topology failed (message includes its stderr)."""


# --------------------------------------------------------------------------- helpers

def _cmd(argv: Sequence[str], check: bool = True) -> str:
    """Run a set-up command, return its stdout; raise TopologyError with stderr on failure."""
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise TopologyError(f"{shlex.join(argv)}: {(p.stderr or p.stdout).strip()} (exit {p.returncode})")
    return p.stdout


def _ip(ns: str | None, *args: str, check: bool = True) -> str:
    """`ip [-n NS] ARGS...`; ns=None means the current (host) namespace."""
    return _cmd(["ip", *(["-n", ns] if ns else []), *args], check=check)


def _family_flag(addr: str) -> list[str]:
    return ["-6"] if ipaddress.ip_interface(addr).version == 6 else []


def _check_ifname(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ValueError(f"bad interface name {name!r} (1..{IFNAMSIZ} chars, no '/' or spaces)")
    return name


def list_netns() -> list[str]:
    """Names of the namespaces made with `ip netns add` (the bind mounts in /run/netns)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    return True


def _kill_ns_processes(ns: str) -> None:
    """SIGKILL whatever still runs inside ns: it would keep the namespace (and its links) alive."""
    out = _ip(None, "netns", "pids", ns, check=False)
    for pid in (int(x) for x in out.split() if x.isdigit()):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _delete_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _ip(None, "netns", "del", ns, check=False)
    if os.path.exists(os.path.join(NETNS_DIR, ns)):
        raise TopologyError(f"could not delete network namespace {ns}")


# ------------------------------------------------------------------ thread namespace switch

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists from Python 3.12 only; the system python here is 3.11.
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _ns_path(name: str) -> str:
    return name if name.startswith("/") else os.path.join(NETNS_DIR, name)


@contextmanager
def in_ns(name: str | None) -> Iterator[None]:
    """Run the with-block with the *current thread* in network namespace `name`.

    Sockets created inside stay in that namespace after the block. Other threads are not
    affected. `name` is a namespace name (/run/netns/NAME), a path to a namespace file
    (e.g. /proc/PID/ns/net), or None for "stay where you are". Don't build topology
    (Topology methods) inside the block: the `ip` commands would start in this namespace.
    """
    if name is None:
        yield
        return
    target = os.open(_ns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        # thread-self, not self: /proc/self/ns/net is the main thread's namespace.
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(orig)
        finally:
            os.close(orig)
    finally:
        os.close(target)


# ----------------------------------------------------------------------- stale cleanup

def _stale_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-")


def cleanup_stale(prefix: str = "zf") -> list[str]:
    """Delete namespaces named ``<prefix>-<pid>-...`` whose creating pid is dead.

    Returns the names deleted. Processes still running in them are killed first. Links a
    crashed run made in the host namespace go away with their veth peer; host bridges
    (rare) are not tracked here.
    """
    pat, removed = _stale_re(prefix), []
    for ns in list_netns():
        m = pat.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            _delete_ns(ns)
            removed.append(ns)
        except TopologyError as e:
            log.warning("cleanup_stale: %s", e)
    return removed


# ---------------------------------------------------------------------------- Topology

class Topology:
    """A set of namespaces and links that is torn down as a whole (close / with / atexit)."""

    def __init__(self, prefix: str = "zf", clean_stale: bool = True):
        if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            raise ValueError(f"prefix must be [A-Za-z0-9_]+, got {prefix!r}")
        if clean_stale:
            cleanup_stale(prefix)
        self.prefix = prefix
        self.tag = secrets.token_hex(2)        # 4 hex chars: short enough for host ifnames
        self._ns: dict[str, str] = {}          # short name -> full name, in creation order
        self._host_links: list[str] = []       # links we made in the host namespace
        self._procs: list[subprocess.Popen] = []
        self._atexit = False
        self._cleanups: list = []

    def at_close(self, fn) -> None:
        """Call fn at close(), after our processes stopped (e.g. remove a state dir)."""
        self._cleanups.append(fn)

    # -- context manager / teardown

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _arm(self) -> None:
        # Make sure a forgotten close() still happens at interpreter exit.
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def close(self) -> None:
        """Stop our processes, delete our host links and namespaces. Idempotent; never raises."""
        for p in reversed(self._procs):
            self._stop(p)
        self._procs.clear()
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as e:
                log.warning("Topology.close: %s", e)
        self._cleanups.clear()
        for ifname in reversed(self._host_links):
            _ip(None, "link", "del", ifname, check=False)   # may be gone with its peer already
        self._host_links.clear()
        for full in reversed(list(self._ns.values())):
            try:
                _delete_ns(full)
            except Exception as e:   # keep going: delete as much as we can
                log.warning("Topology.close: %s", e)
        self._ns.clear()
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False

    @staticmethod
    def _stop(p: subprocess.Popen, timeout: float = 2.0) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)   # popen() starts a new session: kill the group
        except (ProcessLookupError, PermissionError):
            p.terminate()
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

    # -- names

    def ns(self, name: str | None) -> str | None:
        """Full namespace name for a short name given to add_ns (full names and None pass through)."""
        if name is None:
            return None
        return self._ns.get(name, name)

    @property
    def namespaces(self) -> dict[str, str]:
        """{short name: full name} of the namespaces this topology made."""
        return dict(self._ns)

    def hostif(self, base: str) -> str:
        """A per-process unique interface name for the host namespace: prefix + tag + base."""
        return _check_ifname(f"{self.prefix}{self.tag}{base}")

    # -- building

    def add_ns(self, name: str, router: bool = False) -> str:
        """Create namespace `name` (lo up, no IPv6 DAD); router=True enables v4/v6 forwarding."""
        if name in self._ns:
            raise ValueError(f"namespace {name!r} already in this topology")
        full = f"{self.prefix}-{os.getpid()}-{self.tag}-{name}"
        self._arm()
        _ip(None, "netns", "add", full)
        self._ns[name] = full                  # tracked before anything else can fail
        _ip(full, "link", "set", "lo", "up")
        fwd = "1" if router else "0"           # explicit: a new netns may inherit the host's
        self.sysctl(full, {
            # DAD makes new IPv6 addresses (link-local too) unusable for ~1 s: skip it.
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
            "net.ipv4.ip_forward": fwd,
            "net.ipv6.conf.all.forwarding": fwd,
        })
        return full

    def veth(self, ns_a: str | None, if_a: str, ns_b: str | None, if_b: str,
             addrs_a: Iterable[str] = (), addrs_b: Iterable[str] = (),
             mtu: int | None = None) -> None:
        """Create a veth pair with one end in each namespace (None = host), up, with addresses."""
        a, b = self.ns(ns_a), self.ns(ns_b)
        _check_ifname(if_a), _check_ifname(if_b)
        mtu_opt = ["mtu", str(mtu)] if mtu else []
        self._arm()
        # Each end is created directly in its namespace, so the names never clash in ours.
        _ip(None, "link", "add", if_a, *(["netns", a] if a else []), *mtu_opt,
            "type", "veth", "peer", "name", if_b, *(["netns", b] if b else []), *mtu_opt)
        if a is None:
            self._host_links.append(if_a)
        elif b is None:
            self._host_links.append(if_b)
        # Up before addresses: IPv6 addresses added to a down link are dropped at link-up.
        _ip(a, "link", "set", if_a, "up")
        _ip(b, "link", "set", if_b, "up")
        self.addrs(a, if_a, addrs_a)
        self.addrs(b, if_b, addrs_b)

    def addrs(self, ns: str | None, ifname: str, addrs: Iterable[str]) -> None:
        """Add IPv4/IPv6 addresses (CIDR) to ifname; v6 ones with nodad."""
        ns = self.ns(ns)
        for cidr in addrs:
            v6 = ipaddress.ip_interface(cidr).version == 6
            _ip(ns, *(["-6"] if v6 else []), "addr", "add", cidr, "dev", ifname,
                *(["nodad"] if v6 else []))

    def bridge(self, ns: str | None, name: str, addrs: Iterable[str] = ()) -> None:
        """Create a bridge in ns, up, with addresses."""
        ns = self.ns(ns)
        _check_ifname(name)
        self._arm()
        # A MAC of its own (locally administered), so that the bridge does not take the
        # lowest of its ports' as ports come and go (zfast.core.runtime.pin_bridge_mac);
        # no multicast snooping: it can hold back IPv6 neighbour discovery on a fresh bridge.
        mac = bytearray(os.urandom(6))
        mac[0] = (mac[0] & 0xFE) | 0x02
        _ip(ns, "link", "add", "name", name, "address", mac.hex(":"), "type", "bridge",
            "mcast_snooping", "0")
        if ns is None:
            self._host_links.append(name)
        _ip(ns, "link", "set", name, "up")
        self.addrs(ns, name, addrs)

    def attach_to_bridge(self, ns: str | None, ifname: str, bridge: str) -> None:
        ns = self.ns(ns)
        _ip(ns, "link", "set", ifname, "master", bridge)
        _ip(ns, "link", "set", ifname, "up")

    def route(self, ns: str | None, dst_cidr: str, via: str, dev: str | None = None) -> None:
        """Add or replace a route; dst_cidr may be "default"; the family follows `via`."""
        _ip(self.ns(ns), *_family_flag(via), "route", "replace", dst_cidr, "via", via,
            *(["dev", dev] if dev else []))

    def sysctl(self, ns: str | None, key: str | dict[str, str], value: str | int | None = None) -> None:
        """Set one sysctl (key, value) or several ({key: value}) inside ns."""
        items = key.items() if isinstance(key, dict) else [(key, value)]
        args = [f"{k}={v}" for k, v in items]
        p = self.run(ns, ["sysctl", "-q", "-w", *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise TopologyError(f"sysctl {' '.join(args)} in {self.ns(ns)}: {p.stderr.strip()}")

    # -- running things inside

    def _argv(self, ns: str | None, argv: str | Sequence[str]) -> list[str]:
        argv = shlex.split(argv) if isinstance(argv, str) else list(argv)
        full = self.ns(ns)
        return ["ip", "netns", "exec", full, *argv] if full else argv

    def run(self, ns: str | None, argv: str | Sequence[str], **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside ns (via `ip netns exec`); kw as for subprocess.run."""
        return subprocess.run(self._argv(ns, argv), **kw)

    def popen(self, ns: str | None, argv: str | Sequence[str], **kw) -> subprocess.Popen:
        """subprocess.Popen inside ns; stopped by close() (whole process group)."""
        kw.setdefault("start_new_session", True)
        self._arm()
        p = subprocess.Popen(self._argv(ns, argv), **kw)
        self._procs.append(p)
        return p

    # -- queries and tuning

    def _link(self, ns: str | None, ifname: str) -> dict:
        return json.loads(_ip(self.ns(ns), "-j", "link", "show", "dev", ifname))[0]

    def ifindex(self, ns: str | None, ifname: str) -> int:
        return int(self._link(ns, ifname)["ifindex"])

    def mac(self, ns: str | None, ifname: str) -> str:
        return self._link(ns, ifname)["address"]

    def _ethtool(self, ns: str | None, ifname: str, *features: str) -> None:
        p = self.run(ns, ["ethtool", "-K", ifname, *features], capture_output=True, text=True)
        if p.returncode != 0:
            raise TopologyError(f"ethtool -K {ifname} {' '.join(features)}: {p.stderr.strip()}")

    def offload_off(self, ns: str | None, ifname: str) -> None:
        """Turn off TX checksum/segmentation offloads and GRO.

        A veth with TX checksum offload hands over packets with a partial checksum
        (CHECKSUM_PARTIAL); an XDP program rewriting them (NAT) would fix up a checksum
        that is not final yet and the packet arrives corrupted.
        """
        self._ethtool(ns, ifname, "tx", "off", "tso", "off", "gso", "off", "gro", "off")

    def gro_on(self, ns: str | None, ifname: str) -> None:
        """Turn GRO on: a veth accepts XDP_REDIRECTed frames only with its NAPI enabled,
        which GRO (or an XDP program attached to it) does."""
        self._ethtool(ns, ifname, "gro", "on")

    def wait_link_up(self, ns: str | None, ifname: str, timeout: float = 2.0) -> None:
        """Wait until ifname reports carrier (operstate UP)."""
        end = time.monotonic() + timeout
        while self._link(ns, ifname).get("operstate") != "UP":
            if time.monotonic() > end:
                raise TopologyError(f"{ifname} in {self.ns(ns)} not up after {timeout}s")
            time.sleep(0.02)

    def in_ns(self, ns: str | None):
        """in_ns() with this topology's short names."""
        return in_ns(self.ns(ns))
