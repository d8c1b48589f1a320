"""What the LXD tests look at on the host: a daemon's processes, a container's limits as
the kernel holds them, the cgroups LXC leaves."""

from __future__ import annotations

from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def lxd_pids(lxd_dir: Path) -> list[int]:
    """The lxd processes of that LXD_DIR (their environment says it)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == "lxd" and \
                    f"LXD_DIR={lxd_dir}".encode() in (p / "environ").read_bytes().split(b"\0"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def lxc_cgroups(prefix: str) -> list[str]:
    """LXC's cgroups (lxc.payload.*, lxc.monitor.*) of containers named prefix*."""
    return [str(g) for top in [CGROUP, *CGROUP.iterdir()] if top.is_dir()
            for g in top.glob(f"lxc.*.{prefix}*")]


def kernel_limits(pid: int) -> tuple[int, float, int]:
    """(memory limit, CPUs, CFS period in µs) of host process pid's cgroup, v1 or v2."""
    groups = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for ctl in controllers.split(",") if controllers else [""]:
            groups[ctl] = path
    if "memory" in groups:      # cgroup v1
        mem = (CGROUP / f"memory{groups['memory']}" / "memory.limit_in_bytes").read_text()
        cpu = CGROUP / f"cpu{groups['cpu']}"
        quota, period = (int((cpu / f).read_text()) for f in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        return int(mem), quota / period, period
    base = CGROUP / groups[""].lstrip("/")
    quota, period = (base / "cpu.max").read_text().split()
    return int((base / "memory.max").read_text()), int(quota) / int(period), int(period)
