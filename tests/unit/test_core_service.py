"""The core service's loop without root: a fake Runtime whose "daemons" are API servers in
this process (each answers GET /status), a cgroup tree and the store in a temporary
directory. It drives the ticks by hand and checks the wiring between observations, the
repair controller and what is carried out: the spare, a replacement, a router's drain,
an apply, the API. (The real thing: tests/e2e/test_core*.py.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from zfast import config
from zfast.api import ApiError, Client, Server
from zfast.controllers.logger import read
from zfast.core import launcher as launcher_module
from zfast.core import service as service_module
from zfast.core.cgroups import Cgroup
from zfast.core.runtime import Instance, InstanceSpec, Link, Runtime
from zfast.core.service import CoreService
from zfast.core.spare import PARKED


class FakeProc:
    """A daemon: exits when told to (returncode), answers while it runs."""

    def __init__(self):
        self.pid = os.getpid()        # a process that is never stopped (state T)
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeRuntime(Runtime):
    def __init__(self, root: Path):
        self.root = root
        self.servers: dict[Path, Server] = {}
        self.stopping: list[threading.Thread] = []   # a server's stop takes its poll (0.5 s)
        self.revision = lambda: 1          # what the fake daemons say they applied

    def create(self, spec: InstanceSpec, group: str | None = None) -> Instance:
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        return Instance(spec, f"fake-{spec.name}", Cgroup(f"{group}/{spec.name}", root=self.root))

    def start(self, inst: Instance, park: dict | None = None) -> None:
        inst.proc, inst.started = FakeProc(), time.time()
        if park is not None:
            (inst.spec.state_dir / PARKED).write_text(str(inst.proc.pid))
        else:
            self._serve(inst)

    def _serve(self, inst: Instance) -> None:
        kind, name, proc = inst.spec.kind, inst.spec.name, inst.proc

        def status(_):
            if proc.returncode is not None:
                raise RuntimeError("gone")
            st = {"role": "active" if name in ("lb-a", "rt-a", "rt-b") else "standby",
                  "revision": self.revision(), "interfaces": [{}] * len(inst.spec.links),
                  "controllers": {"activity": {"problems": []}}}
            if kind == "router":
                st["haproxy"] = {"alive": True}
            return 200, st
        server = Server(inst.spec.state_dir, {("GET", "/status"): status,
                                              ("GET", "/stats"): lambda _: (200, {"verdicts": {}})})
        server.start()
        self.servers[inst.spec.state_dir] = server

    def assign(self, inst: Instance, links: list[Link], macs: dict[str, str] | None = None) -> None:
        (inst.spec.state_dir / PARKED).unlink()
        inst.spec = InstanceSpec(name="lb-b", kind="balancer", links=links, cpu=inst.spec.cpu,
                                 memory=inst.spec.memory, state_dir=inst.spec.state_dir)
        self._serve(inst)               # the parked daemon has its file: it starts

    def macs(self, inst: Instance) -> dict[str, str]:
        return {}

    def kill(self, inst: Instance, code: int = 1) -> None:
        inst.proc.returncode = code

    def stop(self, inst: Instance, keep_dataplane: bool = False, timeout: float = 15.0) -> None:
        self.destroy(inst)

    def destroy(self, inst: Instance) -> None:
        if inst.proc is not None and inst.proc.returncode is None:
            inst.proc.returncode = -9
        server = self.servers.pop(inst.spec.state_dir, None)
        if server is not None:
            self.stopping.append(threading.Thread(target=server.stop))
            self.stopping[-1].start()

    def usage(self, inst: Instance) -> dict:
        return {"cpu_ns": 0, "memory": 0, "memory_limit": 0}

    def boost(self, inst: Instance, cpu: float | None) -> None:
        pass

    def last_words(self, inst: Instance) -> str:
        return "zfast: error: told to"

    def resize(self, inst: Instance, cpu: float, memory: int) -> None:
        inst.spec.cpu, inst.spec.memory = cpu, memory


def project_raw(domains=("app.example.org",)) -> dict:
    return {
        "project": "unit",
        "services": [{"name": "app", "vip": "10.233.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                      "backends": [{"address": "10.233.0.2"}]}],
        "routing": {"addresses": ["10.232.0.20"],
                    "domains": [{"host": h, "service": "app", "port": 80, "tls": "self-signed"}
                                for h in domains]},
        "core": {"public": {"bridge": "zupub0", "subnet": "10.232.0.0/24"},
                 "private": {"bridge": "zupriv0", "subnet": "10.233.0.0/24",
                             "gateway": "10.233.0.254"},
                 "balancer": {"cpu": 0.5, "memory": "256Mi"},
                 "routers": {"count": 2}},
    }


@pytest.fixture
def svc(tmp_path, monkeypatch):
    monkeypatch.setattr(service_module, "hierarchy_problem", lambda: None)
    monkeypatch.setattr(service_module, "ensure_bridges", lambda bridges: [])
    monkeypatch.setattr(launcher_module, "cached", lambda spec: True)   # no compile
    runtime = FakeRuntime(tmp_path / "cgroup")
    s = CoreService(config.parse(project_raw(), "<test>"), tmp_path / "core", runtime=runtime)
    s.launcher.cgroup = Cgroup(s.prefix, root=tmp_path / "cgroup")
    s.up()
    runtime.revision = lambda: s.store.latest("unit").rev
    yield s
    s.down()
    for thread in runtime.stopping:
        thread.join()


def events(s, action=None):
    out = [e for e in read(s.state_dir) if e.get("kind") == "repair"]
    return [e for e in out if action is None or e.get("action") == action]


def test_up_launches_the_pair_and_the_routers_and_serves_status(svc):
    assert list(svc.instances) == ["lb-a", "lb-b", "rt-a", "rt-b"]
    svc.repair_tick()
    st = Client(svc.state_dir).get("/status")
    assert [(i["name"], i["role"], i["healthy"]) for i in st["instances"]] == [
        ("lb-a", "active", True), ("lb-b", "standby", True),
        ("rt-a", "active", True), ("rt-b", "active", True)]
    assert st["drained"] == [] and st["controllers"] == {"repair": {}, "scaling": {}}
    assert [e["instance"] for e in events(svc, "started")] == ["lb-a", "lb-b", "rt-a", "rt-b"]
    hosts = [c["host"] for c in Client(svc.state_dir).get("/certs")]
    assert hosts == ["app.example.org"]


def test_a_spare_is_parked_then_takes_a_dead_balancer_s_place(svc):
    svc.repair_tick()                         # all well: a spare
    assert svc.launcher.spare is not None and svc.launcher.spare_ready()
    svc.runtime.kill(svc.instances["lb-b"])
    svc.repair_tick()
    [replaced] = events(svc, "replace")
    assert (replaced["instance"], replaced["problems"]) == \
        ("lb-b", ["daemon exited (1): zfast: error: told to"])
    assert [e["instance"] for e in events(svc, "started from the spare")] == ["lb-b"]
    assert svc.launcher.spare is None
    assert svc.repair.decision["action"] == "replace"
    svc.repair_tick()
    assert svc.observer.answered >= {"lb-b"}
    svc.scale_tick()                          # nothing to sample here: no cgroup files


def test_a_router_is_drained_over_ticks_then_replaced_and_back_in_rotation(svc):
    svc.repair_tick()
    rev = svc.store.latest("unit").rev
    svc.runtime.kill(svc.instances["rt-a"])
    svc.repair_tick()                         # replace decided, weight 0 committed
    assert svc.repair.drained == {"rt-a"} and svc.repair.busy
    latest = svc.store.latest("unit")
    assert latest.rev == rev + 1
    weights = {r["address"]: r["weight"] for r in yaml.safe_load(latest.config)["routing"]["routers"]}
    assert sorted(weights.values()) == [0, 1]
    svc.repair_tick()                         # every balancer has it: HAProxy soft stop
    svc.repair_tick()                         # no HAProxy left: the successor
    assert not svc.repair.busy
    [drained] = events(svc, "drained")
    assert drained["instance"] == "rt-a"
    assert [e["instance"] for e in events(svc, "started")][-1] == "rt-a"
    svc.repair_tick()                         # it answers: weight 1 again
    assert svc.repair.drained == set()
    assert svc.store.latest("unit").rev == rev + 2


def test_apply_commits_a_revision_and_refuses_a_core_change(svc):
    rev = svc.store.latest("unit").rev
    raw = project_raw(("app.example.org", "new.example.org"))
    out = Client(svc.state_dir).post("/apply", {"config": yaml.safe_dump(raw), "source": "t.yaml"})
    assert out == {"revision": rev + 1}
    assert svc.renewal.hosts() == {"app.example.org", "new.example.org"}
    raw["core"]["balancer"]["cpu"] = 1
    with pytest.raises(ApiError, match="the core section differs"):
        Client(svc.state_dir).post("/apply", {"config": yaml.safe_dump(raw)})
    with pytest.raises(ApiError, match="is not one of routing.domains"):
        Client(svc.state_dir).post("/certs/renew", {"host": "other.example.org"})


def test_stats_has_every_instance(svc):
    st = Client(svc.state_dir).get("/stats")
    assert sorted(st["instances"]) == ["lb-a", "lb-b", "rt-a", "rt-b"]
    assert st["instances"]["rt-a"]["kind"] == "router"
