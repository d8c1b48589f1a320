"""`zfast core up` over a real 3-member LXD cluster on this machine: each instance a
container, the pair kept apart, a lost member survived.

Three LXD daemons (their own LXD_DIR, addresses 127.0.0.2-4) in the core's "host"
namespace, so every member's containers plug into the same project bridges; the core is
given one socket per member. A client on the public bridge, two echo backends on the
private one, as in test_core.py.

- placement: the balancers and the parked spare on three different members, said by
  `zfast core status --json`;
- the member of the active balancer lost (its daemon and its containers SIGKILLed, not
  shut down): the standby takes over, the spare on the third member becomes the new
  standby, 30 TCP streams through the VIP survive, none moved; when the member returns,
  the lost balancer's container is deleted there, not started (no second copy);
- the scaling controller's CPU and memory decisions show in the containers' LXD limits and
  in their kernel cgroups, without a restart;
- `zfast core down` (SIGTERM) leaves no container, image or profile in the cluster.

Fails (never skips) where LXD cannot run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.kit.cli import zfast
from tests.e2e.kit.core import Core, core_service
from tests.e2e.kit.lxd import kernel_limits
from zfast.core.lxd import LxdClient, cpu_allowance
from zfast.lab import lxd
from zfast.lab.probe import Stream, streams_alive

PROJECT = "lxdcore"
STATE = Path("/run/zfast/test-core-lxd")
PUBLIC_VIP, PUBLIC_PORT = "10.236.0.10", 2222
BACKENDS = ("10.237.0.2", "10.237.0.3")
STREAMS = 30
PORT = 38443


def _config(sockets: list[str]) -> dict:
    return {
        "project": PROJECT,
        "services": [{"name": "app", "vip": "10.237.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                      "backends": [{"address": a} for a in BACKENDS]}],
        "public_ports": [{"port": PUBLIC_PORT, "proto": "tcp", "address": PUBLIC_VIP,
                          "service": "app", "target_port": 8080}],
        "datapath": {"max_services": 4, "max_backends": 16},
        "core": {"public": {"bridge": "zlpub0", "subnet": "10.236.0.0/24"},
                 "private": {"bridge": "zlpriv0", "subnet": "10.237.0.0/24",
                             "gateway": "10.237.0.254"},
                 # 512Mi: an idle container's use is under 30 % of it, so memory shrinks too
                 "balancer": {"cpu": 0.5, "memory": "512Mi", "flow_table": 65536,
                              "scale": {"cpu": [0.25, 1], "memory": ["128Mi", "1Gi"],
                                        "flow_table": [65536, 262144], "cooldown_s": 8}},
                 "runtime": {"kind": "lxd", "socket": sockets}},
    }


def _sockets(cluster: lxd.Cluster) -> list[str]:
    return [str(p) for p in cluster.sockets().values()]


def _ours(client: LxdClient) -> list[dict]:
    return [c for c in client.get("/1.0/instances?recursion=1")
            if (c.get("config") or {}).get("user.zfast.core") == f"zfc-{PROJECT}"]


@pytest.fixture(scope="module")
def core():
    assert os.geteuid() == 0, "the LXD core tests need root (LXD, namespaces, XDP)"
    base = Path(f"/tmp/zfast-lxd-core-{uuid.uuid4().hex[:6]}")
    cluster = lxd.Cluster(base, size=3, port=PORT, driver="btrfs")
    left: dict = {}
    timings: dict = {}

    def setup(topo, host):
        cluster.netns = host        # its daemons in the core's namespace, with its bridges

        def after_the_core():
            try:              # what the core left, asked before the cluster goes
                client = LxdClient(_sockets(cluster))
                left["containers"] = [c["name"] for c in client.get("/1.0/instances?recursion=1")]
                left["images"] = client.get("/1.0/images")
                left["profiles"] = [p for p in client.get("/1.0/profiles")
                                    if not p.endswith("/default")]
                left["networks"] = [n["name"] for n in client.get("/1.0/networks?recursion=1")
                                    if n.get("managed")]
            finally:
                cluster.down()
        topo.at_close(after_the_core)
        t = time.monotonic()
        cluster.up(import_image=False)     # the core imports zfast's image itself
        timings["cluster_up_s"] = round(time.monotonic() - t, 1)

    with core_service("zfcl", STATE, _config(_sockets(cluster)), BACKENDS, "10.236.0.100/24",
                      setup=setup) as c:
        t = time.monotonic()
        c.cluster = cluster
        c.wait_pair(300)
        timings["pair_up_s"] = round(time.monotonic() - t, 1)
        print(f"\nLXD core timings: {json.dumps(timings)}")
        yield c
    assert left == {"containers": [], "images": [], "profiles": [], "networks": []}, \
        f"core down left {left}"
    assert not base.exists(), f"{base} left behind"


def _streams(core: Core) -> list[Stream]:
    return [Stream(core.cli, PUBLIC_VIP, PUBLIC_PORT) for _ in range(STREAMS)]


def _members(core: Core) -> dict[str, str]:
    """Each container of this core (its kind tag): its member, as LXD says."""
    return {c["name"]: c["location"] for c in _ours(LxdClient(_sockets(core.cluster)))}


def test_the_pair_and_the_spare_run_on_three_different_members(core):
    pair = core.wait_pair(120)
    st = json.loads(zfast("core", "status", "--json", "--state-dir", str(STATE), check=True).stdout)
    members = {i["name"]: i["member"] for i in st["instances"]}
    assert set(members) == {"lb-a", "lb-b"} and None not in members.values(), st
    assert members["lb-a"] != members["lb-b"], members
    lxd_says = _members(core)
    for inst in st["instances"]:
        assert lxd_says[inst["netns"]] == inst["member"], (inst, lxd_says)
    spare = [m for name, m in lxd_says.items() if "-spare" in name]
    assert spare and spare[0] not in members.values(), lxd_says
    assert {i["name"] for i in pair.values()} == {"lb-a", "lb-b"}


def test_losing_the_actives_member_keeps_every_stream_and_the_pair_apart(core):
    core.wait_pair(120)
    streams = _streams(core)
    assert not streams_alive(streams)
    active, standby = core.by_role("active"), core.by_role("standby")
    lost = active["member"]
    t0 = time.monotonic()
    core.cluster.lose(lost)
    # the standby takes over at once (the pair's heartbeats, not LXD)
    core.wait_status(lambda st: any(i["name"] == standby["name"] and i["role"] == "active"
                                    for i in st["instances"]), 10, "the standby did not take over")
    took_over = time.monotonic() - t0
    assert not streams_alive(streams, rounds=2), "a stream broke at the failover"
    # a new standby, on the third member (neither the lost one nor the survivor's)
    st = core.wait_status(lambda st: any(
        i["name"] == active["name"] and i["restarts"] > active["restarts"]
        and i["role"] == "standby" and i["healthy"] for i in st["instances"]),
        90, "no new standby", during=lambda: streams_alive(streams))
    replaced = time.monotonic() - t0
    new = next(i for i in st["instances"] if i["name"] == active["name"])
    assert new["member"] not in (lost, standby["member"]), (new, standby)
    broken = streams_alive(streams, rounds=3)
    assert not broken, f"{len(broken)} of {STREAMS} streams broke: {broken[0].error}"
    print(f"\nmember {lost} lost: standby active after {took_over:.2f} s, "
          f"a new standby on {new['member']} after {replaced:.1f} s")
    orphaned = [e for e in core.events("repair") if e.get("action") == "orphaned"]
    assert orphaned and orphaned[-1]["member"] == lost, core.story()
    # the member returns: the lost container is deleted there, never started again
    core.cluster.restore(lost)
    gone = orphaned[-1]["container"]
    core.wait_status(lambda st: any(e.get("action") == "orphan removed"
                                    and e.get("container") == gone
                                    for e in core.events("repair")), 60,
                     "the lost balancer's container was not removed on its return")
    containers = _members(core)
    assert gone not in containers
    # one container an instance (the spare that became lb-a keeps its container's name),
    # and the spare's: nothing else, on the returned member or anywhere
    st = core.status()
    assert {i["netns"] for i in st["instances"]} <= set(containers), (st, containers)
    assert len(containers) == len(st["instances"]) + (1 if st["spare"] else 0), containers
    assert not streams_alive(streams), "a stream broke when the member returned"
    for s in streams:
        s.close()


def test_scaling_decisions_show_in_the_containers_lxd_limits_live(core):
    pair = core.wait_pair(120)
    before = {name: (i["pid"], i["restarts"], i["netns"]) for name, i in pair.items()}
    seen: dict = {}

    def decided(_st) -> bool:
        for e in core.events("scale"):
            if e.get("instance") in pair and e.get("resource") in ("cpu", "memory"):
                seen.setdefault((e["instance"], e["resource"]), e)
        return {r for _, r in seen} == {"cpu", "memory"}

    # idle after their start: both shrink (under 30 % of their memory, little CPU) once
    # the cooldown has passed
    core.wait_status(decided, 60, "no CPU and memory decisions")
    time.sleep(1.5)           # the next scaling tick has carried the last one out
    client = LxdClient(_sockets(core.cluster))
    now = core.instances()
    for (name, resource), e in seen.items():
        inst = now[name]
        assert (inst["pid"], inst["restarts"], inst["netns"]) == before[name], "restarted"
        config = client.get(f"/1.0/instances/{inst['netns']}")["config"]
        assert config["limits.cpu.allowance"] == cpu_allowance(inst["cpu"]), (config, inst)
        assert config["limits.memory"] == str(inst["memory"]), (config, inst)
        memory, cpus, _ = kernel_limits(inst["pid"])
        assert memory == inst["memory"] and abs(cpus - inst["cpu"]) < 1e-6, (memory, cpus, inst)
        assert (inst["cpu"] if resource == "cpu" else inst["memory"]) == e["new"] or \
            any(x.get("instance") == name and x.get("resource") == resource
                for x in core.events("scale") if x is not e), (e, inst)


def test_core_status_names_the_members(core):
    st = json.loads(zfast("core", "status", "--json", "--state-dir", str(STATE), check=True).stdout)
    online = {m["server_name"] for m in core.cluster.members() if m["status"] == "Online"}
    assert all(i["member"] in online for i in st["instances"]), st
    text = zfast("core", "status", "--state-dir", str(STATE), check=True).stdout
    assert all(f"on {i['member']}" in text for i in st["instances"]), text
