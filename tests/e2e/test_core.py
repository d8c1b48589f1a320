"""`zfast core up` end to end: the balancer pair as instances, repaired and scaled.

One core service for the module, in a namespace of its own ("host", holding the public and
private bridges), a client on the public bridge and two echo backends on the private one.
Streams go through a public port (the VIP moves with the active instance).

- SIGSTOP of the standby's daemon: a healthy standby again within 3 s, from the parked
  spare or (the spare killed) a new instance whose program is in the program cache; no
  stream broken.
- the active's program detached: failover, then the old active comes back as standby.
- an instance that crashes on start (a corrupt pair key) is retried with growing back-off
  and its failed starts cost under 5 % of one CPU meanwhile.
- CPU quota: a load that saturates an instance's quota makes it rise; idle, it falls back
  after the cooldown.
"""

from __future__ import annotations

import calendar
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.kit import kernel
from tests.e2e.kit.core import Core, core_service
from zfast.api import ApiError
from zfast.controllers.repair import STABLE_S, STOPPED
from zfast.lab.probe import Stream, streams_alive

PROJECT = "coretest"
STATE = Path("/run/zfast/test-core")
PUBLIC_VIP, PUBLIC_PORT = "10.232.0.10", 2222
BACKENDS = ("10.233.0.2", "10.233.0.3")
STREAMS = 30          # long-lived TCP streams through the VIP; one that moved would break


def _config() -> dict:
    return {
        "project": PROJECT,
        "services": [{"name": "app", "vip": "10.233.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                      "backends": [{"address": a} for a in BACKENDS]}],
        "public_ports": [{"port": PUBLIC_PORT, "proto": "tcp", "address": PUBLIC_VIP,
                          "service": "app", "target_port": 8080}],
        "datapath": {"max_services": 4, "max_backends": 16},
        "core": {"public": {"bridge": "zcpub0", "subnet": "10.232.0.0/24"},
                 "private": {"bridge": "zcpriv0", "subnet": "10.233.0.0/24",
                             "gateway": "10.233.0.254"},
                 "balancer": {"cpu": 0.5, "memory": "256Mi", "flow_table": 65536,
                              "scale": {"cpu": [0.25, 1], "memory": ["128Mi", "1Gi"],
                                        "flow_table": [65536, 262144], "cooldown_s": 8}}},
    }


@pytest.fixture(scope="module")
def core():
    with core_service("zfct", STATE, _config(), BACKENDS, "10.232.0.100/24") as c:
        c.wait_pair(90)
        yield c


def _streams(core: Core) -> list[Stream]:
    return [Stream(core.cli, PUBLIC_VIP, PUBLIC_PORT) for _ in range(STREAMS)]


def _replaced(core: Core, name: str, restarts: int, timeout: float) -> tuple[float, dict]:
    """Seconds until instance `name` has restarted and is a healthy standby again."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            inst = core.instances()[name]
        except ApiError:
            inst = None
        if inst and inst["restarts"] > restarts and inst["role"] == "standby" and inst["healthy"]:
            return time.monotonic() - t0, inst
        time.sleep(0.05)
    raise AssertionError(f"{name} not back as a healthy standby in {timeout} s: {core.status()}\n"
                         f"{core.story()}")


def test_sigstop_of_the_standby_is_repaired_within_3s_and_no_stream_breaks(core):
    core.wait_pair()
    streams = _streams(core)
    assert not streams_alive(streams)
    standby = core.by_role("standby")
    os.kill(standby["pid"], signal.SIGSTOP)
    took, inst = _replaced(core, standby["name"], standby["restarts"], timeout=15)
    print(f"\nSIGSTOP to a healthy standby, from the spare: {took:.2f} s")
    assert took <= 3.0, f"replaced after {took:.1f} s\n{core.story()}"
    assert inst["pid"] != standby["pid"]
    assert not streams_alive(streams, rounds=3), "a stream broke"
    repair = core.repairs(standby["name"])
    # a stopped daemon is replaced at once (it does not wait for its API to time out twice)
    replaced = [e for e in repair if e["action"] == "replace"][-1]
    assert replaced["problems"] == [STOPPED]
    assert [e["action"] for e in repair if e["action"].startswith("started")][-1] == \
        "started from the spare"


def _spare_pid(core: Core) -> int:
    """The parked spare's daemon: `zfast up ... --park`, in the spare's own state dir (a
    spare that took an instance's place keeps that command line)."""
    where = str(STATE / core.status()["spare"]).encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--park" in argv and any(a.startswith(where + b"/") for a in argv):
                return int(d)
    raise AssertionError(f"no parked spare's daemon in {where.decode()}")


def test_sigstop_of_the_standby_3s_after_the_pair_formed_without_a_spare(core):
    """No spare (its daemon killed: the next one is made 15 s later), so the successor is a
    new instance; its program comes from the program cache, so it is a standby again
    within 3 s of the SIGSTOP, and no stream breaks."""
    pair = core.wait_pair(90)
    os.kill(_spare_pid(core), signal.SIGKILL)
    core.wait_status(lambda st: st["spare"] is None, 10, "the killed spare is still counted")
    streams = _streams(core)
    assert not streams_alive(streams)
    formed = max(i["healthy_since"] for i in pair.values())
    time.sleep(max(0.0, formed + 3.0 - time.time()))
    standby = next(i for i in core.wait_pair(10, spare=False).values() if i["role"] == "standby")
    os.kill(standby["pid"], signal.SIGSTOP)
    took, inst = _replaced(core, standby["name"], standby["restarts"], timeout=20)
    print(f"\nSIGSTOP to a healthy standby, no spare: {took:.2f} s")
    starts = [e["action"] for e in core.repairs(standby["name"]) if e["action"].startswith("started")]
    assert starts[-1] == "started", core.story()      # a new instance, not a spare
    assert took <= 3.0, f"replaced after {took:.1f} s\n{core.story()}"
    assert not streams_alive(streams, rounds=3), "a stream broke"


def test_a_successor_frozen_as_soon_as_it_answers_is_repaired_too(core):
    """The parked spare takes a killed standby's place and is stopped the moment it first
    answers as standby: it must not enjoy a new daemon's minute to compile (it has nothing
    to compile). Failing before it was healthy for long, it counts as a crash: its own
    successor (a cold start: no spare is parked yet) comes after the first back-off, and is
    a healthy standby well within that minute."""
    core.wait_pair(90, stable_s=STABLE_S)     # its death is not a crash: the spare steps in
    standby = core.by_role("standby")
    os.kill(standby["pid"], signal.SIGKILL)
    end = time.monotonic() + 15
    while True:           # as soon as the spare's daemon answers as that standby
        inst = core.instances()[standby["name"]]
        if inst["restarts"] > standby["restarts"] and inst["role"] == "standby":
            break
        assert time.monotonic() < end, core.status()
    os.kill(inst["pid"], signal.SIGSTOP)
    took, _ = _replaced(core, inst["name"], inst["restarts"], timeout=50)
    last = core.repairs(inst["name"], "replace")[-1]
    # a crash (it was never healthy for long): the try after this one waits 8 s
    assert last["backoff_s"] == 8 and last["problems"] == [STOPPED], last
    assert took < 25.0, f"replaced after {took:.1f} s\n{core.story()}"
    # the cold start compiled with the top of scale.cpu, then went back to its own quota
    def unboosted(st):
        return not next(i for i in st["instances"] if i["name"] == inst["name"])["boosted"]
    st = core.wait_status(unboosted, 5, "still starting with the boosted quota")
    successor = next(i for i in st["instances"] if i["name"] == inst["name"])
    repair = core.repairs(inst["name"])
    started = [e for e in repair if e["action"] == "started"][-1]
    answered = [e for e in repair if e["action"] == "answered"][-1]
    assert started["start_cpu"] == 1.0 and answered["cpu"] == successor["cpu"] < 1.0, repair[-3:]
    assert _epoch(answered["time"]) > _epoch(started["time"]), repair[-3:]
    quota = _cgroup_of(successor["pid"])["cpu"]
    assert (int((quota / "cpu.cfs_quota_us").read_text())
            == int(successor["cpu"] * int((quota / "cpu.cfs_period_us").read_text())))


def test_detaching_the_actives_program_fails_over_then_repairs_it_as_standby(core):
    core.wait_pair()
    streams = _streams(core)
    active = core.by_role("active")
    netns = active["netns"]
    assert kernel.hooks_on(netns) == {"pub0": "tc", "priv0": "tc"}, "default veths: tc"
    for ifname in ("pub0", "priv0"):
        kernel.detach_program(netns, ifname)
    took, inst = _replaced(core, active["name"], active["restarts"], timeout=20)
    others = [i for i in core.instances().values() if i["name"] != active["name"]]
    assert others[0]["role"] == "active"
    assert not streams_alive(streams, rounds=3), "a stream broke"
    problems = core.repairs(active["name"], "replace")[-1]["problems"]
    assert any("detached" in p or "not attached" in p for p in problems), problems


def test_an_instance_that_crashes_on_start_backs_off_and_costs_under_5_percent_cpu(core):
    core.wait_pair(stable_s=STABLE_S)
    key = STATE / "ha.key"
    good = key.read_bytes()
    standby = core.by_role("standby")
    try:
        key.write_text("not a key\n")          # every new daemon refuses to start
        killed = time.time()
        os.kill(standby["pid"], signal.SIGKILL)
        time.sleep(1)
        first = time.time()
        time.sleep(30)
        tries = [e for e in core.repairs(standby["name"], "replace")
                 if _epoch(e["time"]) >= killed - 0.01]
        backoffs = [e["backoff_s"] for e in tries]
        assert len(tries) >= 3, tries
        # the killed standby was stable: no crash, the spare steps in at once; the spare
        # refuses the key (a crash): 8 s, then doubling
        assert backoffs[0] == 0 and backoffs[1] == 8 and backoffs[-1] >= 16, backoffs
        assert all(b == min(60, 2 * a) for a, b in zip(backoffs[1:], backoffs[2:])), backoffs
        # What the failed starts cost (each one's cgroup, read as it is removed) over the
        # time spent failing: the tries that remove a daemon which refused to start (exit 1),
        # not the one that removed the killed standby (its life's CPU is not a failed start).
        failed = [e for e in tries if e["problems"][0].startswith("daemon exited (1)")
                  and "ha.key_file" in e["problems"][0]]   # the daemon's refusal, quoted
        assert len(failed) >= 2, tries
        share = sum(e["cpu_s"] for e in failed) / (time.time() - first)
        assert share < 0.05, f"failing starts used {share:.1%} of a CPU ({failed})"
        assert core.status()["controllers"]["repair"]["next_retry_in_s"] >= 8
    finally:
        key.write_bytes(good)
    # Once a successor has been healthy for STABLE_S the loop is over: its next failure is
    # repaired at once, not after what is left of the last back-off (60 s).
    name = standby["name"]
    core.wait_pair(120, spare=False, stable_s=STABLE_S + 1)
    stable = core.repairs(name, "stable")
    assert stable and stable[-1]["after_crashes"] >= 3, core.story()
    again = core.instances()[name]
    killed = time.time()
    os.kill(again["pid"], signal.SIGKILL)
    _replaced(core, name, again["restarts"], timeout=60)
    last = core.repairs(name, "replace")[-1]
    assert last["backoff_s"] == 0 and _epoch(last["time"]) - killed < 2, last


def _epoch(rfc3339: str) -> float:
    return calendar.timegm(time.strptime(rfc3339[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + rfc3339[20:23])


def _cgroup_of(pid: int) -> dict[str, Path]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            if c in ("cpu", "cpuacct"):
                out[c] = Path("/sys/fs/cgroup") / c / path.lstrip("/")
    return out


def test_cpu_quota_rises_under_a_saturating_load_and_falls_when_idle(core):
    pair = core.wait_pair(90, spare=False, stable_s=STABLE_S)
    standby = next(i for i in pair.values() if i["role"] == "standby")
    name, start = standby["name"], standby["cpu"]
    groups = _cgroup_of(standby["pid"])
    assert groups, "the instance's daemon is in no cpu cgroup"
    # Load inside the instance: two busy processes in its cgroup saturate any quota <= 2.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for h in hogs:
            for path in groups.values():
                (path / "cgroup.procs").write_text(str(h.pid))
        end = time.monotonic() + 40
        while core.instances()[name]["cpu"] <= start:
            assert time.monotonic() < end, f"the quota did not rise: {core.status()}\n{core.story()}"
            time.sleep(0.5)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    raised = core.instances()[name]["cpu"]
    # starved, not hung: its quota grew, it was not replaced by one that would starve too
    assert core.instances()[name]["restarts"] == standby["restarts"], core.events("repair")[-3:]
    up = [e for e in core.events("scale") if e.get("instance") == name and e["resource"] == "cpu"]
    # what drove it: use near the whole quota, or the quota running out in many periods
    assert up and up[-1]["new"] > up[-1]["old"], up
    assert up[-1]["cpu_use_p90"] > 0.8 or up[-1]["throttled_p90"] > 0.2, up[-1]
    end = time.monotonic() + 60
    while core.instances()[name]["cpu"] >= raised:
        assert time.monotonic() < end, f"the quota did not fall: {core.status()}\n{core.story()}"
        time.sleep(0.5)
    down = [e for e in core.events("scale") if e.get("instance") == name and e["resource"] == "cpu"]
    assert down[-1]["new"] < down[-1]["old"], down
    # not before the cooldown after the rise
    assert _epoch(down[-1]["time"]) - _epoch(up[-1]["time"]) >= 8


def test_a_standby_whose_heartbeats_stop_is_replaced(core):
    """Its daemon answers the core, but the active no longer hears it (here: an nftables
    rule in the standby's namespace drops what it sends to the heartbeat port)."""
    core.wait_pair(90, spare=False)
    streams = _streams(core)
    standby = core.by_role("standby")
    rules = ("add table inet zftest\n"
             "add chain inet zftest out { type filter hook output priority 0; }\n"
             "add rule inet zftest out udp dport 5405 drop\n")
    subprocess.run(["ip", "netns", "exec", standby["netns"], "nft", "-f", "-"], input=rules,
                   text=True, check=True)
    took, inst = _replaced(core, standby["name"], standby["restarts"], timeout=30)
    problems = core.repairs(standby["name"], "replace")[-1]["problems"]
    assert any("heartbeats do not reach the active" in p for p in problems), problems
    assert not streams_alive(streams, rounds=3), "a stream broke"
