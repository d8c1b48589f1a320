"""An LXD daemon of our own, and the instance image built from Debian's packages.

No systemd and no image server here (docs/operations.md, "LXD"): the daemon is started by
hand (``lxd --group root`` with its own ``LXD_DIR``, ``lxd waitready``), preseeded with a
``dir`` storage pool and a default profile holding the root disk, and no managed network
(instances plug into the project's own bridges). The image is a ``mmdebstrap`` rootfs of
Debian's packages, cached under ``IMAGE_CACHE`` by a hash of everything that goes into it,
and imported into each daemon. zfast itself is not in the image: the runtime bind-mounts
this checkout and its venv into every instance, so a change to zfast needs no new image.

    python -m zfast.lab.lxd install          # apt: lxd, mmdebstrap (idempotent)
    python -m zfast.lab.lxd image            # build (or find) the cached image
    python -m zfast.lab.lxd up  DIR ADDR     # a daemon in DIR on ADDR (127.0.0.2:8443)
    python -m zfast.lab.lxd down DIR         # its instances, the daemon, DIR: all gone
    python -m zfast.lab.lxd cluster-up BASE [N]   # N daemons (3) under BASE, one cluster
    python -m zfast.lab.lxd cluster-down BASE     # its instances, daemons, dirs: all gone

A cluster (``Cluster``) is N such daemons on this machine, m1..mN, each on its own loopback
address (127.0.0.2, 127.0.0.3, ...) and in the host's network namespace, so an instance on
any member plugs into the same host bridges; a member can be lost (SIGKILL, with its
containers) and restored (started again in its LXD_DIR: it rejoins as itself).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from zfast.core.lxd import LxdClient, LxdError, alive
from zfast.core.lxdimage import (  # noqa: F401 -- the lab's names for them, as before
    APT_PACKAGES,
    IMAGE_CACHE,
    IMAGE_PACKAGES,
    Image,
    build_image,
    image_key,
    install,
    missing_packages,
    prune_images,
    say,
)

# ---- the daemon ---------------------------------------------------------------------------

# In a mount namespace of the daemon's own: a sysfs of its network namespace over /sys,
# with the host's cgroup and bpf mounts moved onto it; then the command.
NETNS_SYSFS = """T=$(mktemp -d /tmp/zfast-lxd-sysfs.XXXXXX)
mkdir "$T/cgroup" "$T/bpf"
mount --rbind /sys/fs/cgroup "$T/cgroup"
mount --rbind /sys/fs/bpf "$T/bpf"
mount -t sysfs sysfs /sys
mount --move "$T/cgroup" /sys/fs/cgroup
mount --move "$T/bpf" /sys/fs/bpf
rmdir "$T/cgroup" "$T/bpf" "$T"
exec "$@"
"""


def pool_seed(driver: str = "dir", size: str = "4GiB") -> dict:
    """The storage pool "default": `dir`, or `btrfs` on a loop file of that size."""
    return {"name": "default", "driver": driver,
            **({"config": {"size": size}} if driver == "btrfs" else {})}


PROFILE_SEED = {"name": "default", "devices": {
    "root": {"type": "disk", "path": "/", "pool": "default"}}}


class Daemon:
    """One LXD daemon: its own LXD_DIR and address, started and stopped by us."""

    def __init__(self, lxd_dir: Path | str, address: str = "127.0.0.2:8443", driver: str = "dir",
                 pool_size: str = "4GiB"):
        self.dir = Path(lxd_dir)
        self.address = address
        # `dir` unpacks the whole image for every instance (~5 s for its 400 MB here);
        # `btrfs` (a loop file in LXD_DIR, btrfs-progs) unpacks it once and snapshots it
        self.driver = driver
        self.pool_size = pool_size
        self.proc: subprocess.Popen | None = None
        # a named network namespace to run in (None: ours): its containers' host ends go
        # there, onto that namespace's bridges
        self.netns: str | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "unix.socket"

    @property
    def env(self) -> dict:
        return dict(os.environ, LXD_DIR=str(self.dir))

    def client(self, timeout: float = 30.0) -> LxdClient:
        return LxdClient(self.socket, timeout)

    def lxc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["lxc", *args], capture_output=True, text=True, env=self.env,
                              check=check)

    def up(self, timeout: float = 60.0) -> None:
        """Started and preseeded (a daemon already running in this dir is reused)."""
        self.start(timeout)
        self.preseed()

    def start(self, timeout: float = 60.0) -> None:
        """Running and answering (one already running in this dir is reused): a new
        ``LXD_DIR`` is an empty daemon, an old one the daemon it was (a cluster member
        started again rejoins as itself)."""
        install(APT_PACKAGES + (("btrfs-progs",) if self.driver == "btrfs" else ()))
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.socket.exists() and self.running() and self._ready(1)):
            log = open(self.dir / "daemon.log", "ab")
            self.proc = subprocess.Popen([*self._enter(daemon=True), "lxd", "--group", "root", "--logfile",
                                          str(self.dir / "lxd.log")], env=self.env,
                                         stdout=log, stderr=log, start_new_session=True)
            log.close()
            if not self._ready(timeout):
                tail = (self.dir / "lxd.log").read_text(errors="replace")[-2000:] \
                    if (self.dir / "lxd.log").exists() else ""
                self.down()
                raise RuntimeError(f"lxd in {self.dir} did not become ready in {timeout} s: {tail}")

    def _enter(self, daemon: bool = False) -> list[str]:
        """The command prefix that runs in the daemon's network namespace. The daemon also
        needs a sysfs of that namespace: LXD looks for a NIC's parent bridge in
        /sys/class/net, and a sysfs shows the namespace that mounted it (as ``ip netns
        exec`` does, but keeping the cgroup and bpf mounts that LXC needs)."""
        if not self.netns:
            return []
        enter = ["nsenter", f"--net=/run/netns/{self.netns}"]
        if daemon:
            enter += ["unshare", "--mount", "--propagation", "slave",
                      "sh", "-ec", NETNS_SYSFS, "lxd-in-netns"]
        return enter

    def _ready(self, timeout: float) -> bool:
        out = subprocess.run(["lxd", "waitready", f"--timeout={max(1, int(timeout))}"],
                             env=self.env, capture_output=True)
        return out.returncode == 0

    def preseed(self) -> None:
        """The address, a `dir` pool and a default profile with its root disk (no network:
        ``lxd init --auto`` would want a managed bridge and fails to choose a subnet)."""
        c = self.client()
        if c.get("/1.0")["config"].get("core.https_address") == self.address and \
                any(p.endswith("/default") for p in c.get("/1.0/storage-pools")):
            return
        self.init({"config": {"core.https_address": self.address},
                   "storage_pools": [pool_seed(self.driver, self.pool_size)],
                   "profiles": [PROFILE_SEED]})

    def init(self, seed: dict) -> None:
        """``lxd init --preseed`` with this document."""
        # in its namespace: a join's client side reaches the members' addresses itself
        out = subprocess.run([*self._enter(), "lxd", "init", "--preseed"],
                             input=yaml.safe_dump(seed), text=True, env=self.env,
                             capture_output=True)
        if out.returncode != 0:
            raise RuntimeError(f"lxd init --preseed in {self.dir}: {out.stderr.strip()}")

    def import_image(self, img: Image) -> str:
        """The image in this daemon under its alias (imported once); the alias."""
        c = self.client()
        try:
            c.get(f"/1.0/images/aliases/{img.alias}")
            return img.alias
        except LxdError:
            pass
        self.lxc("image", "import", str(img.metadata), str(img.rootfs), "--alias", img.alias)
        return img.alias

    def down(self) -> None:
        """Its instances (forced), the daemon (killed), its containers' cgroups, its mounts,
        its directory: gone."""
        names = self.container_names()
        if self.socket.exists():
            try:
                c = self.client()
                for url in c.get("/1.0/instances"):
                    name = url.rsplit("/", 1)[-1]
                    try:
                        c.put(f"/1.0/instances/{name}/state", {"action": "stop", "force": True})
                    except LxdError:
                        pass
                    c.delete(f"/1.0/instances/{name}")
            except (OSError, LxdError):
                pass
        self._kill()
        self._kill_containers()         # what a dead daemon could not stop
        remove_cgroups(names)           # what LXC leaves of a container killed under it
        if not _lxd_running():          # LXC's shared one, when no other LXD needs it
            remove_cgroups([], pivot=True)
        self._umount_under(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    def container_names(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.dir / "containers").iterdir())
        except OSError:
            return []

    def crash(self) -> None:
        """The daemon and its containers killed (SIGKILL), nothing cleaned up: a member
        lost, not shut down. ``down`` still removes what is left."""
        self._kill(signal.SIGKILL)
        self._kill_containers()

    def _monitors(self) -> dict[int, str]:
        """Each running container's `[lxc monitor]` of this daemon: its pid, its name."""
        prefix = f"[lxc monitor] {self.dir}/containers "
        out = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(prefix):
                out[int(p.name)] = cmd[len(prefix):].strip()
        return out

    def _kill_containers(self) -> None:
        """Every container of this daemon: its init (SIGKILL ends its pid namespace, so all
        in it), then its monitor."""
        monitors = self._monitors()
        for mon in monitors:
            try:
                children = Path(f"/proc/{mon}/task/{mon}/children").read_text().split()
            except OSError:
                children = []
            for pid in [*map(int, children), mon]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in monitors) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pids(self) -> set[int]:
        """Every lxd of this dir, ours or one an earlier run started: its environment
        says LXD_DIR."""
        pids = set()
        if self.proc is not None and self.proc.poll() is None:
            pids.add(self.proc.pid)
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                if (p / "comm").read_text().strip() != "lxd":
                    continue
                env = (p / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"LXD_DIR={self.dir}".encode() in env and alive(int(p.name)):
                pids.add(int(p.name))
        return pids

    def running(self) -> bool:
        return bool(self.pids())

    def _kill(self, sig: int = signal.SIGTERM) -> None:
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = {pid for pid in pids if alive(pid)}
            time.sleep(0.1)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    @staticmethod
    def _umount_under(path: Path) -> None:
        root = str(path.resolve())
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m == root or m.startswith(root + "/")),
                        key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)


def _lxd_running() -> bool:
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().strip() == "lxd" and alive(int(p.name)):
                return True
        except OSError:
            pass
    return False


def remove_cgroups(names: list[str], root: Path = Path("/sys/fs/cgroup"),
                   pivot: bool = False) -> list[Path]:
    """The empty cgroups LXC made for these containers (``lxc.payload.NAME``,
    ``lxc.monitor.NAME``, and the ``NAME-<n>`` it picks when one is still there), in every
    hierarchy: a container killed with its monitor leaves them, and the next container of
    that name would get ``-1``. A group with a process in it stays (rmdir refuses)."""
    wanted = {f"lxc.{kind}.{n}" for kind in ("payload", "monitor") for n in names}
    if pivot:
        wanted.add("lxc.pivot")     # where LXC moves its processes while it cleans up
    removed = []
    tops = [root] + [p for p in root.iterdir() if p.is_dir() and not p.name.startswith("lxc.")] \
        if root.is_dir() else []
    for top in tops:
        try:
            entries = list(top.iterdir())
        except OSError:
            continue
        for group in entries:
            base = group.name.rsplit("-", 1)
            if not (group.name in wanted or (len(base) == 2 and base[1].isdigit()
                                             and base[0] in wanted)):
                continue
            for dirpath, _, _ in sorted(os.walk(group), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            if not group.exists():
                removed.append(group)
    return removed


# ---- a cluster on this machine ------------------------------------------------------------

# cluster.offline_threshold, the lowest LXD takes: its validator wants more than its 10 s
# heartbeat granularity (5.0.2: "Value must be greater than '10'"; the docs' "minimum 10"
# is off by one). LXD's default is 20 s. Until a lost member is marked Offline the
# scheduler still places new instances (no target) on it, and they fail, and a call about
# one of its instances stalls (10 s each here, then "Missing event connection"), so the
# lab wants it noticed as soon as LXD can.
OFFLINE_THRESHOLD_S = 11
CLUSTER_CONFIG = {
    "cluster.offline_threshold": str(OFFLINE_THRESHOLD_S),
    # the image on every member, not LXD's default 3: a member that lost the only copies
    # would leave the others unable to make an instance
    "cluster.images_minimal_replica": "-1",
}


def bootstrap_seed(name: str, address: str, driver: str = "dir", pool_size: str = "4GiB") -> dict:
    """The first member's preseed: the address, the pool, the default profile, clustering
    on. Not ``cluster.offline_threshold``: 5.0.2 drops the connection of a config PUT with
    it on a daemon not yet clustered (the preseed fails with EOF); set after, with PATCH."""
    return {"config": {"core.https_address": address},
            "storage_pools": [pool_seed(driver, pool_size)],
            "profiles": [PROFILE_SEED],
            "cluster": {"server_name": name, "enabled": True}}


def member_config(driver: str = "dir", pool_size: str = "4GiB") -> list[dict]:
    """What a joining member gives of the pool's member-specific keys: ``source`` empty
    (a dir under its own LXD_DIR, or a loop file there) and, for btrfs, the loop file's
    size (else 30 GiB)."""
    keys = {"source": ""} | ({"size": pool_size} if driver == "btrfs" else {})
    return [{"entity": "storage-pool", "name": "default", "key": k, "value": v}
            for k, v in keys.items()]


def join_seed(name: str, address: str, token: str, driver: str = "dir",
              pool_size: str = "4GiB") -> dict:
    """A joining member's preseed: its name and address, the token, its pool's keys (its
    ``core.https_address`` becomes ``server_address``)."""
    return {"cluster": {"enabled": True, "server_name": name, "server_address": address,
                        "cluster_token": token,
                        "member_config": member_config(driver, pool_size)}}


def join_token(meta: dict) -> str:
    """The join token, as ``lxc cluster add`` prints it, from the metadata of the token
    operation that POST /1.0/cluster/members starts: base64 of its JSON."""
    doc = {"server_name": meta["serverName"], "fingerprint": meta["fingerprint"],
           "addresses": meta["addresses"], "secret": meta["secret"]}
    if meta.get("expiresAt"):
        doc["expires_at"] = meta["expiresAt"]
    return base64.b64encode(json.dumps(doc).encode()).decode()


class Cluster:
    """``size`` LXD daemons on this machine, one cluster: m1..mN, each a ``Daemon`` with
    its own LXD_DIR under ``base`` and its address 127.0.0.(1+i):port, all in the host's
    network namespace (an instance on any member plugs into the same host bridges)."""

    def __init__(self, base: Path | str, size: int = 3, port: int = 8443, driver: str = "dir",
                 pool_size: str = "4GiB", netns: str | None = None):
        self.base = Path(base)
        self.driver, self.pool_size = driver, pool_size
        self.daemons = {f"m{i}": Daemon(self.base / f"m{i}", f"127.0.0.{1 + i}:{port}",
                                        driver, pool_size) for i in range(1, size + 1)}
        self.netns = netns
        self.image: Image | None = None
        self.timings: dict[str, float] = {}

    @property
    def netns(self) -> str | None:
        """The named network namespace every member runs in (None: ours); set before up."""
        return self._netns

    @netns.setter
    def netns(self, name: str | None) -> None:
        self._netns = name
        for d in self.daemons.values():
            d.netns = name

    @classmethod
    def found(cls, base: Path | str, port: int = 8443) -> Cluster:
        """The cluster whose members' dirs are under ``base`` (as many as there are)."""
        names = [p.name for p in Path(base).glob("m*") if p.name[1:].isdigit()]
        return cls(base, max((int(n[1:]) for n in names), default=0), port)

    # -- the members

    def socket_of(self, name: str) -> Path:
        return self.daemons[name].socket

    def sockets(self) -> dict[str, Path]:
        return {name: d.socket for name, d in self.daemons.items()}

    def live(self) -> list[str]:
        """The members whose daemon runs (what this machine sees, not the cluster)."""
        return [name for name, d in self.daemons.items() if d.running()]

    def client(self, via: str | None = None, timeout: float = 30.0) -> LxdClient:
        """A client of member ``via``, or of the first live one."""
        if via is None:
            live = self.live()
            if not live:
                raise LxdError(f"no member of the cluster in {self.base} runs")
            via = live[0]
        return self.daemons[via].client(timeout)

    def members(self, via: str | None = None, timeout: float = 10.0) -> list[dict]:
        """The cluster's members as one member sees them: server_name, status (Online,
        Offline, Evacuated, ...), url, roles (database-leader, ...), message."""
        return [{k: m.get(k) for k in ("server_name", "status", "url", "roles", "message")}
                for m in self.client(via, timeout).get("/1.0/cluster/members?recursion=1")]

    def _is_member(self, name: str) -> bool:
        d = self.daemons[name]
        info = d.client(10).get("/1.0/cluster")
        return bool(info.get("enabled")) and info.get("server_name") == name

    # -- up

    def up(self, timeout: float = 60.0, image: Image | None = None,
           import_image: bool = True) -> Image | None:
        """Every member started and in the cluster, the cluster's config set, the image
        imported and on every member; what is up already is reused (a member's dir that
        holds a daemon's state is started again and rejoins as itself). Its timings in
        ``self.timings``."""
        t0 = time.monotonic()
        first = next(iter(self.daemons))
        for name, d in self.daemons.items():
            t = time.monotonic()
            d.start(timeout)
            if not self._is_member(name):
                if name == first:
                    d.init(bootstrap_seed(name, d.address, self.driver, self.pool_size))
                else:
                    d.init(join_seed(name, d.address, self._token(first, name),
                                     self.driver, self.pool_size))
            self.timings[f"{name}_s"] = round(time.monotonic() - t, 2)
        self._configure(first)
        if import_image:        # (not: a user of the cluster imports its own, e.g. the core)
            t = time.monotonic()
            self.image = image or build_image()
            self.timings["image_build_s"] = round(time.monotonic() - t, 2)
            t = time.monotonic()
            self._import_everywhere(self.image)
            self.timings["image_import_s"] = round(time.monotonic() - t, 2)
        for name in self.daemons:
            self.wait_status(name, "Online", timeout)
        self.timings["up_s"] = round(time.monotonic() - t0, 2)
        return self.image

    def _configure(self, via: str) -> None:
        """CLUSTER_CONFIG set through member ``via``, once every member is in, until every
        member says so: a member that joined after it was set keeps LXD's defaults (in
        5.0.2 its own view of a member's status uses a 20 s threshold) until a change
        of the cluster's config notifies it, or it restarts. A PATCH of the same values
        notifies them too."""
        def stale() -> list[str]:
            return [name for name, d in self.daemons.items()
                    if any(d.client(10).get("/1.0")["config"].get(k) != v
                           for k, v in CLUSTER_CONFIG.items())]
        if stale():
            self.daemons[via].client().patch("/1.0", {"config": CLUSTER_CONFIG})
            if missing := stale():
                raise RuntimeError(f"{', '.join(missing)} do not have {CLUSTER_CONFIG}")

    def _token(self, via: str, name: str) -> str:
        """A join token for ``name``, asked of member ``via``: an earlier token for that
        name cancelled, and a member of that name whose dir is new (its state gone)
        removed from the cluster first, or the cluster would refuse the name."""
        c = self.daemons[via].client()
        ops = c.get("/1.0/operations?recursion=1") or {}
        for op in ops.get("running", []):
            if op.get("class") == "token" and (op.get("metadata") or {}).get("serverName") == name:
                c.delete(f"/1.0/operations/{op['id']}")
        if any(m["server_name"] == name for m in self.members(via)):
            c.delete(f"/1.0/cluster/members/{name}?force=1")
        op = c.request("POST", "/1.0/cluster/members", {"server_name": name}, wait=False)
        return join_token(op["metadata"])

    def _import_everywhere(self, img: Image) -> None:
        """The image imported once (through the first member); with
        cluster.images_minimal_replica -1 LXD copies it to every member before the import
        returns. A member that has no copy (it joined after the import) gets one by a new
        import."""
        first = next(iter(self.daemons))
        d = self.daemons[first]
        d.import_image(img)
        c = d.client()
        fp = c.get(f"/1.0/images/aliases/{img.alias}")["target"]
        if not all((m.dir / "images" / fp).exists() for m in self.daemons.values()):
            c.delete(f"/1.0/images/{fp}")
            d.import_image(img)
        missing = [name for name, m in self.daemons.items() if not (m.dir / "images" / fp).exists()]
        if missing:
            raise RuntimeError(f"image {img.alias} not on {', '.join(missing)} after its import")

    # -- a lost member, and back

    def lose(self, name: str) -> None:
        """Member ``name`` lost, not shut down: its daemon and its containers SIGKILLed."""
        self.daemons[name].crash()

    def restore(self, name: str, timeout: float = 60.0) -> float:
        """Its daemon started again in its LXD_DIR (it rejoins as the same member) and the
        cluster showing it Online; the seconds that took."""
        t = time.monotonic()
        self.daemons[name].start(timeout)
        self.wait_status(name, "Online", max(1.0, timeout - (time.monotonic() - t)))
        return time.monotonic() - t

    def wait_status(self, name: str, status: str, timeout: float = 60.0,
                    via: str | None = None) -> float:
        """Until the cluster says member ``name`` is ``status`` (asked through ``via``, or
        the first live member other than ``name``); the seconds it took. A call that does
        not answer in 5 s (no quorum) counts as not yet."""
        t = time.monotonic()
        deadline = t + timeout
        seen = None
        while True:
            ask = via or next((m for m in self.live() if m != name), None) or \
                next(iter(self.live()), None)
            if ask is not None:
                try:
                    seen = {m["server_name"]: m["status"] for m in self.members(ask, timeout=5)}
                except (OSError, LxdError) as e:
                    seen = {"error": str(e)}
                if seen.get(name) == status:
                    return time.monotonic() - t
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not {status} in {timeout} s (via {ask}: {seen})")
            time.sleep(0.1)

    # -- down

    def down(self, timeout: float = 30.0) -> None:
        """Every instance deleted (forced), every member's daemon killed, its containers,
        cgroups, mounts (and a btrfs pool's loop device) and its dir gone, and ``base`` if
        that leaves it empty.

        Instances go first, each through its own member, while the cluster can still
        write (an instance of a member whose daemon is gone is skipped: a call routed to
        it stalls; its container dies with the rest; with no majority of the daemons
        running there is no quorum, and nothing is asked). Then every daemon is SIGKILLed
        before any is cleaned up: a clustered daemon's SIGTERM hands over its database
        role and waits for the others (10-26 s here once they are gone), and one left
        without quorum answers nothing. The cgroups a killed container left are removed
        last, by every member's container names: an instance is deleted through the
        cluster (its dir gone) when its member's ``down`` would look for them."""
        names = sorted({n for d in self.daemons.values() for n in d.container_names()})
        live = set(self.live())
        if 2 * len(live) > len(self.daemons):     # a quorum: else every call would stall
            try:
                for inst in self.client(timeout=10).get("/1.0/instances?recursion=1"):
                    if inst.get("location") not in live:
                        continue
                    c = self.daemons[inst["location"]].client(timeout)
                    name = inst["name"]
                    try:
                        c.put(f"/1.0/instances/{name}/state", {"action": "stop", "force": True})
                    except LxdError:
                        pass        # not running
                    try:
                        c.delete(f"/1.0/instances/{name}")
                    except LxdError as e:
                        say(f"delete {name} on {inst['location']}: {e}")
            except (OSError, LxdError) as e:
                say(f"instances of the cluster in {self.base} not deleted: {e}")
        for d in self.daemons.values():
            d.crash()
        for d in self.daemons.values():
            d.down()
        remove_cgroups(names)
        try:
            self.base.rmdir()
        except OSError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zfast.lab.lxd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install")
    sub.add_parser("image")
    up = sub.add_parser("up")
    up.add_argument("dir")
    up.add_argument("address", nargs="?", default="127.0.0.2:8443")
    down = sub.add_parser("down")
    down.add_argument("dir")
    cup = sub.add_parser("cluster-up")
    cup.add_argument("base")
    cup.add_argument("size", nargs="?", type=int, default=3)
    cup.add_argument("--port", type=int, default=8443)
    cup.add_argument("--driver", choices=("dir", "btrfs"), default="dir")
    cdown = sub.add_parser("cluster-down")
    cdown.add_argument("base")
    args = ap.parse_args(argv)
    if args.cmd == "install":
        print(json.dumps({"installed": install()}))
    elif args.cmd == "image":
        t = time.monotonic()
        img = build_image()
        print(json.dumps({"alias": img.alias, "rootfs": str(img.rootfs),
                          "seconds": round(time.monotonic() - t, 1)}))
    elif args.cmd == "up":
        d = Daemon(args.dir, args.address)
        d.up()
        d.import_image(build_image())
        d.proc = None   # leave it running
    elif args.cmd == "down":
        Daemon(args.dir).down()
    elif args.cmd == "cluster-up":
        cluster = Cluster(args.base, args.size, args.port, args.driver)
        img = cluster.up()
        for d in cluster.daemons.values():
            d.proc = None   # leave them running
        print(json.dumps({"alias": img.alias, "members": cluster.members(),
                          "sockets": {k: str(v) for k, v in cluster.sockets().items()},
                          "timings": cluster.timings}))
    elif args.cmd == "cluster-down":
        Cluster.found(args.base).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
