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

import http.client
import json
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from zfast.core.cgroups import ROOT as CGROUP_ROOT
from zfast.core.cgroups import Cgroup
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
OP_TIMEOUT_S = 60


class LxdError(RuntimeError):
    def __init__(self, msg: str, code: int = 0):
        super().__init__(msg)
        self.code = code


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("lxd", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class LxdClient:
    """LXD's REST API on its unix socket: JSON in and out, async operations waited for."""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def raw(self, method: str, path: str, body: dict | None = None,
            timeout: float | None = None) -> tuple[int, bytes]:
        conn = _UnixConnection(self.socket_path, timeout or self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, body: dict | None = None, wait: bool = True,
                timeout: float | None = None):
        status, data = self.raw(method, path, body, timeout)
        try:
            doc = json.loads(data or b"{}")
        except ValueError:
            raise LxdError(f"{method} {path}: HTTP {status}, not JSON", status) from None
        if doc.get("type") == "error" or status >= 400:
            raise LxdError(f"{method} {path}: {doc.get('error') or status}",
                           doc.get("error_code") or status)
        if doc.get("type") == "async":
            return self.wait(doc["operation"]) if wait else doc["metadata"]
        return doc.get("metadata")

    def wait(self, operation: str, timeout: int = OP_TIMEOUT_S) -> dict:
        """The operation's end; raises when it failed."""
        op = self.request("GET", f"{operation}/wait?timeout={timeout}", timeout=timeout + 5)
        if op.get("status_code") != 200:
            raise LxdError(f"{operation}: {op.get('err') or op.get('status')}",
                           op.get("status_code") or 0)
        return op

    def get(self, path: str):
        return self.request("GET", path)

    def put(self, path: str, body: dict):
        return self.request("PUT", path, body)

    def patch(self, path: str, body: dict):
        return self.request("PATCH", path, body)

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def delete(self, path: str):
        return self.request("DELETE", path)

    def exec(self, name: str, command: list[str], env: dict | None = None) -> tuple[int, str, str]:
        """Run a command in the instance to its end: (exit status, stdout, stderr)."""
        op = self.post(f"/1.0/instances/{quote(name)}/exec",
                       {"command": command, "environment": env or {}, "interactive": False,
                        "wait-for-websocket": False, "record-output": True})
        meta = op.get("metadata") or {}
        out = []
        for fd in ("1", "2"):
            log = (meta.get("output") or {}).get(fd)
            if not log:
                out.append("")
                continue
            status, data = self.raw("GET", log)
            out.append(data.decode(errors="replace") if status == 200 else "")
            try:
                self.raw("DELETE", log)
            except OSError:
                pass
        return int(meta.get("return", -1)), out[0], out[1]


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
    def __init__(self, prefix: str, socket_path: Path | str, image: str,
                 profiles: tuple[str, ...] = ("default",), repo: Path = REPO,
                 python: str | None = None, shared: tuple[Path, ...] | None = None):
        self.prefix = prefix          # containers are <prefix>-<instance name>
        self.client = LxdClient(socket_path)
        self.image = image            # an alias in that daemon (zfast.lab.lxd imports it)
        self.profiles = list(profiles)
        self.repo = Path(repo)
        # the host's interpreter (the venv's, over /usr/bin/python3: the image's is the same)
        self.python = python or sys.executable
        # host directories every instance shares, at the same paths: the bpffs of the pinned
        # maps (a node's pins outlive its container, as its namespace's do) and the program
        # cache (the core compiles into it, instances load from it)
        self.last_create: dict = {}
        self.shared = tuple(Path(p) for p in ((BPFFS, cache_dir()) if shared is None else shared))

    def container_of(self, name: str) -> str:
        return f"{self.prefix}-{name}".replace("_", "-")

    @staticmethod
    def _host_ifname(spec: InstanceSpec, i: int) -> str:
        return f"{spec.name[:10]}h{i}"[:15]

    def _url(self, inst_or_name) -> str:
        name = inst_or_name.container if isinstance(inst_or_name, LxdInstance) else inst_or_name
        return f"/1.0/instances/{quote(name)}"

    def _devices(self, spec: InstanceSpec) -> dict:
        devices = {}
        for i, link in enumerate(spec.links):
            devices[link.ifname] = {"type": "nic", "nictype": "bridged", "parent": link.bridge,
                                    "name": link.ifname, "host_name": self._host_ifname(spec, i)}
        devices["zfast-state"] = {"type": "disk", "source": str(spec.state_dir),
                                  "path": str(spec.state_dir)}
        devices["zfast-code"] = {"type": "disk", "source": str(self.repo), "path": str(self.repo),
                                 "readonly": "true"}
        for i, path in enumerate(p for p in self.shared if p.is_dir()):
            devices[f"zfast-share{i}"] = {"type": "disk", "source": str(path), "path": str(path)}
        return devices

    def create(self, spec: InstanceSpec, group: str | None = None) -> Instance:
        """The container made, booted (its init only) and its links configured; ``group``
        has no meaning here (each container is its own cgroup under LXD's)."""
        name = self.container_of(spec.name)
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        self.client.post("/1.0/instances", {
            "name": name, "type": "container",
            "source": {"type": "image", "alias": self.image},
            "profiles": self.profiles,
            "config": {"security.privileged": "true",
                       "limits.cpu.allowance": cpu_allowance(spec.cpu),
                       "limits.memory": str(int(spec.memory)),
                       "user.zfast.kind": spec.kind},
            "devices": self._devices(spec)})
        inst = LxdInstance(spec, netns=name, cgroup=None, container=name,
                           host_ifnames=[self._host_ifname(spec, i) for i in range(len(spec.links))])
        try:
            t1 = time.monotonic()
            self.client.put(f"{self._url(name)}/state", {"action": "start", "timeout": 30})
            t2 = time.monotonic()
            init = (self.client.get(f"{self._url(name)}/state") or {}).get("pid")
            inst.cgroup = ContainerCgroup.of(init) if init else None
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
                            "setup_s": round(time.monotonic() - t2, 2)}
        return inst

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
        init = (self.client.get(f"{self._url(inst)}/state") or {}).get("pid")
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
        veths go with it; its daemon's pinned maps removed."""
        try:
            self.client.put(f"{self._url(inst)}/state", {"action": "stop", "force": True})
        except LxdError:
            pass      # not running (or gone)
        try:
            self.client.delete(self._url(inst))
        except LxdError as err:
            if err.code != 404:
                raise
        # its pinned maps, in the host's bpffs (shared): they outlive the container, as a
        # namespace's daemon's outlive it (NetnsRuntime.destroy does the same)
        try:
            down(inst.spec.state_dir)
        except Exception:
            pass
        node = (inst.spec.config.get("node") or {}).get("name")
        if node:
            pins.remove_pins(pin_dir(node))

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
