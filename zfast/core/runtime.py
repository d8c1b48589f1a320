"""The instance runtime: create, start, stop and destroy a balancer (or router) instance.

An instance is a network namespace with veth links into the host's bridges, a
cgroup with its CPU and memory limits, and a zfast daemon inside. `Runtime`
is the interface the repair and scaling controllers use; `NetnsRuntime` is
this host's implementation. Another (LXC/LXD, systemd-nspawn, systemd units
with slices) fits behind the same five methods: create, start, stop, destroy,
usage (and resize for the scaling controller).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from zfast.core.cgroups import Cgroup


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


@dataclass
class Instance:
    spec: InstanceSpec
    netns: str
    cgroup: Cgroup
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    @property
    def config_path(self) -> Path:
        return self.spec.state_dir / "instance.yaml"


class Runtime(ABC):
    @abstractmethod
    def create(self, spec: InstanceSpec) -> Instance: ...

    @abstractmethod
    def start(self, inst: Instance) -> None: ...

    @abstractmethod
    def stop(self, inst: Instance, keep_dataplane: bool = False, timeout: float = 15.0) -> None: ...

    @abstractmethod
    def destroy(self, inst: Instance) -> None: ...

    @abstractmethod
    def usage(self, inst: Instance) -> dict: ...

    @abstractmethod
    def resize(self, inst: Instance, cpu: float, memory: int) -> None: ...


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NetnsRuntime(Runtime):
    def __init__(self, prefix: str):
        self.prefix = prefix   # namespaces are <prefix>-<instance name>

    def netns_of(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def _host_ifname(self, spec: InstanceSpec, i: int) -> str:
        return f"{spec.name[:10]}h{i}"[:15]

    def create(self, spec: InstanceSpec) -> Instance:
        ns = self.netns_of(spec.name)
        _ip("netns", "add", ns)
        try:
            _ip("-n", ns, "link", "set", "lo", "up")
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}=1"], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.default.accept_dad=0"], check=True)
            for i, link in enumerate(spec.links):
                host = self._host_ifname(spec, i)
                _ip("link", "del", host, check=False)  # a leftover of a crashed instance
                _ip("link", "add", host, "type", "veth", "peer", "name", link.ifname, "netns", ns)
                _ip("link", "set", host, "master", link.bridge)
                _ip("link", "set", host, "up")
                # The bridge port receives the instance's XDP redirects: it needs NAPI (GRO).
                subprocess.run(["ethtool", "-K", host, "gro", "on"], capture_output=True)
                for cidr in link.addresses:
                    extra = ["nodad"] if ":" in cidr else []
                    _ip("-n", ns, "addr", "add", cidr, "dev", link.ifname, *extra)
                _ip("-n", ns, "link", "set", link.ifname, "up")
        except Exception:
            _ip("netns", "del", ns, check=False)
            raise
        cg = Cgroup(spec.name)
        cg.create()
        cg.set_limits(spec.cpu, spec.memory)
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        return Instance(spec, ns, cg)

    def start(self, inst: Instance) -> None:
        inst.config_path.write_text(yaml.safe_dump(inst.spec.config, sort_keys=False))
        log = open(inst.spec.state_dir / "daemon.log", "ab")
        inst.proc = subprocess.Popen(
            ["ip", "netns", "exec", inst.netns, sys.executable, "-m", "zfast.cli", "up",
             "-c", str(inst.config_path)],
            stdout=log, stderr=log, start_new_session=True)
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
        from zfast.node import down
        try:
            down(inst.spec.state_dir)   # its pinned maps
        except Exception:
            pass
        for i in range(len(inst.spec.links)):
            _ip("link", "del", self._host_ifname(inst.spec, i), check=False)
        _ip("netns", "del", inst.netns, check=False)
        inst.cgroup.destroy()

    def usage(self, inst: Instance) -> dict:
        try:
            used, limit = inst.cgroup.memory()
            return {"cpu_ns": inst.cgroup.cpu_ns(), "memory": used, "memory_limit": limit}
        except (OSError, ValueError):
            return {"cpu_ns": 0, "memory": 0, "memory_limit": 0}

    def resize(self, inst: Instance, cpu: float, memory: int) -> None:
        inst.cgroup.set_limits(cpu, memory)
        inst.spec.cpu, inst.spec.memory = cpu, memory
