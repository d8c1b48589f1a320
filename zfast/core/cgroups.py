"""CPU and memory limits for an instance: cgroup v2 where the kernel offers it, else v1.

Both are driven through their files, nothing else: cpu.max / memory.max (v2),
cpu.cfs_quota_us / memory.limit_in_bytes (v1). Usage is read back the same way
(cpu usage in ns, memory in bytes) for the scaling and repair controllers.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000   # short CFS periods: a throttled daemon stalls 10 ms at most, never a heartbeat


def parse_size(text: str | int) -> int:
    """256Mi, 1Gi, 512M, 1048576 -> bytes."""
    if isinstance(text, int):
        return text
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


V1_CONTROLLERS = ("cpu", "cpuacct", "memory")
V2_CONTROLLERS = ("cpu", "memory")
NETNS_DIR = Path("/var/run/netns")


def hierarchy_problem(root: Path = ROOT) -> str | None:
    """Why instances cannot have their cgroups under root (None: they can). Asked before
    anything is made: `ip netns exec` mounts a fresh sysfs, whose /sys/fs/cgroup is an
    empty directory (neither cgroup.controllers nor cpu/, cpuacct/, memory/)."""
    if (root / "cgroup.controllers").exists():
        offered = (root / "cgroup.controllers").read_text().split()
        missing = [c for c in V2_CONTROLLERS if c not in offered]
        if missing:
            return f"cgroup v2 at {root} offers no {' and no '.join(missing)} controller"
        return None
    missing = [c for c in V1_CONTROLLERS if not (root / c / "cgroup.procs").exists()]
    if len(missing) == len(V1_CONTROLLERS):
        return (f"no cgroup hierarchy at {root} (is /sys a fresh sysfs, as under "
                f"`ip netns exec`? run zfast core up in the host's mount namespace, or enter "
                f"only the network namespace: nsenter --net={NETNS_DIR}/{_netns_name()})")
    if missing:
        return f"no {', '.join(missing)} cgroup controller at {root} (cgroup v1 mounts it there)"
    return None


def _netns_name(netns_dir: Path = NETNS_DIR) -> str:
    """The name this process's network namespace has under netns_dir (`ip netns identify`),
    else NAME."""
    try:
        me = os.stat("/proc/self/ns/net")
        for entry in sorted(netns_dir.iterdir()):
            st = entry.stat()
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return entry.name
    except OSError:
        pass
    return "NAME"


class Cgroup:
    """One instance's cgroup (created on demand, removed by destroy()).

    ``name`` may hold a slash: the core service puts its instances under a group of its
    own (zfast/<core>/<instance>), whose cpuacct usage then counts all of them, those
    already removed included (v1 charges every ancestor)."""

    def __init__(self, name: str, root: Path = ROOT):
        self.name = name
        self.root = root
        self.v2 = (root / "cgroup.controllers").exists()
        if self.v2:
            self.paths = {"cpu": root / "zfast" / name, "memory": root / "zfast" / name}
        else:
            self.paths = {c: root / c / "zfast" / name for c in ("cpu", "cpuacct", "memory")}

    def create(self) -> None:
        if self.v2:   # every group above the leaf hands the controllers down
            cur = self.root
            for part in (Path("zfast") / self.name).parts[:-1]:
                cur = cur / part
                cur.mkdir(exist_ok=True)
                (cur / "cgroup.subtree_control").write_text("+cpu +memory")
        for path in set(self.paths.values()):
            path.mkdir(parents=True, exist_ok=True)

    def set_limits(self, cpu: float, memory: int) -> None:
        quota = max(1000, int(cpu * PERIOD_US))
        if self.v2:
            (self.paths["cpu"] / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            (self.paths["memory"] / "memory.max").write_text(str(memory))
        else:
            (self.paths["cpu"] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.paths["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))
            (self.paths["memory"] / "memory.limit_in_bytes").write_text(str(memory))

    def add(self, pid: int) -> None:
        for path in set(self.paths.values()):
            (path / "cgroup.procs").write_text(str(pid))

    def cpu_ns(self) -> int:
        """CPU time used by the instance so far."""
        if self.v2:
            for line in (self.paths["cpu"] / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) * 1000
            return 0
        return int((self.paths["cpuacct"] / "cpuacct.usage").read_text())

    def throttling(self) -> tuple[int, int]:
        """(CFS periods, periods in which the quota ran out) so far."""
        stat = {}
        for line in (self.paths["cpu"] / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value or 0)
        return stat.get("nr_periods", 0), stat.get("nr_throttled", 0)

    def memory(self) -> tuple[int, int]:
        """(working set, limit) bytes. The working set leaves out inactive page cache (the
        kernel drops it before it would OOM-kill): counted, a daemon that read files looks
        near its limit when it is not (the measure kubelet and cAdvisor use)."""
        if self.v2:
            mem = self.paths["memory"]
            used = int((mem / "memory.current").read_text())
            limit = (mem / "memory.max").read_text().strip()
            inactive = self._stat(mem / "memory.stat", "inactive_file")
            return max(0, used - inactive), (1 << 62) if limit == "max" else int(limit)
        mem = self.paths["memory"]
        used = int((mem / "memory.usage_in_bytes").read_text())
        inactive = self._stat(mem / "memory.stat", "total_inactive_file")
        return max(0, used - inactive), int((mem / "memory.limit_in_bytes").read_text())

    @staticmethod
    def _stat(path: Path, key: str) -> int:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.paths["cpu"] / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def destroy(self) -> None:
        """Remove the cgroup (its processes must be gone: move stragglers to the root)."""
        for path in set(self.paths.values()):
            if not path.exists():
                continue
            top = next(p for p in path.parents if p.name == "zfast").parent
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (top / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            try:
                os.rmdir(path)
            except OSError:
                pass
