"""The control daemon end to end: declarative applies that never break a connection, a
daemon killed with SIGKILL while traffic flows, bad files that change nothing, and the
history/rollback commands. One lab for the module (client, one node on the default SQLite
store, a pool of four backends); every test leaves it with the base file applied.

Needs root: without it every test fails, none skips.

"Broken" and "moved" are judged by probe.Stream: each stream is one TCP connection that
echoes numbered lines; a packet of it sent to another backend would meet no socket there
and reset it, so a stream that keeps echoing is still on the connection it opened. The
pinned flows map (read with bpftool) says the same from the node's side.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import time

import pytest
import yaml

from tests.e2e.kit import cli, kernel, lab, maps, oracle, traffic
from zfast.api import ApiError
from zfast.lab import topology
from zfast.lab.probe import Stream, streams_alive

POOL_WEIGHTS = [1, 1, 2, 1]          # the pool of four backends, and the base file's weights
FAMILIES = ((topology.VIP4, topology.CLIENT4, 0, "app"), (topology.VIP6, topology.CLIENT6, 1, "app6"))


@pytest.fixture(scope="module")
def env():
    with lab.lab_env("zfdmn", POOL_WEIGHTS) as e:
        yield e


# ---------------------------------------------------------------- helpers

def project(env, chosen: dict[int, int]) -> dict:
    """The lab's file with backends {backend number: weight}."""
    weights = [chosen.get(i, 0) for i in range(len(POOL_WEIGHTS))]
    return env.lab.project(weights=weights, backends=sorted(chosen))


def base(env) -> dict:
    return env.lab.project()


def text_of(p: dict) -> str:
    return yaml.safe_dump(p, sort_keys=False)


def cli_apply(env, p: dict, name: str):
    path = env.lab.write_config(p, env.state_dir / name)
    return cli.zfast("apply", "-c", str(path), "--state-dir", str(env.state_dir))


def api_apply(env, p: dict) -> dict:
    return env.api.post("/apply", {"config": text_of(p), "source": "test_daemon"})


def verdicts(env) -> dict[str, int]:
    return {k: v["packets"] for k, v in cli.stats_json(env.state_dir)["verdicts"].items()}


def check_new_connections(env, chosen: dict[int, int], count: int = 100) -> dict:
    """New connections on both VIPs go exactly where the table of `chosen` says."""
    seen = {}
    for vip, client, fam, _ in FAMILIES:
        spread = traffic.connections(env.lab.client, vip, topology.TCP_PORT, env.ports.take(count))
        assert not spread.failures, list(spread.failures.items())[:5]
        table = [(topology.backend_addrs(i)[fam], w) for i, w in sorted(chosen.items())]
        wrong = {}
        for port, name in spread.by_port.items():
            want = env.names[oracle.expected_backend(table, client, port, vip, topology.TCP_PORT)]
            if want != name:
                wrong[port] = (name, want)
        assert not wrong, f"{vip}: connections off the table (port: (got, want)): {wrong}"
        live = {f"be{i + 1}" for i, w in chosen.items() if w > 0}
        assert set(spread.backends) <= live, (dict(spread.backends), live)
        seen[vip] = dict(sorted(spread.backends.items()))
    return seen


def open_streams(env, per_family: int) -> list[Stream]:
    streams = []
    for vip, *_ in FAMILIES:
        streams += [Stream(env.lab.client, vip, topology.TCP_PORT, timeout=10) for _ in range(per_family)]
    return streams


def stream_key(s: Stream) -> tuple:
    """(client address, client port, VIP, port) as the flows map keys it."""
    local, peer = s.sock.getsockname(), s.sock.getpeername()
    return (str(ipaddress.ip_address(local[0])), local[1],
            str(ipaddress.ip_address(peer[0])), peer[1])


def flow_of_streams(env, streams: list[Stream]) -> dict[tuple, str]:
    """Each stream's backend name, as its forward flow entry in the pinned map says."""
    flows = maps.flow_backends(env.lab.node_name)
    return {stream_key(s): env.names.get(flows.get(stream_key(s)), "<no flow entry>")
            for s in streams}



def broken(streams):
    return [(s.backend, s.error) for s in streams if s.error]


# ---------------------------------------------------------------- 4: bad files change nothing

def _bad_files(p: dict) -> dict[str, tuple[dict, list[str]]]:
    """kind -> (file, the fragments of each problem it must report, one per problem)."""
    def copy():
        return yaml.safe_load(yaml.safe_dump(p))

    out = {}
    f = copy()
    f["servics"] = []
    f["services"][0]["backend"] = []
    f["services"][0]["backends"][1]["wieght"] = 2
    out["unknown_fields"] = (f, ["servics: unknown field",
                                 "services.app.backend: unknown field",
                                 "services.app.backends[1].wieght: unknown field"])
    f = copy()
    f["services"][0]["ports"] = "80"
    f["services"][0]["backends"][0]["weight"] = "heavy"
    f["services"][1]["vip"] = 12345
    f["datapath"]["flow_table"] = "big"
    out["wrong_types"] = (f, ['services.app.ports: "80" is not a list',
                              'services.app.backends[0].weight: "heavy" is not an integer',
                              "services.app6.vip: 12345 is not an IP address",
                              'datapath.flow_table: "big" is not an integer'])
    f = copy()
    f["services"][1]["name"] = "app"
    out["duplicate_names"] = (f, ['services[1].name: "app" is already the name of services[0]'])
    f = copy()
    f["services"][0]["ports"][0]["port"] = 70000
    f["services"][0]["ports"][1]["target_port"] = 0
    f["services"][1]["ports"][0]["port"] = -1
    out["port_ranges"] = (f, ["services.app.ports[0].port: 70000 is not a port (1-65535)",
                              "services.app.ports[1].target_port: 0 is not a port (1-65535)",
                              "services.app6.ports[0].port: -1 is not a port (1-65535)"])
    f = copy()
    f["services"].append({"name": "dup", "vip": topology.VIP4,
                          "ports": [{"port": topology.TCP_PORT, "proto": "tcp"}],
                          "backends": [{"address": topology.backend_addrs(0)[0]}]})
    f["public_ports"] = [{"port": topology.UDP_PORT, "proto": "udp", "address": topology.VIP4,
                          "service": "app"}]
    out["vip_collisions"] = (f, [f'services.dup.ports[0]: "{topology.VIP4}:80/tcp" is already '
                                 "served by services.app.ports[0]",
                                 f'public_ports[0]: "{topology.VIP4}:53/udp" is already a port of '
                                 "services.app"])
    f = copy()
    f["services"][0]["backends"].append(dict(f["services"][0]["backends"][0]))
    f["services"][1]["backends"].append(dict(f["services"][1]["backends"][2]))
    n4, n6 = len(f["services"][0]["backends"]) - 1, len(f["services"][1]["backends"]) - 1
    out["backend_twice"] = (f, [f"services.app.backends[{n4}].address: "
                                f'"{topology.backend_addrs(0)[0]}" is already services.app.backends[0]',
                                f"services.app6.backends[{n6}].address: "
                                f'"{topology.backend_addrs(2)[1]}" is already services.app6.backends[2]'])
    # All of it in one file: every problem is listed, not just the first.
    f = copy()
    everything = []
    for kind in ("unknown_fields", "port_ranges", "backend_twice"):
        everything += out[kind][1]
    f["servics"] = []
    f["services"][0]["backend"] = []
    f["services"][0]["backends"][1]["wieght"] = 2
    f["services"][0]["ports"][0]["port"] = 70000
    f["services"][0]["ports"][1]["target_port"] = 0
    f["services"][1]["ports"][0]["port"] = -1
    f["services"][0]["backends"].append(dict(f["services"][0]["backends"][0]))
    f["services"][1]["backends"].append(dict(f["services"][1]["backends"][2]))
    f["services"].append({"name": "dup", "vip": topology.VIP4,
                          "ports": [{"port": topology.TCP_PORT, "proto": "tcp"}],
                          "backends": [{"address": topology.backend_addrs(0)[0]}]})
    # app's first port is 70000 now (not a listener): dup collides with its second one
    f["services"][-1]["ports"] = [{"port": topology.UDP_PORT, "proto": "udp"}]
    everything.append(f'services.dup.ports[0]: "{topology.VIP4}:53/udp" is already served by '
                      "services.app.ports[1]")
    out["everything"] = (f, everything)
    return out


BAD_KINDS = ["unknown_fields", "wrong_types", "duplicate_names", "port_ranges",
             "vip_collisions", "backend_twice", "everything"]


def _node_state(env) -> tuple:
    st = env.api.get("/status")
    hist = env.api.get("/history")
    return (st["revision"], [h["rev"] for h in hist], maps.maps_state(env.lab.node_name),
            kernel.programs_on(env.lab.lb))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_lists_every_problem_and_changes_nothing(env, tmp_path, kind):
    f, fragments = _bad_files(base(env))[kind]
    before = _node_state(env)
    assert before[2]["services"] and before[2]["backends"], "the maps hold nothing to compare"

    # through the CLI: exit non-zero, one line, every problem in it
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text_of(f))
    p = cli.zfast("apply", "-c", str(path), "--state-dir", str(env.state_dir))
    assert p.returncode != 0, (p.stdout, p.stderr)
    assert p.stdout == "" and "Traceback" not in p.stderr, (p.stdout, p.stderr)
    assert p.stderr.startswith("zfast: error: "), p.stderr
    missing = [frag for frag in fragments if frag not in p.stderr]
    assert not missing, f"not reported: {missing}\nstderr: {p.stderr}"
    print(f"\n{kind}: {p.stderr.strip()}")

    # through the API, past the CLI's own check: 400 with the complete list
    with pytest.raises(ApiError) as refused:
        env.api.post("/apply", {"config": text_of(f), "source": str(path)})
    problems = refused.value.problems
    assert refused.value.status == 400, refused.value
    assert len(problems) == len(fragments), (fragments, problems)
    for frag in fragments:
        assert sum(frag in line for line in problems) == 1, (frag, problems)

    after = _node_state(env)
    assert after[0] == before[0], "the revision changed"
    assert after[1] == before[1], "history changed"
    for name in maps.STATE_MAPS:
        assert after[2][name] == before[2][name], f"map {name} changed"
    assert after[3] == before[3], "XDP programs changed"


def _refused_by_node(p: dict, kind: str) -> tuple[dict, str]:
    f = yaml.safe_load(yaml.safe_dump(p))
    f["services"][0]["backends"] = f["services"][0]["backends"][:1]   # a change, if taken
    if kind == "other_node":
        f["node"]["name"] = "not-this-one"
        return f, "this node is"
    if kind == "other_project":
        f["project"] = "elsewhere"
        return f, "for project 'elsewhere'"
    if kind == "datapath_sizes":
        f["datapath"]["flow_table"] = 131072
        return f, "datapath sizes differ"
    if kind == "interfaces":
        f["node"]["interfaces"] = f["node"]["interfaces"][:1]
        return f, "interfaces differ"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["other_node", "other_project", "datapath_sizes", "interfaces"])
def test_valid_file_the_node_cannot_take_changes_nothing(env, tmp_path, kind):
    f, fragment = _refused_by_node(base(env), kind)
    before = _node_state(env)
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text_of(f))
    p = cli.zfast("apply", "-c", str(path), "--state-dir", str(env.state_dir))
    assert p.returncode != 0 and fragment in p.stderr, (p.returncode, p.stderr)
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    print(f"\n{kind}: {p.stderr.strip()}")
    after = _node_state(env)
    assert after[:2] == before[:2]
    for name in maps.STATE_MAPS:
        assert after[2][name] == before[2][name], f"map {name} changed"


# ---------------------------------------------------------------- history and rollback

def test_history_and_rollback_through_the_cli(env):
    sd = ["--state-dir", str(env.state_dir)]
    first = env.api.get("/status")["revision"]
    only12, only34 = {0: 1, 1: 2}, {2: 1, 3: 3}
    p = cli_apply(env, project(env, only12), "only12.yaml")
    assert p.returncode == 0, p.stderr
    rev12 = env.api.get("/status")["revision"]
    p = cli_apply(env, project(env, only34), "only34.yaml")
    assert p.returncode == 0, p.stderr
    rev34 = env.api.get("/status")["revision"]
    assert first < rev12 < rev34
    check_new_connections(env, only34)

    p = cli.zfast("history", "--json", *sd)
    assert p.returncode == 0, p.stderr
    hist = json.loads(p.stdout)
    revs = [h["rev"] for h in hist]
    assert revs == sorted(revs, reverse=True) and revs[0] == rev34, revs
    by_rev = {h["rev"]: h for h in hist}
    assert {first, rev12, rev34} <= set(by_rev)
    assert [h["rev"] for h in hist if h["applied"]] == [rev34]
    assert by_rev[rev34]["source"].endswith("only34.yaml"), by_rev[rev34]
    assert any("backends" in line for line in by_rev[rev34]["changes"]), by_rev[rev34]
    assert "@" in by_rev[rev34]["who"], by_rev[rev34]   # user@host of the CLI
    p = cli.zfast("history", *sd)
    assert p.returncode == 0, p.stderr
    marked = [line for line in p.stdout.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and f"{rev34}" in marked[0], p.stdout
    print(f"\nzfast history:\n{p.stdout}")

    # roll back to the two-backend revision: a new revision, new connections follow it
    p = cli.zfast("rollback", str(rev12), *sd)
    assert p.returncode == 0, p.stderr
    st = env.api.get("/status")
    assert st["revision"] == rev34 + 1, st
    assert p.stdout.startswith(f"revision {rev34 + 1}:"), p.stdout
    print(f"zfast rollback {rev12}: {p.stdout.strip()}")
    seen = check_new_connections(env, only12)
    assert all(set(s) == {"be1", "be2"} for s in seen.values()), seen
    hist = json.loads(cli.zfast("history", "--json", *sd).stdout)
    assert hist[0]["rev"] == rev34 + 1 and hist[0]["source"] == f"rollback to {rev12}", hist[0]
    assert hist[0]["applied"]

    # a revision that does not exist: an error, nothing changes
    before = _node_state(env)
    p = cli.zfast("rollback", "9999", *sd)
    assert p.returncode != 0 and "9999" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert _node_state(env)[:3] == before[:3]

    # back to the file `zfast up` started with
    p = cli.zfast("rollback", str(first), *sd)
    assert p.returncode == 0, p.stderr
    seen = check_new_connections(env, dict(enumerate(POOL_WEIGHTS)))
    assert all(set(s) == {"be1", "be2", "be3", "be4"} for s in seen.values()), seen


# ---------------------------------------------------------------- 1: 100 applies, 200 streams

def _plans(rng: random.Random, count: int) -> list[dict[int, int]]:
    """count different backend sets, each a change from the one before."""
    plans, prev = [], dict(enumerate(POOL_WEIGHTS))
    while len(plans) < count:
        chosen = rng.sample(range(len(POOL_WEIGHTS)), rng.randint(1, len(POOL_WEIGHTS)))
        plan = {i: rng.randint(0, 3) for i in sorted(chosen)}
        if len(plans) in (37, 71):             # now and then no backend takes new flows
            plan = {i: 0 for i in plan}
        if plan != prev:
            plans.append(plan)
            prev = plan
    return plans


def test_100_applies_while_200_streams_flow(env):
    t_start = time.monotonic()
    streams = open_streams(env, 100)
    try:
        on = {s.backend for s in streams}
        assert on == {"be1", "be2", "be3", "be4"}, on
        assert not streams_alive(streams, rounds=2)
        flows_before = flow_of_streams(env, streams)
        assert all(flows_before[stream_key(s)] == s.backend for s in streams), \
            "a stream's flow entry does not name the backend that answered it"
        rev0 = env.api.get("/status")["revision"]
        time.sleep(0.5)                       # the last ACKs of the handshakes are in
        v0 = verdicts(env)
        plans = _plans(random.Random(20261125), 100)
        api_times, cli_times = [], []
        with traffic.Pinger(streams) as pinger:   # round after round
            pinger.wait_rounds(1)
            for n, plan in enumerate(plans):
                t = time.monotonic()
                if n % 10 == 9:               # one in ten through `zfast apply` (a process)
                    p = cli_apply(env, project(env, plan), f"step{n}.yaml")
                    assert p.returncode == 0, f"apply {n} {plan}: {p.stderr}"
                    cli_times.append(time.monotonic() - t)
                else:
                    result = api_apply(env, project(env, plan))
                    assert result["changes"], f"apply {n} {plan} changed nothing"
                    api_times.append(time.monotonic() - t)
                assert not broken(streams), (n, plan, broken(streams)[:5])
                pinger.wait_rounds(1)         # every stream echoed after this apply
            rounds = pinger.rounds
        assert not broken(streams), broken(streams)[:5]
        assert not streams_alive(streams, rounds=2)
        time.sleep(0.5)
        v1 = verdicts(env)
        elapsed = time.monotonic() - t_start

        # every apply is a revision, and the node holds the last
        assert env.api.get("/status")["revision"] == rev0 + len(plans)
        # not moved: every stream's flow entry still names the backend it connected to
        flows_after = flow_of_streams(env, streams)
        moved = {k: (flows_before[k], flows_after[k]) for k in flows_before
                 if flows_after[k] != flows_before[k]}
        assert not moved, f"{len(moved)} flow entries changed backend: {list(moved.items())[:5]}"
        assert min(s.sent for s in streams) >= len(plans) + 2

        # no state was lost: no stream packet was balanced afresh (no new connection was
        # opened: fwd_new may not move), none passed to the kernel for lack of a flow, no drop
        delta = {k: v1.get(k, 0) - v0.get(k, 0) for k in v1}
        print(f"\n{len(plans)} applies ({len(api_times)} API, {len(cli_times)} CLI) under "
              f"{len(streams)} streams, {rounds} ping rounds, {sum(s.sent for s in streams)} "
              f"echoes, {elapsed:.1f} s in all")
        print(f"API apply: mean {1000 * sum(api_times) / len(api_times):.0f} ms, "
              f"max {1000 * max(api_times):.0f} ms ({len(api_times) / sum(api_times):.1f}/s); "
              f"CLI apply: mean {1000 * sum(cli_times) / len(cli_times):.0f} ms")
        print(f"verdict deltas: { {k: v for k, v in delta.items() if v} }")
        assert delta.get("fwd_new", 0) == 0, delta
        grown = {k: v for k, v in delta.items() if k.startswith("drop_") and v}
        assert not grown, f"drops during the applies: {grown}"
        echoes = sum(s.sent for s in streams)
        assert delta["fwd_flow"] >= echoes - 2 * len(streams) * 2, (delta, echoes)
        assert delta["fwd_reply"] >= echoes - 2 * len(streams) * 2, (delta, echoes)
        # passed for lack of state: a stream's packet (or its backend's answer) without its
        # entry would be passed to the kernel -- and the stream reset. What does pass here is
        # IPv6 neighbour discovery between the namespaces, a few packets a second at most.
        assert delta.get("pass_no_service", 0) <= 50 + 3 * elapsed, delta

        # the maps did change: new connections follow the last file exactly
        last = plans[-1]
        if any(last.values()):
            check_new_connections(env, last)
    finally:
        for s in streams:
            s.close()
        api_apply(env, base(env))
    check_new_connections(env, dict(enumerate(POOL_WEIGHTS)))


# ---------------------------------------------------------------- 2: kill -9 of the daemon

def test_kill9_keeps_forwarding_and_restart_adopts(env):
    node = env.lab.node_name
    full = dict(enumerate(POOL_WEIGHTS))
    streams = open_streams(env, 50)
    try:
        assert not streams_alive(streams)
        st0 = env.api.get("/status")
        attached = kernel.programs_on(env.lab.lb)
        assert len(attached) == 2
        time.sleep(0.3)
        stats0 = cli.stats_json(env.state_dir)
        with traffic.Pinger(streams) as pinger:   # round after round
            pinger.wait_rounds(1)
            pid = env.lab.node_proc.pid
            lock_pid = int((env.state_dir / "node.lock").read_text().split()[0])
            assert lock_pid == pid, (lock_pid, pid)
            os.kill(pid, signal.SIGKILL)
            env.lab.node_proc.wait(30)
            env.lab.node_proc = None
            t_dead = time.monotonic()
            with pytest.raises(ApiError):
                env.api.get("/status")

            # no daemon: the programs stay, streams echo, new connections are balanced
            assert kernel.programs_on(env.lab.lb) == attached
            c_dead0 = maps.reason_counters(node)
            pinger.wait_rounds(3)
            assert not broken(streams), broken(streams)[:5]
            check_new_connections(env, full)
            assert not broken(streams), broken(streams)[:5]
            c_dead1 = maps.reason_counters(node)
            assert c_dead1["fwd_flow"] > c_dead0["fwd_flow"], "nothing forwarded without a daemon"
            assert c_dead1["fwd_new"] >= c_dead0["fwd_new"] + 200
            rounds_dead = pinger.rounds

            # a new daemon adopts the pinned maps
            t_up = time.monotonic()
            env.api = env.lab.start_node()
            t_ready = time.monotonic()
            st1 = env.api.get("/status")
            assert st1["adopted"] is True, st1
            assert st1["revision"] == st0["revision"], (st0["revision"], st1["revision"])
            assert st1["pin_dir"] == st0["pin_dir"]
            assert set(kernel.programs_on(env.lab.lb)) == set(attached)
            pinger.wait_rounds(2)
            assert not broken(streams), broken(streams)[:5]
            rounds_total = pinger.rounds
        assert not streams_alive(streams, rounds=2)
        print(f"\nno daemon for {t_ready - t_dead:.1f} s ({t_ready - t_up:.1f} s of it the new "
              f"`zfast up`): {rounds_dead} ping rounds by then, {rounds_total} in all, "
              f"0 of {len(streams)} streams broken")

        # counters continue: nothing restarted from zero
        time.sleep(0.3)
        stats1 = cli.stats_json(env.state_dir)
        for name, v in stats0["verdicts"].items():
            assert stats1["verdicts"][name]["packets"] >= v["packets"], name
        assert stats1["verdicts"]["fwd_flow"]["packets"] > stats0["verdicts"]["fwd_flow"]["packets"]
        before_svc = {s["name"]: s["packets"] for s in stats0["services"]}
        for s in stats1["services"]:
            assert s["packets"] > before_svc[s["name"]], (s["name"], before_svc, s["packets"])
        grown = {k: stats1["drops"][k] - stats0["drops"].get(k, 0) for k in stats1["drops"]
                 if stats1["drops"][k] - stats0["drops"].get(k, 0)}
        assert not grown, grown

        # the adopted node still applies and balances
        check_new_connections(env, full)
        api_apply(env, project(env, {1: 1, 2: 1}))
        check_new_connections(env, {1: 1, 2: 1})
        assert not streams_alive(streams)
    finally:
        for s in streams:
            s.close()
        if env.lab.node_proc is None:
            env.api = env.lab.start_node()
        api_apply(env, base(env))
