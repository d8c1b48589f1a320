"""The LXD runtime's requests, against a fake LXD REST server on a unix socket."""

import os
import socket
import subprocess

import pytest
import yaml

from tests.fakes.lxd import FakeLxd
from zfast.core import lxd as lxdmod
from zfast.core.launcher import Launcher
from zfast.core.lxd import (
    ContainerCgroup,
    ContainerProcess,
    LxdClient,
    LxdError,
    LxdInstance,
    LxdRuntime,
    cpu_allowance,
)
from zfast.core.runtime import InstanceSpec, Link


@pytest.fixture
def fake(tmp_path):
    with FakeLxd(tmp_path / "lxd.socket") as server:
        yield server


@pytest.fixture
def runtime(fake, tmp_path, monkeypatch):
    tags = iter(["beef", "cafe", "f00d", "d00d", "abba", "babe"])
    monkeypatch.setattr(lxdmod.secrets, "token_hex", lambda n: next(tags))
    return LxdRuntime("zfc-t", fake.path, image="zfast-img", repo=tmp_path / "repo",
                      python="/venv/bin/python", shared=(tmp_path / "bpffs", tmp_path / "none"))


def _spec(tmp_path, **kw):
    args = dict(name="lb-a", kind="balancer",
                links=[Link("zfpub", "eth0", ["10.0.0.2/24", "fd00::2/64"]),
                       Link("zfpriv", "eth1", ["10.1.0.2/24"])],
                cpu=0.25, memory=256 << 20, state_dir=tmp_path / "lb-a",
                config={"node": {"name": "lb-a"}}, routes=[("10.9.0.0/16", "10.1.0.1")])
    args.update(kw)
    return InstanceSpec(**args)


def body_of(calls):
    return next(c[2] for c in calls if c[:2][0] == "POST" and c[1].startswith("/1.0/instances"))


def instance_calls(fake):
    """The requests about instances (not the cluster questions placement asks first)."""
    return [c for c in fake.calls() if c[1].startswith("/1.0/instances/")
            or (c[0] == "POST" and c[1].startswith("/1.0/instances"))]


def test_cpu_allowance_is_a_hard_quota_over_the_shortest_period_with_whole_ms():
    assert cpu_allowance(0.5) == "5ms/10ms"
    assert cpu_allowance(1.5) == "15ms/10ms"
    assert cpu_allowance(0.25) == "5ms/20ms"
    assert cpu_allowance(0.3) == "3ms/10ms"
    assert cpu_allowance(0.02) == "1ms/50ms"
    assert cpu_allowance(0.33) == "33ms/100ms"
    assert cpu_allowance(0.001) == "1ms/100ms"      # LXD's floor: 1 ms


def test_create_makes_a_privileged_bridged_container_boots_it_and_sets_its_links(fake, runtime, tmp_path):
    spec = _spec(tmp_path)
    (tmp_path / "bpffs").mkdir()
    inst = runtime.create(spec)
    # a name of its own (its predecessor may still exist on a member that is down)
    assert isinstance(inst, LxdInstance) and inst.container == "zfc-t-lb-a-beef"
    assert inst.host_ifnames == ["lb-abeef0", "lb-abeef1"]
    assert inst.member is None                                   # no cluster: no member
    assert spec.state_dir.is_dir()
    assert fake.calls()[0] == ("GET", "/1.0/cluster", None)      # placement asks first
    calls = instance_calls(fake)
    assert body_of(calls)["devices"]["zfast-share0"] == {
        "type": "disk", "source": str(tmp_path / "bpffs"), "path": str(tmp_path / "bpffs")}
    assert "zfast-share1" not in body_of(calls)["devices"]       # a missing one is left out
    method, path, body = calls[0]
    assert (method, path) == ("POST", "/1.0/instances")
    assert body["name"] == "zfc-t-lb-a-beef" and body["type"] == "container"
    assert body["source"] == {"type": "image", "alias": "zfast-img"}
    assert body["profiles"] == []           # no profile (of the operator's or ours): its root here
    assert body["devices"]["root"] == {"type": "disk", "path": "/", "pool": "default"}
    assert body["config"] == {"security.privileged": "true", "boot.autostart": "false",
                              "limits.cpu.allowance": "5ms/20ms",
                              "limits.memory": str(256 << 20), "user.zfast.core": "zfc-t",
                              "user.zfast.kind": "balancer"}
    assert body["devices"]["eth0"] == {"type": "nic", "nictype": "bridged", "parent": "zfpub",
                                       "name": "eth0", "host_name": "lb-abeef0"}
    assert body["devices"]["eth1"]["parent"] == "zfpriv"
    assert body["devices"]["zfast-state"] == {"type": "disk", "source": str(spec.state_dir),
                                              "path": str(spec.state_dir)}
    assert body["devices"]["zfast-code"] == {"type": "disk", "source": str(tmp_path / "repo"),
                                             "path": str(tmp_path / "repo"), "readonly": "true"}
    assert calls[1] == ("PUT", "/1.0/instances/zfc-t-lb-a-beef/state", {"action": "start", "timeout": 30})
    assert calls[2][:2] == ("GET", "/1.0/instances/zfc-t-lb-a-beef/state")     # its init: its cgroup
    assert calls[3][:2] == ("POST", "/1.0/instances/zfc-t-lb-a-beef/exec")
    assert calls[3][2]["record-output"] is True and calls[3][2]["wait-for-websocket"] is False
    sh, flags, script = calls[3][2]["command"]
    assert (sh, flags) == ("/bin/sh", "-ec")
    lines = script.splitlines()
    assert "ip link set lo up" in lines
    assert "echo 1 > /proc/sys/net/ipv4/ip_forward" in lines
    assert "ip link set eth0 up" in lines and "ip link set eth1 up" in lines
    assert "ip addr add 10.0.0.2/24 dev eth0" in lines
    assert "ip addr add fd00::2/64 dev eth0 nodad" in lines
    assert "ip addr add 10.1.0.2/24 dev eth1" in lines
    assert lines[-1] == "ip route replace 10.9.0.0/16 via 10.1.0.1"
    assert len(calls) == 4


def test_a_create_whose_set_up_fails_leaves_no_container(fake, runtime, tmp_path):
    fake.exec_results = [(1, "", "RTNETLINK answers: File exists\n")]
    with pytest.raises(LxdError, match="File exists"):
        runtime.create(_spec(tmp_path))
    assert fake.instances == {}
    assert [c[:2] for c in fake.calls()][-2:] == [("PUT", "/1.0/instances/zfc-t-lb-a-beef/state"),
                                                   ("DELETE", "/1.0/instances/zfc-t-lb-a-beef")]
    assert fake.calls()[-2][2] == {"action": "stop", "force": True}


def test_a_failed_operation_raises(fake, runtime, tmp_path):
    fake.fail_ops.add("/1.0/instances")
    with pytest.raises(LxdError, match="it failed"):
        runtime.create(_spec(tmp_path))


def _daemon_says(fake, inst, shell: int, daemon: int):
    """The fake's exec of a start: the wrapper's pid file, as the shell in it writes it."""
    fake.on_exec = lambda cmd: (inst.spec.state_dir / "daemon.pids").write_text(
        f"{shell} {daemon}\n") if "setsid" in cmd[-1] else None


def test_start_writes_the_file_and_runs_the_daemon_detached_in_the_container(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    fake.requests.clear()
    fake.state["pid"] = os.getpid()                 # "the container's init": our own pid namespace
    me = os.getpid()
    _daemon_says(fake, inst, me, me)
    runtime.start(inst)
    assert yaml.safe_load(inst.config_path.read_text()) == {"node": {"name": "lb-a"}}
    cmd = fake.execs()[-1][2]
    sd = inst.spec.state_dir
    assert cmd == (f"cd / && P={sd}/daemon.pids E={sd}/daemon.exit setsid sh -c "
                   """'"$@" & echo $$ $! > "$P.tmp" && mv "$P.tmp" "$P"; wait $!; echo $? > "$E"' """
                   f"zfast-daemon /venv/bin/python -m zfast.cli up -c {inst.config_path} "
                   f">>{sd}/daemon.log 2>&1 </dev/null &")
    assert isinstance(inst.proc, ContainerProcess)
    assert inst.pid == me and inst.proc.wrapper == me     # their host pids, via NSpid
    assert inst.proc.poll() is None
    assert inst.started > 0


def test_a_parked_start_gets_the_template_and_no_instance_file(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path, kind="router"))
    inst.config_path.write_text("stale")
    _daemon_says(fake, inst, 7, 8)
    runtime.start(inst, park={"node": {"name": "spare"}})
    assert not inst.config_path.exists()
    template = inst.spec.state_dir / "template.yaml"
    assert yaml.safe_load(template.read_text()) == {"node": {"name": "spare"}}
    assert f"-m zfast.routing.router -c {inst.config_path} --park {template} " in fake.execs()[-1][2]
    assert inst.pid is None                         # pids 7, 8 of no container here: not found
    assert inst.proc.poll() == -9                   # no status written: its container is gone


def test_a_start_whose_shell_never_says_its_pids_fails(fake, runtime, tmp_path, monkeypatch):
    inst = runtime.create(_spec(tmp_path))
    monkeypatch.setattr(lxdmod.time, "monotonic", iter([0, 0, 11, 11, 11]).__next__)
    with pytest.raises(LxdError, match="did not start"):
        runtime.start(inst)


def test_a_daemon_that_exited_has_the_status_its_shell_wrote(tmp_path):
    (tmp_path / "daemon.exit").write_text("3\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    proc = ContainerProcess(dead.pid, dead.pid, tmp_path / "daemon.exit")
    assert proc.poll() == 3 and proc.returncode == 3


def test_the_container_cgroup_is_its_inits_for_reading_only(tmp_path):
    cg = ContainerCgroup.of(os.getpid(), root=tmp_path)        # a v1 layout under tmp_path
    own = {ln.split(":", 2)[1]: ln.split(":", 2)[2]
           for ln in open(f"/proc/{os.getpid()}/cgroup").read().splitlines()}
    if cg is not None:
        assert cg.paths["memory"] == tmp_path / "memory" / own["memory"].lstrip("/")
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")   # v2
    cg = ContainerCgroup.of(os.getpid(), root=tmp_path)
    assert cg.paths == {c: tmp_path / own[""].lstrip("/") for c in ("cpu", "memory")}
    with pytest.raises(NotImplementedError):
        cg.set_limits(1, 1)
    cg.create()
    cg.destroy()
    assert ContainerCgroup.of(1 << 30) is None


def test_resize_and_boost_patch_the_limits_live(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    fake.requests.clear()
    runtime.resize(inst, 0.5, 512 << 20)
    assert fake.calls() == [("PATCH", "/1.0/instances/zfc-t-lb-a-beef", {"config": {
        "limits.cpu.allowance": "5ms/10ms", "limits.memory": str(512 << 20)}})]
    assert (inst.spec.cpu, inst.spec.memory) == (0.5, 512 << 20)
    runtime.boost(inst, 1.0)
    assert fake.calls()[-1][2]["config"]["limits.cpu.allowance"] == "10ms/10ms"
    runtime.boost(inst, None)
    assert fake.calls()[-1][2]["config"] == {"limits.cpu.allowance": "5ms/10ms",
                                            "limits.memory": str(512 << 20)}
    assert runtime.limits(inst) == {"limits.cpu.allowance": "5ms/10ms",
                                    "limits.memory": str(512 << 20)}
    assert (inst.spec.cpu, inst.spec.memory) == (0.5, 512 << 20)     # a boost is no resize


def test_usage_and_macs_come_from_the_state(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    fake.state.update(cpu={"usage": 123456789}, memory={"usage": 50 << 20, "total": 256 << 20},
                      network={"eth0": {"hwaddr": "00:16:3e:00:00:01"},
                               "eth1": {"hwaddr": "00:16:3e:00:00:02"},
                               "lo": {"hwaddr": ""}})
    assert runtime.usage(inst) == {"cpu_ns": 123456789, "memory": 50 << 20,
                                   "memory_limit": 256 << 20}
    assert runtime.macs(inst) == {"eth0": "00:16:3e:00:00:01", "eth1": "00:16:3e:00:00:02"}
    assert fake.calls("GET")[-1][1] == "/1.0/instances/zfc-t-lb-a-beef/state"


def test_usage_of_a_gone_container_is_zero(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    fake.instances.clear()
    assert runtime.usage(inst) == {"cpu_ns": 0, "memory": 0, "memory_limit": 0}
    assert runtime.macs(inst) == {}


def test_assign_sets_macs_then_addresses(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    runtime.assign(inst, [Link("zfpub", "eth0", ["10.0.0.7/24"])], {"eth0": "00:16:3e:aa:bb:cc"})
    assert fake.execs()[-1][2].splitlines() == [
        "ip link set dev eth0 address 00:16:3e:aa:bb:cc || true",
        "ip addr add 10.0.0.7/24 dev eth0"]


def test_stop_signals_the_daemon_on_the_host(runtime, tmp_path):
    inst = LxdInstance(_spec(tmp_path), netns="c", cgroup=None, container="c")
    runtime.stop(inst)                               # no daemon: nothing to do
    daemon = subprocess.Popen(["sleep", "60"])
    inst.proc = ContainerProcess(daemon.pid, os.getpid(), tmp_path / "daemon.exit")
    assert inst.pid == daemon.pid
    runtime.stop(inst, timeout=5)
    assert daemon.wait(1) == -15                     # SIGTERM (SIGUSR1 with keep_dataplane)
    assert inst.pid is None


def test_destroy_forces_a_stop_then_deletes_and_tolerates_a_gone_one(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    fake.requests.clear()
    runtime.destroy(inst)
    assert [c[:2] for c in fake.calls()] == [("PUT", "/1.0/instances/zfc-t-lb-a-beef/state"),
                                             ("DELETE", "/1.0/instances/zfc-t-lb-a-beef")]
    assert fake.calls()[0][2] == {"action": "stop", "force": True}
    assert fake.instances == {}
    runtime.destroy(inst)                            # again: 404s are fine


def test_last_words_read_the_bind_mounted_log(runtime, tmp_path):
    inst = LxdInstance(_spec(tmp_path), netns="c", cgroup=None, container="c")
    inst.spec.state_dir.mkdir()
    (inst.spec.state_dir / "daemon.log").write_text("one\nzfast: error: no such interface\n\n")
    assert runtime.last_words(inst) == "zfast: error: no such interface"


def test_the_client_raises_lxds_error_with_its_code(fake):
    with pytest.raises(LxdError) as err:
        LxdClient(fake.path).get("/1.0/instances/nope")
    assert err.value.code == 404 and "Instance not found" in str(err.value)


# ---- a cluster: placement, a lost member, orphans ------------------------------------------

def _cluster(fake, *members):
    fake.members = {m: "Online" for m in members}


def _router(tmp_path, name):
    return _spec(tmp_path, name=name, kind="router", state_dir=tmp_path / name,
                 links=[Link("zfpriv", "eth0", ["10.1.0.9/24"])], routes=[])


def test_the_pair_the_spare_and_the_routers_are_spread_over_the_members(fake, runtime, tmp_path):
    _cluster(fake, "m1", "m2", "m3")
    a = runtime.create(_spec(tmp_path))
    b = runtime.create(_spec(tmp_path, name="lb-b", state_dir=tmp_path / "lb-b"))
    ra, rb = runtime.create(_router(tmp_path, "rt-a")), runtime.create(_router(tmp_path, "rt-b"))
    spare = runtime.create(_spec(tmp_path, name="spare1", kind="spare",
                                 state_dir=tmp_path / "spare1"))
    assert (a.member, b.member) == ("m1", "m2")
    assert ra.member != rb.member and {ra.member, rb.member} <= {"m1", "m2", "m3"}
    assert spare.member == "m3"          # away from both balancers: either's successor
    posts = [c[1] for c in fake.calls("POST") if not c[1].endswith("/exec")]
    assert posts[0] == "/1.0/instances?target=m1"
    assert {c[:2] for c in fake.calls("GET")} >= {("GET", "/1.0/cluster/members?recursion=1"),
                                                  ("GET", "/1.0/instances?recursion=1")}


def test_a_successor_goes_away_from_the_surviving_peer(fake, runtime, tmp_path):
    _cluster(fake, "m1", "m2", "m3")
    a = runtime.create(_spec(tmp_path))
    runtime.create(_spec(tmp_path, name="lb-b", state_dir=tmp_path / "lb-b"))
    fake.members["m1"] = "Offline"       # lb-a's member lost
    runtime.destroy(a)                   # LXD cannot: an orphan, not an error
    assert runtime.orphans == {a.container: "m1"}
    successor = runtime.create(_spec(tmp_path))
    assert successor.member == "m3" and successor.container != a.container


def test_an_orphan_is_deleted_once_its_member_is_back_and_said(fake, runtime, tmp_path):
    _cluster(fake, "m1", "m2")
    events = []
    runtime.log = lambda kind, **f: events.append((kind, f))
    a = runtime.create(_spec(tmp_path))
    fake.members["m1"] = "Offline"
    runtime.destroy(a)
    assert events[-1][1]["action"] == "orphaned" and a.container in fake.instances
    runtime.housekeeping()               # still down: left alone
    assert a.container in fake.instances and runtime.orphans
    fake.members["m1"] = "Online"        # back: no second copy of lb-a stays there
    runtime.housekeeping()
    assert a.container not in fake.instances and runtime.orphans == {}
    assert events[-1] == ("repair", {"action": "orphan removed", "container": a.container,
                                     "member": "m1"})


def test_with_one_member_online_the_pair_shares_it_and_says_so(fake, runtime, tmp_path):
    _cluster(fake, "m1", "m2")
    fake.members["m2"] = "Offline"
    events = []
    runtime.log = lambda kind, **f: events.append((kind, f))
    runtime.create(_spec(tmp_path))
    b = runtime.create(_spec(tmp_path, name="lb-b", state_dir=tmp_path / "lb-b"))
    assert b.member == "m1"
    assert events and events[-1][0] == "error" and events[-1][1]["what"] == "placement"
    fake.members["m1"] = "Offline"
    with pytest.raises(LxdError, match="no member"):
        runtime.create(_spec(tmp_path, name="lb-c", state_dir=tmp_path / "lb-c"))


def test_the_cores_state_dir_is_mounted_whole_when_the_instance_is_under_it(fake, tmp_path):
    runtime = LxdRuntime("zfc-t", fake.path, image="zfast-img", repo=tmp_path / "repo",
                         shared=(), core_dir=tmp_path)
    runtime.create(_spec(tmp_path))           # state dir tmp_path/lb-a: the pair's key beside it
    assert body_of(fake.calls())["devices"]["zfast-state"] == {
        "type": "disk", "source": str(tmp_path), "path": str(tmp_path)}


def test_open_checks_the_pool_and_the_image_and_removes_a_dead_cores_containers(fake, runtime,
                                                                               tmp_path):
    left = runtime.create(_spec(tmp_path))                      # a core that died
    fake.instances["someone-else"] = {"name": "someone-else", "config": {}, "location": "none"}
    runtime.open()
    assert set(fake.instances) == {"someone-else"} and left.container not in fake.instances
    runtime.pool = "nvme"
    with pytest.raises(LxdError, match="core.runtime.pool: LXD has no storage pool 'nvme'"):
        runtime.open()
    runtime.pool, runtime.image = "default", "nope"
    with pytest.raises(LxdError, match="core.runtime.image: LXD has no image 'nope'"):
        runtime.open()


def test_close_removes_every_container_and_the_image_it_imported(fake, runtime, tmp_path):
    runtime.create(_spec(tmp_path))
    runtime.imported = "zfast-img"
    runtime.close()
    assert fake.instances == {} and fake.images == {}
    runtime.imported = None
    fake.images = {"theirs": "fp"}
    runtime.close()                                              # an image not ours stays
    assert fake.images == {"theirs": "fp"}


def test_the_client_tries_the_next_socket_when_one_refuses(fake, tmp_path):
    dead = tmp_path / "dead.socket"
    client = LxdClient([dead, fake.path])
    assert client.get("/1.0")["config"] == {}
    assert client.socket_path == str(fake.path)                  # sticks to the one that answers
    with pytest.raises(LxdError, match="no LXD daemon answers.*is lxd running"):
        LxdClient([dead]).get("/1.0")


def test_host_pid_of_a_pid_in_the_container(fake, runtime, tmp_path):
    inst = runtime.create(_spec(tmp_path))
    inst.init = os.getpid()                    # "the container": our own pid namespace
    assert runtime.host_pid(inst, os.getpid()) == os.getpid()
    assert runtime.host_pid(inst, None) is None
    assert runtime.host_pid(inst, 1 << 22) is None


def test_a_member_whose_address_refuses_is_down_before_lxd_says_so(fake, runtime, tmp_path):
    """LXD calls a member Offline only after 10 s or more; a request it forwards there
    meanwhile stalls. A refused connection to the member's address is enough to know."""
    _cluster(fake, "m1", "m2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    fake.member_urls = {"m1": f"https://127.0.0.1:{dead_port}", "m2": f"https://127.0.0.1:{port}"}
    a = runtime.create(_spec(tmp_path))
    assert a.member == "m2"                     # m1 "Online" to LXD, but it refuses
    runtime.cluster.urls["m2"] = f"https://127.0.0.1:{dead_port}"    # now m2 is gone too
    fake.requests.clear()
    assert runtime.macs(a) == {}
    runtime.destroy(a)
    assert runtime.orphans == {a.container: "m2"}
    assert not [c for c in fake.calls() if c[1].startswith("/1.0/instances/")]   # never asked
    listener.close()


def test_the_client_waits_for_a_cluster_s_operation_keeping_its_query(tmp_path, monkeypatch):
    asked = []
    client = LxdClient(tmp_path / "s")
    monkeypatch.setattr(client, "request", lambda method, path, body=None, wait=True,
                        timeout=None: asked.append(path) or {"status_code": 200})
    client.wait("/1.0/operations/abc?project=default", timeout=7)
    client.wait("/1.0/operations/def", timeout=7)
    assert asked == ["/1.0/operations/abc/wait?timeout=7&project=default",
                     "/1.0/operations/def/wait?timeout=7"]
    monkeypatch.setattr(client, "request", lambda *a, **k: {"status_code": 400, "err": "no"})
    with pytest.raises(LxdError, match="no"):
        client.wait("/1.0/operations/x")


def test_a_spare_beside_a_balancer_is_better_placed_once_a_member_is_free(fake, runtime, tmp_path):
    _cluster(fake, "m1", "m2", "m3")
    fake.members["m3"] = "Offline"
    runtime.create(_spec(tmp_path))
    runtime.create(_spec(tmp_path, name="lb-b", state_dir=tmp_path / "lb-b"))
    spare = runtime.create(_spec(tmp_path, name="spare1", kind="spare",
                                 state_dir=tmp_path / "spare1"))
    assert spare.member == "m1"              # beside lb-a: no member without a balancer
    assert not runtime.better_placed(spare)
    fake.members["m3"] = "Online"            # back: a spare made now would go there
    assert runtime.better_placed(spare)


def test_the_launcher_passes_over_a_spare_on_the_surviving_peers_member(tmp_path):
    events = []

    class Log:
        def log(self, kind, **fields):
            events.append((kind, fields))

    launcher = Launcher(runtime=None, prefix="zfc-t", state_dir=tmp_path, events=Log(), max_cpu=1)
    lb_b = LxdInstance(_spec(tmp_path, name="lb-b"), netns="c1", cgroup=None, member="m2")
    spare = LxdInstance(_spec(tmp_path, name="spare1", kind="spare"), netns="c2", cgroup=None,
                        member="m2")
    launcher.instances["lb-b"] = lb_b
    assert launcher._beside_a_balancer(spare)
    assert events[-1] == ("repair", {"action": "spare passed over", "spare": "spare1",
                                     "member": "m2", "beside": "lb-b"})
    spare.member = "m3"
    assert not launcher._beside_a_balancer(spare)
    lb_b.member = spare.member = None        # no cluster: never
    assert not launcher._beside_a_balancer(spare)


def test_a_spare_alone_of_its_group_on_its_member_stays_put(fake, runtime, tmp_path):
    """Only the spare's own container is left out of the count, not another one on its
    member: a router beside it does not make it misplaced."""
    _cluster(fake, "m1", "m2", "m3", "m4")
    fake.members["m4"] = "Offline"
    router = runtime.create(_router(tmp_path, "rt-a"))
    a = runtime.create(_spec(tmp_path))
    b = runtime.create(_spec(tmp_path, name="lb-b", state_dir=tmp_path / "lb-b"))
    assert (router.member, a.member, b.member) == ("m1", "m2", "m3")
    spare = runtime.create(_spec(tmp_path, name="spare1", kind="spare",
                                 state_dir=tmp_path / "spare1"))
    assert spare.member == "m1"              # beside the router: no balancer there
    fake.members["m4"] = "Online"
    assert not runtime.better_placed(spare)
