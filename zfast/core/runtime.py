"""The instance runtime: create, start, stop and destroy a balancer (or router) instance.

An instance is a network namespace with veth links into the host's bridges, a
cgroup with its CPU and memory limits, and a zfast daemon inside. `Runtime`
is the interface the repair and scaling controllers use; `NetnsRuntime` is
this host's implementation. Another (LXC/LXD, systemd-nspawn, systemd units
with slices) fits behind the same five methods: create, start, stop, destroy,
usage, plus resize (the scaling controller) and assign (a parked spare takes a failed
instance's addresses: zfast/core/spare.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from zfast.core.cgroups import Cgroup
from zfast.dataplane import pins
from zfast.node.daemon import down
from zfast.paths import pin_dir


@dataclass
class Link:
    bridge: str                 # a bridge in the host's (the core's) namespace
    ifname: str                 # the interface inside the instance
    addresses: list[str]        # CIDRs on it


@dataclass
class InstanceSpec:
    name: str                   # unique on the host, short (interface names derive from it)
    kind: str                   # balancer | router
    links: list[Link]
    cpu: float                  # CPUs (cgroup quota)
    memory: int                 # bytes (cgroup limit)
    state_dir: Path
    config: dict = field(default_factory=dict)   # the daemon's project file
    routes: list[tuple[str, str]] = field(default_factory=list)   # (destination, via)


@dataclass
class Instance:
    spec: InstanceSpec
    netns: str
    cgroup: Cgroup
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    cpu_ns_before: int = 0      # CPU its cgroup had used before it became this instance (a spare's compile)
    log_from: int = 0           # where its daemon's output starts in daemon.log (shared by its predecessors)
    host_ifnames: list[str] = field(default_factory=list)   # its links' ends on the bridges
    member: str | None = None   # the cluster member it runs on (None: this host, no cluster)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    @property
    def config_path(self) -> Path:
        return self.spec.state_dir / "instance.yaml"


class Runtime(ABC):
    # what a runtime does on its own (an orphan removed, a placement it could not keep):
    # the service sets it to its event log's ``log(kind, **fields)``
    log: Callable[..., None] = staticmethod(lambda kind, **fields: None)

    def open(self) -> None:
        """Before the first instance: what the runtime needs (and a clear error if it cannot)."""

    def close(self) -> None:
        """After the last instance is destroyed: what ``open`` made, removed."""

    def housekeeping(self) -> None:
        """Now and then (the core's scaling tick): what could not be done at once."""

    def better_placed(self, inst: Instance) -> bool:
        """Whether a new instance of its kind would now go to a member where none of its
        group runs while it shares one (placement after a member came back)."""
        return False

    def host_pid(self, inst: Instance, pid: int | None) -> int | None:
        """The host's pid of process ``pid`` as the instance sees it (a pid file in its
        state dir); None when it is not running there."""
        return pid

    @abstractmethod
    def create(self, spec: InstanceSpec, group: str | None = None) -> Instance:
        """Make the instance (not started); ``group``: a parent for its resource limits."""

    @abstractmethod
    def start(self, inst: Instance, park: dict | None = None) -> None:
        """Start the daemon; with ``park`` (a project file) as a parked spare that compiles
        for its sizes and waits for the instance's own file (zfast/core/spare.py)."""

    @abstractmethod
    def assign(self, inst: Instance, links: list[Link], macs: dict[str, str] | None = None) -> None:
        """Give the instance's interfaces these links' addresses (and MAC addresses: a
        successor that keeps its predecessor's MACs is reached at once through every
        neighbour cache and bridge, as a VRRP router is)."""

    @abstractmethod
    def macs(self, inst: Instance) -> dict[str, str]:
        """The MAC address of each of the instance's interfaces."""

    @abstractmethod
    def stop(self, inst: Instance, keep_dataplane: bool = False, timeout: float = 15.0) -> None: ...

    @abstractmethod
    def destroy(self, inst: Instance) -> None: ...

    @abstractmethod
    def usage(self, inst: Instance) -> dict: ...

    @abstractmethod
    def boost(self, inst: Instance, cpu: float | None) -> None:
        """Let the instance use up to ``cpu`` CPUs for a while (its start: the compile);
        None: back to its size (spec.cpu)."""

    def last_words(self, inst: Instance, limit: int = 300) -> str:
        """The last line its daemon printed (why it exited: a refusal, a traceback's end),
        from daemon.log in its state dir: every runtime has the daemon write there."""
        try:
            with open(inst.spec.state_dir / "daemon.log", "rb") as f:
                f.seek(max(inst.log_from, f.seek(0, os.SEEK_END) - 4096))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1][:limit] if lines else ""

    @abstractmethod
    def resize(self, inst: Instance, cpu: float, memory: int) -> None: ...


def write_atomically(path: Path, text: str) -> None:
    """A reader (a parked spare polling for the file) sees nothing or all of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def pin_bridge_mac(bridge: str) -> str:
    """Fix a host bridge's MAC at what it is now; returns it.

    A Linux bridge whose MAC was never set takes the lowest MAC of its ports, so plugging an
    instance in (or removing one) can change the host's MAC on that network. Every
    neighbour that cached the old one then sends into the void; an XDP balancer keeps doing
    so (it forwards without the kernel's neighbour state machine, so a STALE entry is
    never probed again) and the host loses every flow through it. Setting the MAC, even to
    its current value, stops the bridge from following its ports (NET_ADDR_SET), as LXD
    and Docker do for theirs. Done once per bridge before the first port: it also flushes
    the host's neighbour entries on the bridge (NETDEV_CHANGEADDR), which it re-learns."""
    mac = json.loads(_ip("-j", "link", "show", "dev", bridge).stdout)[0]["address"]
    _ip("link", "set", "dev", bridge, "address", mac)
    return mac


def daemon_argv(inst: Instance, python: str, park: dict | None = None) -> list[str]:
    """The instance's daemon command line, its project file written first (a parked spare
    gets a template to wait with instead): the same under every runtime."""
    module = {"balancer": ["zfast.cli", "up"], "router": ["zfast.routing.router"]}.get(
        inst.spec.kind, ["zfast.cli", "up"])
    argv = [python, "-m", *module, "-c", str(inst.config_path)]
    if park is None:
        write_atomically(inst.config_path, yaml.safe_dump(inst.spec.config, sort_keys=False))
    else:
        inst.config_path.unlink(missing_ok=True)
        template = inst.spec.state_dir / "template.yaml"
        template.write_text(yaml.safe_dump(park, sort_keys=False))
        argv += ["--park", str(template)]
    return argv


class NetnsRuntime(Runtime):
    def __init__(self, prefix: str):
        self.prefix = prefix   # namespaces are <prefix>-<instance name>

    def netns_of(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _host_ifname(self, spec: InstanceSpec, i: int) -> str:
        return f"{spec.name[:10]}h{i}"[:15]

    def create(self, spec: InstanceSpec, group: str | None = None) -> Instance:
        ns = self.netns_of(spec.name)
        _ip("netns", "add", ns)
        hosts = []
        try:
            _ip("-n", ns, "link", "set", "lo", "up")
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}=1"], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.default.accept_dad=0"], check=True)
            for i, link in enumerate(spec.links):
                host = self._host_ifname(spec, i)
                hosts.append(host)
                _ip("link", "del", host, check=False)  # a leftover of a crashed instance
                _ip("link", "add", host, "type", "veth", "peer", "name", link.ifname, "netns", ns)
                _ip("link", "set", host, "master", link.bridge)
                _ip("link", "set", host, "up")
                _ip("-n", ns, "link", "set", link.ifname, "up")
            self._add_addresses(ns, spec.links)
            for dst, via in spec.routes:
                _ip("-n", ns, "route", "replace", dst, "via", via)
        except Exception:
            for host in hosts:
                _ip("link", "del", host, check=False)
            _ip("netns", "del", ns, check=False)
            raise
        cg = Cgroup(f"{group}/{spec.name}" if group else spec.name)
        cg.create()
        cg.set_limits(spec.cpu, spec.memory)
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        return Instance(spec, ns, cg, host_ifnames=hosts)

    @staticmethod
    def _add_addresses(ns: str, links: list[Link]) -> None:
        for link in links:
            for cidr in link.addresses:
                extra = ["nodad"] if ":" in cidr else []
                _ip("-n", ns, "addr", "add", cidr, "dev", link.ifname, *extra)

    def assign(self, inst: Instance, links: list[Link], macs: dict[str, str] | None = None) -> None:
        for ifname, mac in (macs or {}).items():
            _ip("-n", inst.netns, "link", "set", "dev", ifname, "address", mac, check=False)
        self._add_addresses(inst.netns, links)

    def macs(self, inst: Instance) -> dict[str, str]:
        out = _ip("-n", inst.netns, "-j", "link", "show", check=False)
        try:
            return {link["ifname"]: link["address"] for link in json.loads(out.stdout or "[]")
                    if link["ifname"] in {want.ifname for want in inst.spec.links}}
        except (ValueError, KeyError):
            return {}

    def start(self, inst: Instance, park: dict | None = None) -> None:
        argv = daemon_argv(inst, sys.executable, park)
        log = open(inst.spec.state_dir / "daemon.log", "ab")
        inst.log_from = log.tell()
        inst.proc = subprocess.Popen(["ip", "netns", "exec", inst.netns, *argv],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        inst.cgroup.add(inst.proc.pid)  # `ip netns exec` execs: the daemon keeps this pid
        inst.started = time.time()

    def stop(self, inst: Instance, keep_dataplane: bool = False, timeout: float = 15.0) -> None:
        if inst.proc is None or inst.proc.poll() is not None:
            return
        inst.proc.send_signal(signal.SIGUSR1 if keep_dataplane else signal.SIGTERM)
        try:
            inst.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            inst.proc.kill()
            inst.proc.wait()

    def destroy(self, inst: Instance) -> None:
        if inst.proc is not None and inst.proc.poll() is None:
            try:
                os.killpg(inst.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            inst.proc.wait()
        try:
            down(inst.spec.state_dir)   # its pinned maps
        except Exception:
            pass
        node = (inst.spec.config.get("node") or {}).get("name")
        if node:                        # a parked spare's maps (no daemon state to say so)
            pins.remove_pins(pin_dir(node))
        # Whatever still runs in the namespace (a router's HAProxy has a session of its own)
        pids = _ip("netns", "pids", inst.netns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for host in inst.host_ifnames:
            _ip("link", "del", host, check=False)
        _ip("netns", "del", inst.netns, check=False)
        inst.cgroup.destroy()

    def usage(self, inst: Instance) -> dict:
        try:
            used, limit = inst.cgroup.memory()
            return {"cpu_ns": inst.cgroup.cpu_ns(), "memory": used, "memory_limit": limit}
        except (OSError, ValueError):
            return {"cpu_ns": 0, "memory": 0, "memory_limit": 0}

    def boost(self, inst: Instance, cpu: float | None) -> None:
        inst.cgroup.set_limits(inst.spec.cpu if cpu is None else cpu, inst.spec.memory)

    def resize(self, inst: Instance, cpu: float, memory: int) -> None:
        inst.cgroup.set_limits(cpu, memory)
        inst.spec.cpu, inst.spec.memory = cpu, memory
