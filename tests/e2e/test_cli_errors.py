"""The CLI refuses bad input with one line on stderr, a non-zero exit, and no change.

`zfast up` with a bad file or a missing interface leaves no XDP program and no process in
the balancer's namespace; `zfast apply` of the same files to a running node changes
nothing (status, services, attached programs, where new connections go). Also `stats`
without a node, `attach`/`detach` of a missing interface, attach/detach that works, and
`zfast core up` under `ip netns exec` (no cgroup hierarchy there: one line, nothing made).

One lab for the module; a node runs in it only for the tests that need one. Needs root:
without it every test fails, none skips.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.kit import cli, kernel, lab, oracle, traffic
from zfast.api import ApiError
from zfast.lab import topology
from zfast.paths import pin_dir

WEIGHTS = [1, 1, 2]


@pytest.fixture(scope="module")
def env():
    with lab.lab_env("zfcli", WEIGHTS, start_node=False) as e:
        yield e


@pytest.fixture
def idle(env):
    """No node in the balancer's namespace: nothing attached, nothing running."""
    if env.lab.node_proc is not None:
        code = env.lab.stop_node()
        env.api = None
        assert code == 0, f"zfast up exited {code} on SIGTERM (0 expected)"
    lb = env.lab.lb
    assert kernel.programs_on(lb) == {}, "XDP still attached after the node stopped"
    assert kernel.pids_in(lb) == []
    return env


@pytest.fixture
def running(env):
    if env.lab.node_proc is None:
        env.api = env.lab.start_node()
    return env


# ---------------------------------------------------------------- the bad files

def _bad(base: dict, kind: str) -> tuple[str, list[str]]:
    """(file text, fragments its error must name) of one kind of bad file."""
    p = yaml.safe_load(yaml.safe_dump(base))   # a deep copy
    svc = p["services"][0]
    if kind == "unknown_interface":
        p["node"]["interfaces"][1]["name"] = "nosuch0"   # pub0 exists: all or nothing
        return yaml.safe_dump(p, sort_keys=False), ["nosuch0"]
    if kind == "vip_not_address":
        svc["vip"] = "10.0.0.300"
        return yaml.safe_dump(p, sort_keys=False), ["services.app.vip", "10.0.0.300",
                                                    "not an IP address"]
    if kind == "port_0":
        svc["ports"][0]["port"] = 0
        return yaml.safe_dump(p, sort_keys=False), ["services.app.ports[0].port",
                                                    "0 is not a port"]
    if kind == "port_70000":
        svc["ports"][0]["port"] = 70000
        return yaml.safe_dump(p, sort_keys=False), ["services.app.ports[0].port",
                                                    "70000 is not a port"]
    if kind == "no_backends":
        svc["backends"] = []
        return yaml.safe_dump(p, sort_keys=False), ["services.app.backends", "no backends"]
    if kind == "yaml_syntax":
        text = yaml.safe_dump(p, sort_keys=False).replace("services:", "services: [", 1)
        return text, ["not valid YAML", "line "]
    raise ValueError(kind)


KINDS = ["unknown_interface", "vip_not_address", "port_0", "port_70000", "no_backends",
         "yaml_syntax"]


def _one_line_error(p: subprocess.CompletedProcess, fragments: list[str]) -> str:
    assert p.returncode != 0, f"exit 0; stdout {p.stdout!r} stderr {p.stderr!r}"
    lines = p.stderr.splitlines()
    assert len(lines) == 1, f"not one line on stderr:\n{p.stderr}"
    line = lines[0]
    assert line.startswith("zfast: error: "), line
    assert "Traceback" not in p.stderr
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert p.stdout == "", p.stdout
    return line


def _services(stats: dict) -> list:
    """What the node serves, without its counters."""
    return [(s["name"], s["vip"], sorted((b["address"], b["weight"]) for b in s["backends"]))
            for s in stats["services"]]


# ---------------------------------------------------------------- up

@pytest.mark.parametrize("kind", KINDS)
def test_up_refuses_bad_file(idle, tmp_path, kind):
    env = idle
    text, fragments = _bad(env.lab.project(), kind)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    p = cli.zfast("up", "-c", str(path), ns=env.lab.lb, timeout=60)
    line = _one_line_error(p, fragments)
    print(f"\nup {kind}: {line}")
    assert kernel.programs_on(env.lab.lb) == {}, "zfast up left an XDP program attached"
    assert kernel.pids_in(env.lab.lb) == [], "zfast up left a process behind"
    assert not (env.state_dir / "api.sock").exists()
    assert not pin_dir(env.lab.node_name).exists(), "zfast up left pinned maps behind"


# ---------------------------------------------------------------- apply

@pytest.mark.parametrize("kind", KINDS)
def test_apply_refuses_bad_file(running, tmp_path, kind):
    env = running
    text, fragments = _bad(env.lab.project(), kind)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    status = _steady(env.api.get("/status"))
    served = _services(cli.stats_json(env.state_dir))
    attached = kernel.programs_on(env.lab.lb)
    assert len(attached) == 2

    p = cli.zfast("apply", "-c", str(path), "--state-dir", str(env.state_dir))
    if kind == "unknown_interface":   # a valid file: the node itself refuses it
        fragments = ["interfaces differ"]
    line = _one_line_error(p, fragments)
    print(f"\napply {kind}: {line}")

    # The node refuses the same text sent to its API directly, past the CLI's own check.
    with pytest.raises(ApiError) as refused:
        env.api.post("/apply", {"config": text, "source": str(path)})
    assert refused.value.status in (400, 409), refused.value

    # Nothing changed: status (revision included), services, programs...
    assert _steady(env.api.get("/status")) == status
    status_cli = cli.zfast("status", "--json", "--state-dir", str(env.state_dir))
    assert status_cli.returncode == 0 and _steady(json.loads(status_cli.stdout)) == status
    assert _services(cli.stats_json(env.state_dir)) == served
    assert kernel.programs_on(env.lab.lb) == attached
    # ... and new connections go exactly where the running table sends them.
    for vip, client, backends in ((topology.VIP4, topology.CLIENT4, env.lab.backend4),
                                  (topology.VIP6, topology.CLIENT6, env.lab.backend6)):
        spread = traffic.connections(env.lab.client, vip, topology.TCP_PORT, env.ports.take(100))
        assert not spread.failures, list(spread.failures.items())[:5]
        table = list(zip(backends, WEIGHTS))
        wrong = {port: name for port, name in spread.by_port.items()
                 if env.names[oracle.expected_backend(table, client, port, vip, topology.TCP_PORT)] != name}
        assert not wrong, f"connections that went elsewhere than before: {wrong}"
        assert set(spread.backends) == {"be1", "be2", "be3"}


# ---------------------------------------------------------------- no node, no interface

def test_stats_without_node():
    p = cli.zfast("stats", "--state-dir", "/nonexistent")
    line = _one_line_error(p, ["/nonexistent"])
    print(f"\n{line}")
    assert re.search(r"no zfast node|not running|cannot", line), line


@pytest.mark.parametrize("command", ["attach", "detach"])
def test_attach_detach_unknown_interface(env, command):
    p = cli.zfast(command, "nosuch0", ns=env.lab.client)
    line = _one_line_error(p, ["nosuch0"])
    print(f"\n{command}: {line}")
    assert kernel.programs_on(env.lab.client) == {}


def test_attach_generic_then_detach(env):
    topo = env.lab.topo
    ns = topo.add_ns("att")
    topo.veth(ns, "vx0", ns, "vx1")

    p = cli.zfast("attach", "vx0", "--mode", "generic", ns=ns)
    assert p.returncode == 0, p.stderr
    m = re.search(r"prog (\d+)\b.*\bgeneric\b", p.stdout)
    assert m, p.stdout
    prog = int(m.group(1))
    assert prog > 0
    assert kernel.programs_on(ns) == {"vx0": prog}
    link = json.loads(subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", "vx0"],
                                     capture_output=True, text=True, check=True).stdout)[0]
    assert link["xdp"]["mode"] == 2, link["xdp"]          # XDP_ATTACHED_SKB: generic
    assert kernel.pids_in(ns) == [], "attach left a process running"
    # it stays attached without a process: ip link shows it, bpftool knows the id
    assert str(prog) in subprocess.run(["bpftool", "prog", "show", "id", str(prog)],
                                       capture_output=True, text=True).stdout

    p = cli.zfast("detach", "vx0", ns=ns)
    assert p.returncode == 0, p.stderr
    assert str(prog) in p.stdout, p.stdout
    assert kernel.programs_on(ns) == {}
    p = cli.zfast("detach", "vx0", ns=ns)       # again: nothing to do, not an error
    assert p.returncode == 0 and "no XDP program" in p.stdout, (p.stdout, p.stderr)


# ---------------------------------------------------------------- core up without cgroups

CORE_PROJECT = "zfclicore"


def _core_project() -> dict:
    return {
        "project": CORE_PROJECT,
        "services": [{"name": "app", "vip": "10.237.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                      "backends": [{"address": "10.237.0.2"}]}],
        "core": {"public": {"bridge": "zclipub0", "subnet": "10.236.0.0/24"},
                 "private": {"bridge": "zclipriv0", "subnet": "10.237.0.0/24",
                             "gateway": "10.237.0.254"},
                 "balancer": {"cpu": 0.5, "memory": "256Mi"}},
    }


def test_core_up_under_ip_netns_exec_says_there_is_no_cgroup_hierarchy(env, tmp_path):
    """`ip netns exec` mounts a fresh sysfs, whose /sys/fs/cgroup is empty: `zfast core up`
    there says so in one line, and what to do, before it makes anything (no state dir, no
    key, no bridge, no instance namespace, no cgroup)."""
    ns = env.lab.topo.add_ns("coreup")
    cfg = tmp_path / "core.yaml"
    cfg.write_text(yaml.safe_dump(_core_project(), sort_keys=False))
    state = tmp_path / "state"
    prefix = f"zfc-{CORE_PROJECT}"[:20]
    cgroups = [Path("/sys/fs/cgroup") / c / "zfast" / prefix for c in ("", "cpu", "cpuacct", "memory")]
    assert not any(p.exists() for p in cgroups), "a cgroup of an earlier run is in the way"

    p = cli.zfast("core", "up", "-c", str(cfg), "--state-dir", str(state), ns=ns, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stderr)
    line = _one_line_error(p, ["no cgroup hierarchy at /sys/fs/cgroup", "ip netns exec",
                               f"nsenter --net=/var/run/netns/{ns}"])
    print(f"\ncore up: {line}")
    assert not state.exists(), f"core up left {sorted(state.rglob('*'))}"
    links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True,
                                      text=True, check=True).stdout)
    assert [link["ifname"] for link in links] == ["lo"], f"core up left links: {links}"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout
    assert prefix not in left, f"core up left instances: {left}"
    assert not [str(p) for p in cgroups if p.exists()], "core up left a cgroup"
    assert kernel.pids_in(ns) == [], "core up left a process behind"


def _steady(status: dict) -> dict:
    """Status without what moves by itself (the store's last contact time, the statistics
    controller's ticks, the logger's counts)."""
    status = dict(status)
    if status.get("store"):
        status["store"] = {k: v for k, v in status["store"].items() if k != "last_ok"}
    status["controllers"] = {k: v for k, v in (status.get("controllers") or {}).items()
                             if k not in ("statistics", "logger", "health")}
    return status
