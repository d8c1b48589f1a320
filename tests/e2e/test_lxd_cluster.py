"""A three-member LXD cluster on this machine: an instance placed on each member, a member
lost (its daemon and containers SIGKILLed) and noticed, the others still serving, the member
restored without its instance coming back on its own, and nothing left at the end.

Fails (never skips) where LXD cannot run: a CI without it would test nothing."""

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.kit.lxd import lxc_cgroups, lxd_pids
from zfast.core.lxd import LxdError
from zfast.lab import lxd

PORT = 28443                # not the runtime test's 18443, nor LXD's 8443
DRIVER = "btrfs"            # a loop file per member: mounts and loop devices to clean up
PREFIX = "zflc-"            # our containers (the runtime test's are zfl-...)
# the cluster marks a member Offline once it missed heartbeats for the threshold; asked
# through the leader that is the threshold after the last heartbeat it got (< threshold
# after the loss), through another member up to one more heartbeat round later
LEADER_SLACK_S, OTHER_SLACK_S = 10, 20


@pytest.fixture
def cluster(need_root):
    base = Path(f"/tmp/zfast-lxdc-e2e-{uuid.uuid4().hex[:8]}")
    cl = lxd.Cluster(base, 3, PORT, driver=DRIVER)
    timings = {"driver": DRIVER}
    try:
        lxd.install()
        t = time.monotonic()
        cl.up()
        timings["cluster_up_s"] = round(time.monotonic() - t, 2)
        timings.update({f"up.{k}": v for k, v in cl.timings.items()})
        yield cl, timings
    finally:
        dirs = [d.dir for d in cl.daemons.values()]
        t = time.monotonic()
        cl.down()
        timings["down_s"] = round(time.monotonic() - t, 2)
        print("LXD cluster timings:", json.dumps(timings), file=sys.stderr)
        assert not base.exists(), f"{base} left behind"
        for d in dirs:
            assert not lxd_pids(d), f"an lxd daemon of {d} left running"
        assert str(base) not in Path("/proc/self/mounts").read_text(), "mounts left"
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(base) not in loops, f"a loop device left: {loops}"
        assert not lxc_cgroups(PREFIX), f"cgroups left: {lxc_cgroups(PREFIX)}"
        monitors = subprocess.run(["pgrep", "-af", "lxc monitor"], capture_output=True,
                                  text=True).stdout
        assert str(base) not in monitors, f"a container's monitor left: {monitors}"


def launch(cl: lxd.Cluster, name: str, target: str, via: str = "m1") -> float:
    """A container of the image on member ``target`` (asked through ``via``), started; the
    seconds it took."""
    t = time.monotonic()
    c = cl.client(via)
    c.post(f"/1.0/instances?target={target}", {
        "name": name, "type": "container", "source": {"type": "image", "alias": cl.image.alias},
        "config": {"security.privileged": "true", "boot.autostart": "false"}})
    c.put(f"/1.0/instances/{name}/state", {"action": "start"})
    return round(time.monotonic() - t, 2)


def instances(cl: lxd.Cluster, via: str) -> dict[str, tuple[str, str]]:
    return {i["name"]: (i["location"], i["status"])
            for i in cl.client(via).get("/1.0/instances?recursion=1")}


def test_a_member_lost_is_noticed_and_restored_without_its_instance(cluster):
    cl, timings = cluster
    members = cl.members()
    assert [(m["server_name"], m["status"], m["url"]) for m in members] == [
        (f"m{i}", "Online", f"https://127.0.0.{1 + i}:{PORT}") for i in (1, 2, 3)]
    assert "database-leader" in members[0]["roles"]
    config = cl.client("m2").get("/1.0")["config"]
    assert config["cluster.offline_threshold"] == str(lxd.OFFLINE_THRESHOLD_S)
    assert config["core.https_address"] == f"127.0.0.3:{PORT}"
    assert set(cl.sockets()) == {"m1", "m2", "m3"}
    assert cl.socket_of("m3") == cl.base / "m3" / "unix.socket"

    # one container on each member, placed by target, running where it was placed
    for i in (1, 2, 3):
        timings[f"launch_m{i}_s"] = launch(cl, f"{PREFIX}c{i}", f"m{i}")
    assert instances(cl, "m1") == {f"{PREFIX}c{i}": (f"m{i}", "Running") for i in (1, 2, 3)}
    for i in (1, 2, 3):   # the image was usable on each member: HAProxy in it
        rc, out, err = cl.client(f"m{i}").exec(f"{PREFIX}c{i}", ["haproxy", "-v"])
        assert rc == 0 and out.startswith("HAProxy version 2."), (rc, out, err)
    lost_init = cl.client("m2").get(f"/1.0/instances/{PREFIX}c2/state")["pid"]

    # m2 lost: the cluster says Offline within the threshold (+ a heartbeat round)
    t = time.monotonic()
    cl.lose("m2")
    assert not lxd_pids(cl.daemons["m2"].dir)
    assert not Path(f"/proc/{lost_init}").exists() or \
        Path(f"/proc/{lost_init}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    cl.wait_status("m2", "Offline", lxd.OFFLINE_THRESHOLD_S + 30, via="m1")
    timings["offline_via_leader_s"] = round(time.monotonic() - t, 2)
    cl.wait_status("m2", "Offline", lxd.OFFLINE_THRESHOLD_S + 30, via="m3")
    timings["offline_via_m3_s"] = round(time.monotonic() - t, 2)
    assert timings["offline_via_leader_s"] <= lxd.OFFLINE_THRESHOLD_S + LEADER_SLACK_S
    assert timings["offline_via_m3_s"] <= lxd.OFFLINE_THRESHOLD_S + OTHER_SLACK_S
    assert [m["status"] for m in cl.members("m3")] == ["Online", "Offline", "Online"]

    # the other two still answer: the list (the lost one's instance in Error), a new
    # container on m3; a call routed to the lost member fails (after a stall), not hangs
    for via in ("m1", "m3"):
        t = time.monotonic()
        seen = instances(cl, via)
        timings[f"list_via_{via}_s"] = round(time.monotonic() - t, 2)
        assert seen[f"{PREFIX}c2"] == ("m2", "Error")
        assert seen[f"{PREFIX}c1"] == ("m1", "Running") and seen[f"{PREFIX}c3"] == ("m3", "Running")
    timings["launch_m3_while_m2_lost_s"] = launch(cl, f"{PREFIX}n3", "m3", via="m3")
    assert instances(cl, "m1")[f"{PREFIX}n3"] == ("m3", "Running")
    t = time.monotonic()
    with pytest.raises(LxdError):
        cl.client("m1").get(f"/1.0/instances/{PREFIX}c2/state")
    timings["call_routed_to_lost_member_s"] = round(time.monotonic() - t, 2)

    # m2 back, Online, as itself: its container there and not running (autostart off)
    timings["restore_s"] = round(cl.restore("m2"), 2)
    assert [m["status"] for m in cl.members("m2")] == ["Online"] * 3
    seen = instances(cl, "m2")
    assert seen[f"{PREFIX}c2"] == ("m2", "Stopped"), seen
    assert {k: v for k, v in seen.items() if k != f"{PREFIX}c2"} == {
        f"{PREFIX}c1": ("m1", "Running"), f"{PREFIX}c3": ("m3", "Running"),
        f"{PREFIX}n3": ("m3", "Running")}
    time.sleep(2)           # nothing starts it a moment later either
    assert cl.client("m1").get(f"/1.0/instances/{PREFIX}c2/state")["status"] == "Stopped"
