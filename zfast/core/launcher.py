"""Launching and removing the core service's instances, and its parked spare.

Every instance's cgroup sits under the core's own (``zfast/<prefix>``), whose cpuacct then
counts the whole core service, failed starts included. A balancer's program is compiled
into the program cache here first (``warm``), so that every instance starts from the cache;
a new instance may use the top of ``scale.cpu`` until it first answers (the start boost).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from zfast import config
from zfast.controllers.logger import LoggerController
from zfast.core.cgroups import Cgroup
from zfast.core.runtime import Instance, InstanceSpec, Runtime, pin_bridge_mac, write_atomically
from zfast.core.spare import PARKED
from zfast.dataplane.loader import is_cached
from zfast.paths import pin_dir

START_GRACE_S = 60.0       # a new daemon may take this long to answer first (BCC compiles)
CACHED_GRACE_S = 15.0      # ... or this long when its program is in the program cache
WARM_TIMEOUT_S = 600.0     # the core's own compile of the balancers' program (8 s here)
SPARE_GRACE_S = 10.0       # a parked spare has compiled already: it answers within a second


def haproxy_pid(inst: Instance) -> int | None:
    """A router's HAProxy master, from its pid file (None: no such file)."""
    try:
        return int((inst.spec.state_dir / "haproxy" / "haproxy.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def ensure_bridges(bridges: tuple[str, ...]) -> list[str]:
    """The host's bridges up (made when missing: their names are returned), each with its
    MAC pinned: plugging instances in must not change the host's MAC."""
    made = []
    for br in bridges:
        if subprocess.run(["ip", "link", "show", br], capture_output=True).returncode != 0:
            subprocess.run(["ip", "link", "add", br, "type", "bridge"], check=True)
            made.append(br)
        subprocess.run(["ip", "link", "set", br, "up"], check=True)
        pin_bridge_mac(br)
    return made


def cached(spec: InstanceSpec) -> bool:
    """Whether a balancer's start finds its program in the program cache."""
    if spec.kind != "balancer":
        return False
    try:
        project = config.parse(spec.config, f"<{spec.name}>")
        return is_cached(project.datapath, pin_dir(project.node.name))
    except Exception:        # a file the daemon will refuse: its own error says why
        return False


class Launcher:
    """The instances (by name), the spare, and how each one started."""

    def __init__(self, runtime: Runtime, prefix: str, state_dir: Path, events: LoggerController,
                 max_cpu: float):
        self.runtime = runtime
        self.prefix = prefix
        self.state_dir = Path(state_dir)
        self.events = events
        self.max_cpu = max_cpu            # the top of scale.cpu: a start's boost
        self.cgroup = Cgroup(prefix)      # the core's own: every instance's group under it
        self.instances: dict[str, Instance] = {}
        self.spare: Instance | None = None      # a parked daemon, compiled ahead (spare.py)
        self.boosted: set[str] = set()    # cold starts with more CPU until they answer
        self.grace: dict[str, float] = {}     # how long each may take to answer first

    def open(self) -> None:
        self.runtime.open()
        self.cgroup.create()
        if not self.cgroup.v2:      # v2 keeps processes out of inner groups
            self.cgroup.add(os.getpid())

    def close(self) -> None:
        """Every instance and the spare removed, what the runtime made, the core's cgroup."""
        self.drop_spare()
        for inst in list(self.instances.values()):
            self.runtime.stop(inst)
            self.runtime.destroy(inst)
        self.instances.clear()
        try:
            self.runtime.close()
        except Exception as err:        # the rest must still go
            self.events.log("error", what="runtime close", error=str(err))
        if not self.cgroup.v2:
            for controller in ("cpu", "cpuacct", "memory"):
                (self.cgroup.root / controller / "cgroup.procs").write_text(str(os.getpid()))
        self.cgroup.destroy()

    # ---- starts -------------------------------------------------------------------------

    def launch(self, spec: InstanceSpec, restarts: int = 0) -> Instance:
        self.warm(spec)
        inst = self.runtime.create(spec, group=self.prefix)
        inst.restarts = restarts
        self.runtime.start(inst)
        boost = self._boost_start(inst)
        self.instances[spec.name] = inst
        self.grace[spec.name] = CACHED_GRACE_S if cached(spec) else START_GRACE_S
        self.events.log("repair", instance=spec.name, action="started", pid=inst.pid,
                        restarts=restarts, start_cpu=boost or spec.cpu,
                        **({"member": inst.member} if inst.member else {}))
        return inst

    def _boost_start(self, inst: Instance) -> float | None:
        """A start (imports, the kernel's verifier, the maps filled, the flow dump: ~1.5 s
        of CPU) may use the top of scale.cpu until the daemon first answers, then its own
        quota: the CPU it costs is the same, spent sooner (a standby back in half the
        time). The boost it got, or None."""
        boost = self.max_cpu if self.max_cpu > inst.spec.cpu else None
        if boost:
            self.runtime.boost(inst, boost)
            self.boosted.add(inst.spec.name)
        else:
            self.runtime.boost(inst, None)      # its own size (a spare's was another)
        return boost

    def end_boost(self, name: str) -> None:
        inst = self.instances[name]
        self.boosted.discard(name)
        self.runtime.boost(inst, None)
        self.events.log("repair", instance=name, action="answered", cpu=inst.spec.cpu,
                        start_s=round(time.time() - inst.started, 2),
                        start_cpu_s=round(self.cpu_s(inst), 2))

    def cpu_s(self, inst: Instance) -> float:
        """CPU seconds the instance used as this instance (not a spare's compile before)."""
        return max(0, self.runtime.usage(inst)["cpu_ns"] - inst.cpu_ns_before) / 1e9

    def warm(self, spec: InstanceSpec) -> None:
        """Compile a balancer's program into the cache here, outside every instance, when
        it is not there: LLVM alone needs more memory (~180 MiB) than a small balancer
        has, and every instance (pair, spare, successors) then starts from the cache. A
        failure leaves the compile to the instance, as before (its error says why)."""
        if spec.kind != "balancer" or cached(spec):
            return
        path = self.state_dir / "warm.yaml"
        path.write_text(yaml.safe_dump(spec.config, sort_keys=False))
        out = subprocess.run([sys.executable, "-m", "zfast.cli", "cache", "warm", "-c", str(path),
                              "--json"], capture_output=True, text=True, timeout=WARM_TIMEOUT_S)
        if out.returncode == 0:
            self.events.log("cache", action="compiled", instance=spec.name, **json.loads(out.stdout))
        else:
            self.events.log("error", what="program cache warm-up", instance=spec.name,
                            error=(out.stderr.strip().splitlines() or ["?"])[-1])

    # ---- replacements -------------------------------------------------------------------

    def soft_stop(self, name: str) -> None:
        """A router's HAProxy soft stop (SIGUSR1): listeners closed, each keep-alive
        connection closed after its current response."""
        inst = self.instances[name]
        pid = self.runtime.host_pid(inst, haproxy_pid(inst))
        try:
            if pid:
                os.kill(pid, signal.SIGUSR1)
        except OSError:
            pass                                    # gone: nothing more to wait for

    def start_successor(self, name: str, spec: InstanceSpec, restarts: int, from_spare: bool) -> None:
        """Remove the instance, start its successor (from the spare: no compile, its
        MAC addresses kept)."""
        inst = self.instances[name]
        macs = self.runtime.macs(inst)
        self.runtime.destroy(inst)
        self.boosted.discard(name)
        try:
            if from_spare and self.spare_ready() and not self._beside_a_balancer(self.spare):
                self._activate_spare(spec, restarts, macs)
            else:
                self.launch(spec, restarts)
        except Exception as err:
            self.events.log("error", instance=name, error=f"cannot recreate: {err}")

    # ---- the spare ----------------------------------------------------------------------

    def _beside_a_balancer(self, sp: Instance) -> bool:
        """Whether the spare runs on the member of a balancer (the surviving peer): as its
        successor it would put the pair on one member, so a new instance goes elsewhere."""
        peer = next((i for i in self.instances.values() if sp.member
                     and i.member == sp.member and i.spec.kind == "balancer"), None)
        if peer is not None:
            self.events.log("repair", action="spare passed over", spare=sp.spec.name,
                            member=sp.member, beside=peer.spec.name)
        return peer is not None

    def move_misplaced_spare(self) -> None:
        """A spare sharing a member with a balancer while a member of the cluster has none
        (one came back): removed, so that the next is parked there."""
        sp = self.spare
        if sp is not None and self.runtime.better_placed(sp):
            self.events.log("repair", action="spare moved", spare=sp.spec.name, member=sp.member)
            self.drop_spare()

    def spare_ready(self) -> bool:
        sp = self.spare
        return bool(sp and sp.pid and (sp.spec.state_dir / PARKED).exists())

    def park_spare(self, spec: InstanceSpec) -> None:
        self.warm(spec)
        inst = self.runtime.create(spec, group=self.prefix)
        self.runtime.start(inst, park=spec.config)
        self.spare = inst

    def drop_spare(self) -> None:
        if self.spare is not None:
            self.runtime.destroy(self.spare)
            self.spare = None

    def _activate_spare(self, spec: InstanceSpec, restarts: int, macs: dict) -> Instance:
        """The spare becomes instance spec.name: its addresses, then its file (the parked
        daemon waits for that file)."""
        sp, self.spare = self.spare, None
        raw = copy.deepcopy(spec.config)
        raw["node"]["state_dir"] = str(sp.spec.state_dir)
        new = replace(spec, state_dir=sp.spec.state_dir, config=raw)
        self.runtime.assign(sp, new.links, macs)
        # the spare's own instance (a runtime's subclass, its container) under the new spec
        inst = replace(sp, spec=new, started=time.time(), restarts=restarts,
                       cpu_ns_before=self.runtime.usage(sp)["cpu_ns"])
        # the rest of its start (the maps filled, the attach, the flow dump) with the top
        # of scale.cpu, as a new instance's; its own size once it answers (end_boost)
        self._boost_start(inst)
        write_atomically(inst.config_path, yaml.safe_dump(raw, sort_keys=False))
        self.instances[spec.name] = inst
        self.grace[spec.name] = SPARE_GRACE_S
        self.events.log("repair", instance=spec.name, action="started from the spare",
                        spare=sp.spec.name, pid=inst.pid, restarts=restarts)
        return inst
