"""The LXD runtime against a real LXD daemon of its own: an instance on a host bridge
answers there, its limits change live, and nothing the test made is left.

Fails (never skips) where LXD cannot run: a CI without it would test nothing."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.kit.lxd import kernel_limits, lxc_cgroups, lxd_pids
from zfast.api import ApiError, Client
from zfast.core.lxd import LxdRuntime
from zfast.core.runtime import InstanceSpec, Link
from zfast.lab import lxd
from zfast.paths import pin_dir

BRIDGE, PRIVATE = "zflxdbr0", "zflxdbr1"
HOST_CIDR, INST_ADDR = "10.250.7.1/24", "10.250.7.2"
PRIVATE_CIDR, INST_PRIVATE = "10.250.8.1/24", "10.250.8.2"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def balancer_project(state_dir: Path) -> dict:
    return {"project": "lxdlab",
            "node": {"name": "lxdlab-lb", "state_dir": str(state_dir),
                     "interfaces": [{"name": "eth0", "role": "public"},
                                    {"name": "eth1", "role": "private"}]},
            "datapath": {"flow_table": 4096, "max_services": 4, "max_backends": 8},
            "services": [{"name": "app", "vip": "10.250.7.100",
                          "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                          "backends": [{"address": "10.250.8.10", "weight": 1}]}]}


def wait_status(runtime, inst, timeout: float) -> dict:
    client = Client(inst.spec.state_dir)
    deadline = time.monotonic() + timeout
    while True:
        assert inst.pid is not None, f"the daemon exited: {runtime.last_words(inst)}"
        try:
            return client.get("/status")
        except ApiError:
            assert time.monotonic() < deadline, "the daemon did not answer"
            time.sleep(0.1)


@pytest.fixture(params=["dir", "btrfs"])
def daemon(request, need_root, tmp_path):
    """A daemon with a `dir` pool (the simplest) or a `btrfs` one (a loop file in LXD_DIR:
    an instance is a snapshot of the unpacked image, not a copy)."""
    timings = {"driver": request.param}
    lxd_dir = Path(f"/tmp/zfast-lxd-e2e-{uuid.uuid4().hex[:8]}")
    d = lxd.Daemon(lxd_dir, "127.0.0.2:18443", driver=request.param)
    for br in (BRIDGE, PRIVATE):
        _ip("link", "del", br, check=False)
    try:
        lxd.install()
        t = time.monotonic()
        d.up()
        timings["daemon_start_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        img = lxd.build_image()
        timings["image_build_s"] = round(time.monotonic() - t, 2)   # ~0 when cached
        t = time.monotonic()
        d.import_image(img)
        timings["image_import_s"] = round(time.monotonic() - t, 2)
        for br, cidr in ((BRIDGE, HOST_CIDR), (PRIVATE, PRIVATE_CIDR)):
            _ip("link", "add", br, "type", "bridge")
            _ip("addr", "add", cidr, "dev", br)
            _ip("link", "set", br, "up")
        yield d, img, timings
    finally:
        try:                  # what this test made, removed through the API first ...
            c = d.client()
            for url in c.get("/1.0/instances"):
                d.lxc("delete", "--force", url.rsplit("/", 1)[-1], check=False)
            for url in c.get("/1.0/images"):
                c.delete(url)
        except OSError:       # no daemon (it did not start, or a test killed it)
            pass
        d.down()              # ... then the daemon and its directory
        for br in (BRIDGE, PRIVATE):
            _ip("link", "del", br, check=False)
        print("LXD timings:", json.dumps(timings), file=sys.stderr)
        assert not lxd_dir.exists(), f"{lxd_dir} left behind"
        groups = lxc_cgroups("zfl-")
        assert not groups, f"cgroups left: {groups}"
        assert not lxd_pids(lxd_dir), "an lxd daemon left running"
        assert str(lxd_dir) not in Path("/proc/self/mounts").read_text(), "mounts left"
        assert _ip("link", "show", BRIDGE, check=False).returncode != 0
        assert _ip("link", "show", PRIVATE, check=False).returncode != 0
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(lxd_dir) not in loops, f"a loop device left: {loops}"


def test_an_lxd_instance_on_a_host_bridge_resized_live_and_removed(daemon, tmp_path):
    d, img, timings = daemon
    c = d.client()
    assert c.get("/1.0")["config"]["core.https_address"] == "127.0.0.2:18443"
    runtime = LxdRuntime("zfl", d.socket, img.alias)
    state_dir = tmp_path / "lb-e2e"
    spec = InstanceSpec(name="lb-e2e", kind="balancer",
                        links=[Link(BRIDGE, "eth0", [f"{INST_ADDR}/24"]),
                               Link(PRIVATE, "eth1", [f"{INST_PRIVATE}/24"])],
                        cpu=0.5, memory=256 << 20, state_dir=state_dir, config={})
    t = time.monotonic()
    inst = runtime.create(spec)
    timings["container_start_s"] = round(time.monotonic() - t, 2)
    timings.update(runtime.last_create)
    assert c.get(f"/1.0/instances/{inst.container}/state")["status"] == "Running"
    assert _ip("link", "show", inst.host_ifnames[0]).stdout.find(f"master {BRIDGE}") > 0

    # it answers on the bridge
    deadline = time.monotonic() + 10
    while subprocess.run(["ping", "-c1", "-W1", INST_ADDR], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"{INST_ADDR} does not answer on {BRIDGE}"
    macs = runtime.macs(inst)
    assert set(macs) == {"eth0", "eth1"}
    neigh = json.loads(_ip("-j", "neigh", "show", INST_ADDR, "dev", BRIDGE).stdout)
    assert neigh and neigh[0]["lladdr"] == macs["eth0"]

    # zfast runs inside from the bind-mounted checkout and venv: a daemon given no project
    # file refuses, and says why where last_words reads it
    rc, out, err = c.exec(inst.container, [sys.executable, "-c", "import zfast.cli, bcc"])
    assert rc == 0, err
    runtime.start(inst)
    assert inst.daemon_pid
    deadline = time.monotonic() + 20
    while inst.pid is not None:
        assert time.monotonic() < deadline, "the daemon did not refuse an empty project file"
        time.sleep(0.1)
    assert runtime.last_words(inst), "no last words in the bind-mounted daemon.log"
    assert inst.proc.poll() not in (None, 0), "a refusal's exit status, as its shell wrote it"

    # a balancer: its program compiled on the host into the program cache (as the core's
    # launcher does), loaded from it inside; its API socket in the bind-mounted state dir
    spec.config = balancer_project(state_dir)
    warm = state_dir / "warm.yaml"
    warm.write_text(yaml.safe_dump(spec.config))
    subprocess.run([sys.executable, "-m", "zfast.cli", "cache", "warm", "-c", str(warm)],
                   check=True, capture_output=True, timeout=600)
    t = time.monotonic()
    runtime.start(inst)
    status = wait_status(runtime, inst, 30)
    timings["balancer_answered_s"] = round(time.monotonic() - t, 2)
    assert status["node"] == "lxdlab-lb" and status["role"] == "solo"
    assert {i["name"] for i in status["interfaces"] if i.get("prog_id")} == {"eth0", "eth1"}
    runtime.stop(inst)
    assert inst.pid is None
    assert "stopped, interfaces detached" in runtime.last_words(inst)
    # again, killed this time: its pinned maps (in the host's bpffs) outlive it until destroy
    runtime.start(inst)
    wait_status(runtime, inst, 30)
    os.kill(inst.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while inst.pid is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert inst.proc.returncode == 128 + signal.SIGKILL
    assert any(pin_dir("lxdlab-lb").iterdir()), "a killed daemon's maps should stay pinned"

    # limits, live: LXD's config and the kernel's (the container's cgroup, read on the host)
    init_pid = c.get(f"/1.0/instances/{inst.container}/state")["pid"]

    assert runtime.limits(inst) == {"limits.cpu.allowance": "5ms/10ms",
                                    "limits.memory": str(256 << 20)}
    assert kernel_limits(init_pid) == (256 << 20, 0.5, 10_000)   # 10 ms periods
    runtime.resize(inst, 0.25, 128 << 20)
    assert runtime.limits(inst) == {"limits.cpu.allowance": "5ms/20ms",
                                    "limits.memory": str(128 << 20)}
    assert kernel_limits(init_pid) == (128 << 20, 0.25, 20_000)
    runtime.boost(inst, 1.0)
    assert runtime.limits(inst)["limits.cpu.allowance"] == "10ms/10ms"
    assert kernel_limits(init_pid) == (128 << 20, 1.0, 10_000)
    runtime.boost(inst, None)
    assert runtime.limits(inst)["limits.cpu.allowance"] == "5ms/20ms"
    state = c.get(f"/1.0/instances/{inst.container}/state")
    assert state["pid"] == init_pid, "a limit change restarted the container"
    use = runtime.usage(inst)              # from the container's cgroup, as the observer's
    assert use["cpu_ns"] > 0 and use["memory"] > 0, use
    assert use["memory_limit"] == 128 << 20
    periods, throttled = inst.cgroup.throttling()   # the resizer's and observer's reading
    assert periods > 0 and 0 <= throttled <= periods

    # gone, with its host veth
    runtime.stop(inst)
    runtime.destroy(inst)
    assert c.get("/1.0/instances") == []
    assert _ip("link", "show", inst.host_ifnames[0], check=False).returncode != 0
    assert not pin_dir("lxdlab-lb").exists(), "destroy left the daemon's pinned maps"
    assert [p.rsplit("/", 1)[-1] for p in c.get("/1.0/profiles")] == ["default"]
    managed = [n["name"] for n in c.request("GET", "/1.0/networks?recursion=1") if n["managed"]]
    assert managed == []

    # a successor's create: the image is unpacked in the pool now (btrfs snapshots it)
    t = time.monotonic()
    again = runtime.create(InstanceSpec(name="lb-e2e2", kind="balancer", links=[], cpu=0.5,
                                        memory=256 << 20, state_dir=tmp_path / "lb-e2e2"))
    timings["second_container_start_s"] = round(time.monotonic() - t, 2)
    runtime.destroy(again)
    assert c.get("/1.0/instances") == []


def test_a_crashed_daemon_takes_its_instances_with_it_and_leaves_nothing(daemon, tmp_path):
    """A member lost, not shut down: its daemon and its containers SIGKILLed. The
    instance is gone from its bridge, and `down` still removes everything."""
    d, img, timings = daemon
    runtime = LxdRuntime("zfl", d.socket, img.alias)
    inst = runtime.create(InstanceSpec(name="lb-crash", kind="balancer", links=[Link(
        BRIDGE, "eth0", [f"{INST_ADDR}/24"])], cpu=0.5, memory=256 << 20,
        state_dir=tmp_path / "lb-crash"))
    init_pid = d.client().get(f"/1.0/instances/{inst.container}/state")["pid"]
    assert subprocess.run(["ping", "-c1", "-W2", INST_ADDR], capture_output=True).returncode == 0
    d.crash()
    assert not Path(f"/proc/{init_pid}").exists() or \
        Path(f"/proc/{init_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert not lxd_pids(d.dir)
    assert subprocess.run(["ping", "-c1", "-W1", INST_ADDR], capture_output=True).returncode != 0
    deadline = time.monotonic() + 5          # its veth goes with its network namespace
    while _ip("link", "show", inst.host_ifnames[0], check=False).returncode == 0:
        assert time.monotonic() < deadline, "the crashed instance's veth is still there"
        time.sleep(0.1)
