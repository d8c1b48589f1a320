"""The LXD instance runtime: each instance a privileged LXD container.

The same interface as ``NetnsRuntime`` (zfast/core/runtime.py), over LXD's REST API on its
unix socket with plain ``http.client`` (no dependency: pylxd is on the pip index and in
Debian, 2.2.10 there, but a dozen calls need no client library, and the unit tests check
the exact requests). A container:

- boots the image's init (tini) on ``create``; its NICs are ``nictype=bridged`` into the
  project's host bridges, with the host ends named as NetnsRuntime names them; addresses,
  routes and forwarding are set inside by one ``exec``;
- has ``security.privileged`` (BPF programs and pins), ``limits.cpu.allowance`` (a hard
  CFS quota over a 10 ms period where it can: ``cpu_allowance``) and ``limits.memory``,
  both changed live (resize, boost) with a PATCH;
- sees the instance's state directory, this zfast checkout (with its venv), the bpffs of
  the pinned maps and the program cache bind-mounted at the same paths, so its daemon runs the host's zfast, writes daemon.log where
  ``last_words`` reads it, and a parked spare's instance.yaml appears where it polls.

``start`` runs the daemon with ``exec`` (detached: setsid) under a shell that waits for it
and writes its exit status into the state dir; both their host pids (the pid namespace's
NSpid map) make ``inst.proc`` a ``ContainerProcess`` (``poll``, ``returncode``, ``pid``)
and ``inst.cgroup`` is the container's own cgroup, read-only: the observer and the
resizer, which read those directly, work as with a namespace.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from zfast.core.cgroups import ROOT as CGROUP_ROOT
from zfast.core.cgroups import Cgroup
from zfast.core.lxdapi import OP_TIMEOUT_S, LxdClient, LxdError  # noqa: F401 -- theirs, here too
from zfast.core.lxdcluster import ClusterView
from zfast.core.lxdimage import build_image
from zfast.core.runtime import (
    Instance,
    InstanceSpec,
    Link,
    Runtime,
    daemon_argv,
)
from zfast.dataplane import pins
from zfast.dataplane.progcache import cache_dir
from zfast.node.daemon import down
from zfast.paths import BPFFS, pin_dir

REPO = Path(__file__).resolve().parents[2]     # this checkout: bind-mounted into instances
DELETE_TIMEOUT_S = 10.0   # a stop or delete that a down member cannot answer


class ContainerProcess:
    """A daemon in a container, seen from the host as a ``subprocess.Popen`` is (what the
    observer asks: ``poll``, ``returncode``, ``pid``): it runs under a shell that waits
    for it and writes its exit status to ``daemon.exit`` in the (bind-mounted) state dir."""

    def __init__(self, pid: int | None, wrapper: int | None, exit_file: Path):
        self.pid = pid                  # the daemon's host pid
        self.wrapper = wrapper          # the shell's host pid
        self.exit_file = exit_file
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.wrapper and alive(self.wrapper) and self.pid and alive(self.pid):
            return None
        deadline = time.monotonic() + 0.2     # the shell writes it as the daemon ends
        while True:
            try:
                self.returncode = int(self.exit_file.read_text().split()[0])
                return self.returncode
            except (OSError, ValueError, IndexError):
                if not (self.wrapper and alive(self.wrapper)) or time.monotonic() > deadline:
                    self.returncode = -signal.SIGKILL   # its container (or shell) went with it
                    return self.returncode
                time.sleep(0.01)


class ContainerCgroup(Cgroup):
    """A container's own cgroup on the host, for reading (CPU used, throttling, memory: the
    scaling and repair controllers' samples). LXD owns it: its limits go through the API."""

    def __init__(self, paths: dict[str, Path], root: Path = CGROUP_ROOT):
        super().__init__("-", root)
        self.paths = paths

    @classmethod
    def of(cls, pid: int, root: Path = CGROUP_ROOT) -> ContainerCgroup | None:
        """The cgroup of process ``pid`` (the container's init), v2 or v1."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        groups = {}
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for ctl in controllers.split(",") if controllers else [""]:
                groups[ctl] = path.lstrip("/")
        if (root / "cgroup.controllers").exists():
            return cls({c: root / groups.get("", "") for c in ("cpu", "memory")}, root)
        if not all(c in groups for c in ("cpu", "cpuacct", "memory")):
            return None
        return cls({c: root / c / groups[c] for c in ("cpu", "cpuacct", "memory")}, root)

    def create(self) -> None:
        pass

    def set_limits(self, cpu: float, memory: int) -> None:
        raise NotImplementedError("an LXD container's limits are set through LXD")

    def add(self, pid: int) -> None:
        pass

    def destroy(self) -> None:
        pass


@dataclass
class LxdInstance(Instance):
    container: str = ""
    init: int | None = None          # the host pid of its init

    @property
    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


def alive(pid: int) -> bool:
    """pid runs (exists and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def cpu_allowance(cpu: float) -> str:
    """``cpu`` CPUs as LXD's hard CFS quota, whole milliseconds (LXD's syntax) over the
    shortest period that gives them: 10 ms as NetnsRuntime's (cgroups.PERIOD_US: a
    throttled daemon stalls 10 ms at most, never a heartbeat), else 20, 50, 100 ms.
    LXD's default period, 100 ms, would let a throttled daemon stall for most of it."""
    for period in (10, 20, 50, 100):
        quota = cpu * period
        if round(quota) >= 1 and abs(quota - round(quota)) < 1e-6:
            return f"{round(quota)}ms/{period}ms"
    return f"{max(1, round(cpu * 100))}ms/100ms"


class LxdRuntime(Runtime):
    def __init__(self, prefix: str, socket_path: Path | str | tuple | list, image: str | None,
                 pool: str = "default", repo: Path = REPO, python: str | None = None,
                 shared: tuple[Path, ...] | None = None, core_dir: Path | None = None):
        self.prefix = prefix.replace("_", "-")   # containers are <prefix>-<instance>-<tag>
        self.client = LxdClient(socket_path)
        self.image = image            # an alias in the daemon; None: zfast's, imported at open
        self.pool = pool              # the root disks' (no profile: nothing of ours to remove)
        self.repo = Path(repo)
        # the host's interpreter (the venv's, over /usr/bin/python3: the image's is the same)
        self.python = python or sys.executable
        # host directories every instance shares, at the same paths: the bpffs of the pinned
        # maps (a node's pins outlive its container, as its namespace's do) and the program
        # cache (the core compiles into it, instances load from it)
        self.last_create: dict = {}
        self.shared = tuple(Path(p) for p in ((BPFFS, cache_dir()) if shared is None else shared))
        # the core's state dir: the instances' own dirs under it, and what they share (the
        # pair's key, the store the routers and balancers follow)
        self.core_dir = Path(core_dir) if core_dir else None
        self.imported: str | None = None     # the image alias open() imported (close removes it)
        self.orphans: dict[str, str | None] = {}   # containers not yet deleted: their member
        self.cluster = ClusterView(self.client, self.prefix, lambda *a, **k: self.log(*a, **k))

    # ---- the daemon, the image, what an earlier core left -------------------------------

    def open(self) -> None:
        """The daemon answers, the pool and the image exist (zfast's is imported when the
        file names none), and no container of an earlier core of this project is left."""
        self.client.get("/1.0")
        try:
            self.client.get(f"/1.0/storage-pools/{quote(self.pool)}")
        except LxdError as err:
            raise LxdError(f"core.runtime.pool: LXD has no storage pool {self.pool!r} ({err})") from None
        if self.image is None:
            self.image, self.imported = self._import_zfast_image()
        else:
            try:
                self.client.get(f"/1.0/images/aliases/{quote(self.image)}")
            except LxdError:
                raise LxdError(f"core.runtime.image: LXD has no image {self.image!r}") from None
        for name, member in self.containers().items():
            self.log("repair", action="leftover removed", container=name, member=member)
            self._delete(name, member)

    def _import_zfast_image(self) -> tuple[str, str | None]:
        """zfast's instance image (built from Debian's packages when the cache has none:
        zfast/core/lxdimage.py) in the daemon: (its alias, the alias when we imported it)."""
        img = build_image()
        try:
            self.client.get(f"/1.0/images/aliases/{quote(img.alias)}")
            return img.alias, None
        except LxdError:
            pass
        env = dict(os.environ, LXD_DIR=str(Path(self.client.socket_path).parent))
        out = subprocess.run(["lxc", "image", "import", str(img.metadata), str(img.rootfs),
                              "--alias", img.alias], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise LxdError(f"lxc image import: {out.stderr.strip()}")
        self.log("repair", action="image imported", image=img.alias)
        return img.alias, img.alias

    def close(self) -> None:
        """Every container of this core gone (an orphan on a member still down is said,
        never waited for), then the image it imported."""
        self.housekeeping()
        for name, member in self.containers().items():
            self._delete(name, member)
        if self.imported:
            try:
                fingerprint = self.client.get(
                    f"/1.0/images/aliases/{quote(self.imported)}")["target"]
                self.client.delete(f"/1.0/images/{fingerprint}")
            except (OSError, LxdError) as err:
                self.log("error", what="image removal", image=self.imported, error=str(err))
            self.imported = None

    def containers(self) -> dict[str, str | None]:
        """This core's containers: their members."""
        return {c["name"]: c.get("location") or None for c in self.cluster.containers()}

    # ---- placement (zfast/core/lxdcluster.py) ------------------------------------------

    def better_placed(self, inst: Instance) -> bool:
        return self.cluster.better_placed(inst)

    # ---- an instance --------------------------------------------------------------------

    def _devices(self, spec: InstanceSpec, hosts: list[str]) -> dict:
        devices = {"root": {"type": "disk", "path": "/", "pool": self.pool}}
        for link, host in zip(spec.links, hosts):
            devices[link.ifname] = {"type": "nic", "nictype": "bridged", "parent": link.bridge,
                                    "name": link.ifname, "host_name": host}
        state = self.core_dir if self.core_dir and spec.state_dir.is_relative_to(self.core_dir) \
            else spec.state_dir
        devices["zfast-state"] = {"type": "disk", "source": str(state), "path": str(state)}
        devices["zfast-code"] = {"type": "disk", "source": str(self.repo), "path": str(self.repo),
                                 "readonly": "true"}
        for i, path in enumerate(p for p in self.shared if p.is_dir()):
            devices[f"zfast-share{i}"] = {"type": "disk", "source": str(path), "path": str(path)}
        return devices

    def create(self, spec: InstanceSpec, group: str | None = None) -> Instance:
        """The container made on the member placement chooses, booted (its init only) and
        its links configured; ``group`` has no meaning here (each container is its own
        cgroup under LXD's). A successor never takes its predecessor's names: that one
        may still exist on a member that is down."""
        tag = secrets.token_hex(2)
        name = f"{self.prefix}-{spec.name}-{tag}".replace("_", "-")
        hosts = [f"{spec.name[:8]}{tag}{i}"[:15] for i in range(len(spec.links))]
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        target = self.cluster.target(spec)
        self.client.post("/1.0/instances" + (f"?target={quote(target)}" if target else ""), {
            "name": name, "type": "container",
            "source": {"type": "image", "alias": self.image},
            "profiles": [],
            "config": {"security.privileged": "true",
                       "boot.autostart": "false",   # a member back from the dead starts none
                       "limits.cpu.allowance": cpu_allowance(spec.cpu),
                       "limits.memory": str(int(spec.memory)),
                       "user.zfast.core": self.prefix,
                       "user.zfast.kind": spec.kind},
            "devices": self._devices(spec, hosts)})
        inst = LxdInstance(spec, netns=name, cgroup=None, container=name, host_ifnames=hosts,
                           member=target)
        try:
            t1 = time.monotonic()
            self.client.put(f"{self._url(name)}/state", {"action": "start", "timeout": 30})
            t2 = time.monotonic()
            inst.init = (self.client.get(f"{self._url(name)}/state") or {}).get("pid")
            inst.cgroup = ContainerCgroup.of(inst.init) if inst.init else None
            script = ["ip link set lo up",
                      "echo 1 > /proc/sys/net/ipv4/ip_forward",
                      "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
                      "echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad"]
            script += [f"ip link set {shlex.quote(link.ifname)} up" for link in spec.links]
            script += self._address_cmds(spec.links)
            script += [f"ip route replace {shlex.quote(dst)} via {shlex.quote(via)}"
                       for dst, via in spec.routes]
            self._sh(inst, script)
        except Exception:
            self.destroy(inst)
            raise
        # where a create's time goes: the instance's rootfs (a `dir` pool unpacks the whole
        # image), its boot, the links' set-up
        self.last_create = {"create_s": round(t1 - t0, 2), "boot_s": round(t2 - t1, 2),
                            "setup_s": round(time.monotonic() - t2, 2), "member": target}
        return inst

    def _url(self, inst_or_name) -> str:
        name = inst_or_name.container if isinstance(inst_or_name, LxdInstance) else inst_or_name
        return f"/1.0/instances/{quote(name)}"

    @staticmethod
    def _address_cmds(links: list[Link]) -> list[str]:
        return [f"ip addr add {shlex.quote(cidr)} dev {shlex.quote(link.ifname)}"
                + (" nodad" if ":" in cidr else "")
                for link in links for cidr in link.addresses]

    def _sh(self, inst: LxdInstance, lines: list[str]) -> str:
        rc, out, err = self.client.exec(inst.container, ["/bin/sh", "-ec", "\n".join(lines)])
        if rc != 0:
            raise LxdError(f"{inst.container}: {err.strip() or out.strip() or f'exit {rc}'}")
        return out

    def assign(self, inst: Instance, links: list[Link], macs: dict[str, str] | None = None) -> None:
        lines = [f"ip link set dev {shlex.quote(ifname)} address {shlex.quote(mac)} || true"
                 for ifname, mac in (macs or {}).items()]
        self._sh(inst, lines + self._address_cmds(links))

    def macs(self, inst: Instance) -> dict[str, str]:
        if not self.cluster.reachable(inst.member):
            return {}
        try:
            net = (self.client.get(f"{self._url(inst)}/state") or {}).get("network") or {}
        except (OSError, LxdError):
            return {}
        wanted = {link.ifname for link in inst.spec.links}
        return {ifname: n["hwaddr"] for ifname, n in net.items()
                if ifname in wanted and n.get("hwaddr")}

    def start(self, inst: Instance, park: dict | None = None) -> None:
        argv = daemon_argv(inst, self.python, park)
        sd = inst.spec.state_dir
        log, pids, exit_file = sd / "daemon.log", sd / "daemon.pids", sd / "daemon.exit"
        inst.log_from = log.stat().st_size if log.exists() else 0
        pids.unlink(missing_ok=True)
        exit_file.unlink(missing_ok=True)
        # a shell that starts the daemon, says both pids, waits and writes the exit status
        wrapper = ('"$@" & echo $$ $! > "$P.tmp" && mv "$P.tmp" "$P"; wait $!; '
                   'echo $? > "$E"')
        cmd = (f"cd / && P={shlex.quote(str(pids))} E={shlex.quote(str(exit_file))} "
               f"setsid sh -c {shlex.quote(wrapper)} zfast-daemon {shlex.join(argv)} "
               f">>{shlex.quote(str(log))} 2>&1 </dev/null &")
        self._sh(inst, [cmd])
        deadline = time.monotonic() + 10
        while not pids.exists():
            if time.monotonic() > deadline:
                raise LxdError(f"{inst.container}: the daemon's shell did not start")
            time.sleep(0.01)
        shell, daemon = (int(x) for x in pids.read_text().split())
        host = self._host_pids(inst, {shell, daemon})
        inst.proc = ContainerProcess(host.get(daemon), host.get(shell), exit_file)
        inst.started = time.time()

    def _host_pids(self, inst: LxdInstance, pids: set[int]) -> dict[int, int]:
        """The host's pids of the container's processes ``pids`` (the last NSpid of a
        process in the container's pid namespace)."""
        init = inst.init or (self.client.get(f"{self._url(inst)}/state") or {}).get("pid")
        found = {}
        try:
            ns = os.readlink(f"/proc/{init}/ns/pid")
        except (OSError, TypeError):
            return found
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if os.readlink(p / "ns" / "pid") != ns:
                    continue
                for line in (p / "status").read_text().splitlines():
                    if line.startswith("NSpid:") and int(line.split()[-1]) in pids:
                        found[int(line.split()[-1])] = int(p.name)
            except (OSError, ValueError):
                continue
        return found

    def stop(self, inst: Instance, keep_dataplane: bool = False, timeout: float = 15.0) -> None:
        pid = inst.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGUSR1 if keep_dataplane else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            while alive(pid) and time.monotonic() < deadline + 5:
                time.sleep(0.05)

    def destroy(self, inst: Instance) -> None:
        """The container stopped (forced: whatever runs in it dies) and deleted; its host
        veths go with it; its daemon's pinned maps removed. A container whose member is
        down stays an orphan, deleted by ``housekeeping`` once the member is back."""
        daemon = inst.proc.pid if isinstance(inst.proc, ContainerProcess) else None
        if daemon and alive(daemon):      # dead before its maps go (even if LXD cannot stop it)
            try:
                os.kill(daemon, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 5
            while alive(daemon) and time.monotonic() < deadline:
                time.sleep(0.02)
        self._delete(inst.container, inst.member)
        # its pinned maps, in the host's bpffs (shared): they outlive the container, as a
        # namespace's daemon's outlive it (NetnsRuntime.destroy does the same)
        if not (daemon and alive(daemon)):   # down() signals the pid its lock names: a
            try:                             # container's own, meaningless here while it runs
                down(inst.spec.state_dir)
            except Exception:
                pass
        node = (inst.spec.config.get("node") or {}).get("name")
        if node:
            pins.remove_pins(pin_dir(node))

    def _delete(self, name: str, member: str | None) -> bool:
        """Stopped (forced) and deleted (or gone already); an orphan when LXD cannot (its
        member is down)."""
        error = None if self.cluster.reachable(member) else f"member {member} unreachable"
        if error is None:
            try:
                try:
                    self.client.request("PUT", f"{self._url(name)}/state",
                                        {"action": "stop", "force": True}, timeout=DELETE_TIMEOUT_S)
                except LxdError as err:
                    if err.code == 404:
                        raise
                    # not running: deleted all the same
                self.client.request("DELETE", self._url(name), timeout=DELETE_TIMEOUT_S)
            except (OSError, LxdError) as err:
                if not (isinstance(err, LxdError) and err.code == 404):     # 404: gone
                    error = str(err)
        if error is None:
            self.orphans.pop(name, None)
            return True
        if name not in self.orphans:
            self.log("repair", action="orphaned", container=name, member=member, error=error)
        self.orphans[name] = member
        return False

    def housekeeping(self) -> None:
        """Orphans deleted once their member is online again: a member that returns must
        not keep (or, were it to start them, run) a second copy of an instance."""
        if not self.orphans:
            return
        try:
            online = self.cluster.online()
        except (OSError, LxdError):
            return
        for name, member in list(self.orphans.items()):
            if online is None or member in online:
                if self._delete(name, member):
                    self.log("repair", action="orphan removed", container=name, member=member)

    def host_pid(self, inst: Instance, pid: int | None) -> int | None:
        if pid is None or not isinstance(inst, LxdInstance):
            return None
        return self._host_pids(inst, {pid}).get(pid)

    def usage(self, inst: Instance) -> dict:
        """From the container's cgroup as NetnsRuntime's (memory: the working set, without
        inactive page cache), else from LXD's view of it."""
        if inst.cgroup is not None:
            try:
                used, limit = inst.cgroup.memory()
                return {"cpu_ns": inst.cgroup.cpu_ns(), "memory": used, "memory_limit": limit}
            except (OSError, ValueError):
                pass
        try:
            state = self.client.get(f"{self._url(inst)}/state") or {}
        except (OSError, LxdError):
            return {"cpu_ns": 0, "memory": 0, "memory_limit": 0}
        mem = state.get("memory") or {}
        return {"cpu_ns": int((state.get("cpu") or {}).get("usage") or 0),
                "memory": int(mem.get("usage") or 0),
                "memory_limit": int(mem.get("total") or inst.spec.memory)}

    def limits(self, inst: Instance) -> dict:
        """The container's limits as LXD holds them (config keys)."""
        cfg = (self.client.get(self._url(inst)) or {}).get("config") or {}
        return {k: v for k, v in cfg.items() if k.startswith("limits.")}

    def _set_limits(self, inst: Instance, cpu: float, memory: int) -> None:
        self.client.patch(self._url(inst), {"config": {
            "limits.cpu.allowance": cpu_allowance(cpu), "limits.memory": str(int(memory))}})

    def boost(self, inst: Instance, cpu: float | None) -> None:
        self._set_limits(inst, inst.spec.cpu if cpu is None else cpu, inst.spec.memory)

    def resize(self, inst: Instance, cpu: float, memory: int) -> None:
        self._set_limits(inst, cpu, memory)
        inst.spec.cpu, inst.spec.memory = cpu, memory
