"""The active/standby pair end to end: two balancer nodes (namespaces lba, lbb) share the
client's segment and the backends' segment through bridges, with a sync veth between them
(zfast.lab.topology.build_pair). Heartbeats every 50 ms, dead after 3.

  * the active dies (SIGKILL, links down): 50 TCP streams (VIP4 and VIP6) and two UDP flows
    continue, no reset, no duplicate, the gap in delivery measured per stream;
  * the killed node comes back as standby (no preemption), gets the whole flow table, and
    the streams survive the death of the other one too (failback);
  * the active only degrades: XDP detached (the activity controller notices), or the daemon
    SIGSTOPped (its lease runs out, it stops answering ARP; after SIGCONT it is standby, and
    both said "active" for less than a heartbeat);
  * forged and replayed heartbeats are counted and change nothing; key files that are
    missing, short or different are clear errors;
  * the sync link down: heartbeats go over the private network, nothing changes; every path
    down: two actives until they hear each other, then the higher priority stays and takes
    the addresses back;
  * `zfast status --json` and `zfast logs --json` show all of it.

One lab for the module; each test starts from a settled pair (restarting what an earlier
test left dead or degraded). Needs root: without it every test fails, none skips.
Measurements (gaps, overlaps) are printed: run with -s to see them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import yaml

from tests.e2e.kit.cli import zfast
from tests.e2e.kit.kernel import detach_program, mac_of, neighbour, programs_on
from tests.e2e.kit.maps import forward_flows
from tests.e2e.kit.pair import HA_PORT, RoleWatch, open_streams, pair_env
from tests.e2e.kit.traffic import Pinger, UdpFlow, send_udp, summary
from tests.e2e.kit.wire import BackendTap, HeartbeatTap, arp_answers
from zfast.events import parse_time
from zfast.ha.heartbeat import Heartbeat, Sender, encode, load_key
from zfast.lab import topology
from zfast.paths import pin_dir

HB_MS = 50
HB = HB_MS / 1000
DEAD = 3 * HB
STREAMS = 50
GAP_MEDIAN_MAX = 0.300        # the acceptance bound on the median gap, at a 50 ms heartbeat


@pytest.fixture(scope="module")
def env():
    with pair_env("zfpr", heartbeat_ms=HB_MS) as e:
        yield e


def settle(env) -> int:
    """Both daemons running and healthy, one active, replication connected: the active's
    index. Restarts whatever an earlier test left dead or degraded."""
    for i in range(2):
        st = env.status(i) if env.alive(i) else None
        if st is None or not st["controllers"]["activity"]["healthy"]:
            env.restart(i)
    return env.wait_pair()


def stream_pinger(streams) -> Pinger:
    """Every stream pinged from a thread of its own, 20 ms apart: a stream stalled by the
    failover delays no other, so each stream's gap is its own."""
    return Pinger(streams, pause=0.02, timeout=30.0, thread_per_stream=True)


def report(name: str, **values) -> None:
    print(f"\n[pair] {name}: " + json.dumps(values, default=str))


def udp_report(flow: UdpFlow, tap: BackendTap, after: float) -> dict:
    return flow.report(after) | tap.judge(flow)


def check_udp(rep: dict, what: str) -> None:
    """No duplicate, nothing lost but inside the gap, one backend; no reordering by the
    balancer. The echo server answers each datagram on a thread of its own, so it may swap
    two answers when the machine is busy (echo_swaps): the backend's order of requests is
    checked against the order sent, the client's order of answers against the backend's."""
    assert rep["bad"] == 0 and rep["duplicates"] == 0, f"{what}: {rep}"
    assert rep["to_backend_swaps"] == 0 and rep["to_backend_dups"] == 0, \
        f"{what}: datagrams reached the backend out of order or twice: {rep}"
    assert rep["return_swaps_unexplained"] == [], f"{what}: answers reordered on the way back: {rep}"
    assert len(rep["backends"]) == 1, f"{what}: the flow moved between backends: {rep}"
    assert rep.get("lost_outside", []) == [], f"{what}: lost outside the failover gap: {rep}"
    assert rep["seen_at_backend"] >= rep["sent"] - rep["lost"] - 2, rep


def check_streams(pinger: Pinger, t_fail: float, what: str) -> dict:
    broken = pinger.broken()
    assert not broken, f"{what}: {len(broken)} streams broke: {broken[:5]}"
    gaps = pinger.gaps_after(t_fail)
    s = summary(gaps)
    assert all(g < 5 for g in gaps), f"{what}: a stream stalled: {s}"
    return s


def role_events(env, i: int) -> list[dict]:
    return env.events(i, "role")


# ---------------------------------------------------------------- 1. the active dies

def test_active_dies_streams_and_udp_continue(env):
    a = settle(env)
    b = 1 - a
    received0 = env.status(b)["peer"]["replication"]["receiving"]["received"]
    streams = open_streams(env, STREAMS)
    try:
        env.wait_replicated(b, received0 + STREAMS)
        with BackendTap(env) as tap, stream_pinger(streams) as pinger, \
                UdpFlow(env.lab.client, topology.VIP4) as u4, UdpFlow(env.lab.client, topology.VIP6) as u6, \
                RoleWatch(env) as watch:
            pinger.wait_rounds(5)
            time.sleep(0.3)
            t_kill = time.monotonic()
            env.lab.kill(a)
            env.lab.wait_role(b, "active")
            pinger.wait_rounds(10)
            time.sleep(0.2)
        r4, r6 = udp_report(u4, tap, t_kill), udp_report(u6, tap, t_kill)
        gaps = check_streams(pinger, t_kill, "active killed")
        took = watch.first(b, "active", t_kill) - t_kill
        report("kill", gaps=gaps, takeover_s=round(took, 3), udp4=r4, udp6=r6,
               per_stream_ms=sorted(round(g * 1000) for g in pinger.gaps_after(t_kill)))
        check_udp(r4, "UDP over VIP4")
        check_udp(r6, "UDP over VIP6")
        assert gaps["median_ms"] < GAP_MEDIAN_MAX * 1000, f"median gap {gaps}"
        # the standby decided on silence, once
        st = env.status(b)
        assert st["role"] == "active" and st["peer"]["state"] == "dead"
        last = role_events(env, b)[-1]
        assert (last["old"], last["new"]) == ("standby", "active") and "silent" in last["reason"]
        assert watch.both_active(t_kill) == []
    finally:
        for s in streams:
            s.close()


# ---------------------------------------------------------------- 3. failback

def test_killed_node_returns_as_standby_gets_the_flows_and_failback_works(env):
    # From a pair with one node dead (what test 1 leaves; made here if run alone).
    if env.alive(0) and env.alive(1):
        a = settle(env)
        env.lab.kill(a)
        env.lab.wait_role(1 - a, "active")
    x = 0 if not env.alive(0) else 1              # the dead one
    y = 1 - x
    assert env.roles()[y] == "active"
    streams = open_streams(env, STREAMS)
    try:
        with BackendTap(env) as tap, stream_pinger(streams) as pinger, \
                UdpFlow(env.lab.client, topology.VIP4) as u4, RoleWatch(env) as watch:
            pinger.wait_rounds(3)
            t_back = time.monotonic()
            env.restart(x)                       # links up, `zfast up` again
            env.lab.wait_role(x, "standby")
            a = env.wait_pair()
            assert a == y, "the returning node took over (preemption)"
            live = forward_flows(env.name(y))
            rec = env.wait_replicated(x, live)
            pinger.wait_rounds(5)
            rejoin_gaps = check_streams(pinger, t_back, "node rejoining")
            x_roles, y_roles = watch.roles_since(x, t_back), watch.roles_since(y, t_back)
            assert "active" not in x_roles, f"{env.name(x)} said active while rejoining"
            assert y_roles == {"active"}, f"{env.name(y)} changed role: {watch.changes(y, t_back)}"
            events = role_events(env, x)
            assert (events[-1]["old"], events[-1]["new"]) == ("init", "standby")

            # now the other one dies: failing back
            t_kill = time.monotonic()
            env.lab.kill(y)
            env.lab.wait_role(x, "active")
            pinger.wait_rounds(10)
            time.sleep(0.2)
        r4 = udp_report(u4, tap, t_kill)
        gaps = check_streams(pinger, t_kill, "failback")
        took = watch.first(x, "active", t_kill) - t_kill
        report("failback", rejoin_gaps=rejoin_gaps, live_flows=live, received=rec["received"],
               gaps=gaps, takeover_s=round(took, 3), udp4=r4)
        assert rec["received"] >= live >= STREAMS
        check_udp(r4, "UDP over VIP4, failback")
        assert gaps["median_ms"] < GAP_MEDIAN_MAX * 1000, f"median gap {gaps}"
    finally:
        for s in streams:
            s.close()


# ---------------------------------------------------------------- 2a. program detached

@pytest.mark.parametrize("how", ["filter", "clsact"])  # tc filter del / tc qdisc del clsact
def test_program_detached_on_the_active_the_standby_takes_over(env, how):
    a = settle(env)
    b = 1 - a
    streams = open_streams(env, STREAMS)
    try:
        env.wait_replicated(b, STREAMS)
        with BackendTap(env) as tap, stream_pinger(streams) as pinger, \
                UdpFlow(env.lab.client, topology.VIP6) as u6, RoleWatch(env) as watch:
            pinger.wait_rounds(5)
            t_off = time.monotonic()
            detach_program(env.lab.nodes[a].ns, "pub0", how)
            env.lab.wait_role(b, "active")
            env.lab.wait_role(a, "standby")
            pinger.wait_rounds(10)
            time.sleep(0.2)
        r6 = udp_report(u6, tap, t_off)
        took = watch.first(b, "active", t_off) - t_off
        gaps = check_streams(pinger, t_off, "XDP detached")
        overlap = [round(e - s, 3) for s, e in watch.both_active(t_off)]
        report("xdp-off", gaps=gaps, takeover_s=round(took, 3), udp6=r6, both_active_s=overlap)
        st = env.status(a)
        assert st["controllers"]["activity"]["healthy"] is False
        assert "zfast is not attached to pub0" in st["controllers"]["activity"]["problems"]
        assert env.status(b)["peer"]["healthy"] is False
        assert sum(overlap) <= HB, f"both active for {overlap} s"
        # exactly one transition each: no flapping
        assert [(e["old"], e["new"]) for e in role_events(env, a)][-1] == ("active", "standby")
        assert watch.changes(b, t_off - 0.1) == ["standby", "active"], watch.transitions(b)
        assert watch.changes(a, t_off - 0.1) == ["active", "standby"], watch.transitions(a)
        # UDP order is not kept across this takeover, and cannot be: with its program gone,
        # the old active's kernel still gets the VIP's datagrams (the client's neighbour
        # entry points at it until the new active's unsolicited NA) and forwards them
        # (forwarding is on: zfast hands some egress to it), holding them until the VIP
        # resolves to the new active. They then race the first datagrams the client sends
        # straight there (nstat: 9-16 forwarded by the old active per takeover, none lost).
        # What holds: nothing lost but inside the gap, nothing duplicated, one backend, and
        # a datagram that reached the backend late was sent between the detach and the
        # takeover (that path only exists then).
        req = tap.requests.get(u6.local_port, [])
        late = {y: round(u6.sent[y] - t_off, 3) for x, y in zip(req, req[1:]) if y < x}
        assert all(-HB <= at <= took + 2 * HB for at in late.values()), \
            f"UDP over VIP6, XDP detached: reordered outside the takeover ({took:.3f} s): {late} {r6}"
        check_udp(r6 | {"to_backend_swaps": 0}, "UDP over VIP6, XDP detached")
        assert gaps["median_ms"] < GAP_MEDIAN_MAX * 1000, f"median gap {gaps}"
    finally:
        for s in streams:
            s.close()


# ---------------------------------------------------------------- 2b. SIGSTOP / SIGCONT

def test_sigstopped_active_loses_its_lease_and_returns_as_standby(env):
    a = settle(env)
    b = 1 - a
    client = env.lab.client
    mac = [mac_of(env.lab.nodes[i].ns, "pub0") for i in range(2)]
    assert arp_answers(client, "eth0", topology.VIP4) == {mac[a]}
    streams = open_streams(env, STREAMS)
    proc = env.lab.nodes[a].proc
    try:
        env.wait_replicated(b, STREAMS)
        with BackendTap(env) as tap, stream_pinger(streams) as pinger, UdpFlow(client, topology.VIP4) as u4, \
                RoleWatch(env) as watch:
            pinger.wait_rounds(5)
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGSTOP)
            try:
                env.lab.wait_role(b, "active")
                time.sleep(0.3)
                # the stopped node's data plane lease ran out: only the new active answers
                answers = arp_answers(client, "eth0", topology.VIP4)
                time.sleep(0.5)
            finally:
                t_cont, wall_cont = time.monotonic(), time.time()
                proc.send_signal(signal.SIGCONT)
            env.lab.wait_role(a, "standby")
            time.sleep(0.5)
            pinger.wait_rounds(5)
        r4 = udp_report(u4, tap, t_stop)
        gaps = check_streams(pinger, t_stop, "SIGSTOP")
        took = watch.first(b, "active", t_stop) - t_stop
        after = [round(e - s, 3) for s, e in watch.both_active(t_cont)]
        during = [round(e - s, 3) for s, e in watch.both_active(t_stop) if s < t_cont]
        report("sigstop", gaps=gaps, takeover_s=round(took, 3), udp4=r4,
               both_active_after_resume_s=after, both_active_while_stopped_s=during,
               stopped_node=[(round(t - t_cont, 3), r) for t, r in watch.transitions(a)])
        assert answers == {mac[b]}, f"ARP for the VIP answered by {answers} (a={mac[a]}, b={mac[b]})"
        # its last heartbeat came at most one interval before the stop
        assert took >= DEAD - HB - 0.01, "the standby took over before the dead interval"
        assert during == [], f"both said active while one was stopped: {during}"
        assert sum(after) <= HB, f"both said active for {after} s after SIGCONT"
        assert env.roles() == tuple("active" if i == b else "standby" for i in range(2))
        # after SIGCONT: it noticed it had been frozen and ended standby, never active
        resumed = [e for e in role_events(env, a) if parse_time(e["time"]) >= wall_cont - 0.5]
        assert any(e["new"] == "init" and "frozen" in e["reason"] for e in resumed), resumed
        assert resumed[-1]["new"] == "standby" and all(e["new"] != "active" for e in resumed), resumed
        check_udp(r4, "UDP over VIP4, SIGSTOP")
        assert gaps["median_ms"] < GAP_MEDIAN_MAX * 1000, f"median gap {gaps}"
        assert arp_answers(client, "eth0", topology.VIP4) == {mac[b]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
        for s in streams:
            s.close()


# ---------------------------------------------------------------- 4. forged and replayed

def test_forged_and_replayed_heartbeats_are_counted_and_ignored(env):
    a = settle(env)
    b = 1 - a
    nodes = env.lab.nodes
    backend = env.lab.backends[0]               # a host on the private network
    tap = HeartbeatTap(env, a)
    try:
        genuine = tap.capture(1)[0]              # a's heartbeat to b over the private network
    finally:
        tap.close()
    # built with the right key: a boot b never heard, stamped a minute ago
    key = load_key(env.lab.key_file)
    stale = encode(Heartbeat(node=env.name(a), boot=Sender(env.name(a), key).boot, seq=11,
                             time=time.time() - 60, role="active", priority=255), key)
    time.sleep(0.5)                              # a has sent ~10 more since
    before = [env.status(i)["peer"]["heartbeats"] for i in range(2)]
    with RoleWatch(env) as watch:
        t0 = time.monotonic()
        # each claims to be the other node, active, with the highest and the lowest priority
        for claim, dest in ((a, nodes[b].priv4), (b, nodes[a].priv4)):
            for prio in (255, 1):
                fake = Sender(env.name(claim), b"not the pair's key at all!!")
                send_udp(backend, dest, fake.make(role="active", priority=prio, healthy=True), HA_PORT)
        send_udp(backend, nodes[b].priv4, genuine, HA_PORT)           # replayed on the link it came by
        send_udp(backend, nodes[b].priv4, stale, HA_PORT)             # an old boot's, right key
        time.sleep(0.5)
    after = [env.status(i)["peer"] for i in range(2)]
    delta = [{k: after[i]["heartbeats"][k] - before[i][k] for k in before[i]} for i in range(2)]
    report("heartbeats", counters_b=after[b]["heartbeats"], delta_a=delta[a], delta_b=delta[b])
    assert delta[b]["forged"] == 2 and delta[a]["forged"] == 2
    assert delta[b]["replayed"] == 2, delta[b]
    assert delta[a]["replayed"] == 0, delta[a]
    assert delta[b]["accepted"] > 0 and delta[a]["accepted"] > 0
    for i in range(2):
        assert after[i]["state"] == "alive"
        assert watch.roles_since(i, t0) == {("active" if i == a else "standby")}, \
            watch.changes(i, t0)
    assert env.roles()[a] == "active" and env.roles()[b] == "standby"


def _up_with(env, tmp_path, ns: str, key_file, name: str) -> subprocess.CompletedProcess:
    p = env.lab.project(0)
    p["node"]["name"] = name
    p["node"]["state_dir"] = str(tmp_path / name)
    p["ha"]["key_file"] = str(key_file)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(p))
    return zfast("up", "-c", str(path), ns=ns, timeout=180)


def test_missing_or_short_key_file_stops_zfast_up_with_one_line(env, tmp_path):
    # A namespace of its own with a pub0 and a priv0: the pair's nodes are not disturbed.
    ns = env.topo.add_ns(f"key{int(time.time() * 1000) % 100000}")
    env.topo.veth(ns, "pub0", ns, "priv0")
    short = tmp_path / "short.key"
    short.write_text("tooshort\n")
    # one after the other: both attach to the same pub0
    results = {kind: _up_with(env, tmp_path, ns, f, f"keytest-{kind}")
               for kind, f in (("missing", tmp_path / "missing.key"), ("short", short))}
    for kind, p in results.items():
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        report("key-" + kind, rc=p.returncode, stderr=lines)
        assert p.returncode != 0
        assert len(lines) == 1, f"{kind}: {lines}"
        assert lines[0].startswith("zfast: error: ha.key_file ")
        assert ("No such file" if kind == "missing" else "at least 16") in lines[0]
        assert not pin_dir(f"keytest-{kind}").exists()
    attached = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show", "dev", "pub0"],
                              capture_output=True, text=True, check=True).stdout
    assert "xdp" not in json.loads(attached)[0], "a failed start left XDP attached"
    assert programs_on(ns) == {}, "a failed start left a program attached"


def test_mismatched_keys_show_auth_failed_and_an_error_event(env, tmp_path):
    a = settle(env)
    b = 1 - a
    other = tmp_path / "other.key"
    other.write_text("a-different-key-of-the-right-length\n")
    p = env.lab.project(b)
    p["ha"]["key_file"] = str(other)
    errors_before = [len(env.events(i, "error")) for i in range(2)]
    t0 = time.time()
    env.restart(b, p)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = [env.status(i) for i in range(2)]
        if all(s["peer"]["state"] == "auth-failed" for s in st) and \
                all(len(env.events(i, "error")) > errors_before[i] for i in range(2)):
            break
        time.sleep(0.1)
    report("mismatched-keys", b=st[b]["peer"], a_state=st[a]["peer"]["state"], roles=env.roles())
    assert st[b]["peer"]["state"] == "auth-failed" and st[a]["peer"]["state"] == "auth-failed"
    assert st[b]["peer"]["heartbeats"]["forged"] > 0 and st[b]["peer"]["heartbeats"]["accepted"] == 0
    err = env.events(b, "error")[-1]
    assert "key_file" in err["error"] and parse_time(err["time"]) >= t0 - 1
    assert any("key_file" in e["error"] for e in env.events(a, "error"))
    cli = zfast("logs", "--json", "--state-dir", str(env.lab.nodes[b].state_dir))
    assert any(json.loads(line)["kind"] == "error" for line in cli.stdout.splitlines())

    # The right key again: b joins as standby, a stays active and takes the VIPs back
    # (b, not hearing a, went active and announced them).
    env.restart(b)
    assert env.wait_pair() == a
    time.sleep(1.3)                    # the announcements at 0, 50, 250 ms and 1 s
    assert neighbour(env.lab.client, topology.VIP4) == mac_of(env.lab.nodes[a].ns, "pub0")
    assert neighbour(env.lab.backends[0], topology.GATEWAY4) == mac_of(env.lab.nodes[a].ns, "priv0")


# ---------------------------------------------------------------- 5. sync link down

def test_sync_link_down_heartbeats_go_over_the_private_network(env):
    a = settle(env)
    b = 1 - a
    with RoleWatch(env) as watch:
        t0 = time.monotonic()
        env.links(a, False, ["sync0"])
        time.sleep(20 * HB)
        st = [env.status(i) for i in range(2)]
        env.links(a, True, ["sync0"])
        time.sleep(0.5)
    report("sync-down", via=[s["peer"]["via"] for s in st],
           states=[s["peer"]["state"] for s in st],
           sending=st[a]["peer"]["replication"]["sending"])
    for i in range(2):
        assert watch.roles_since(i, t0) == {("active" if i == a else "standby")}, \
            watch.changes(i, t0)
        assert st[i]["peer"]["state"] == "alive"
    assert st[b]["peer"]["via"] == env.lab.nodes[a].priv4
    assert env.roles()[a] == "active"
    # replication goes on over the sync link once it is back (a short outage: the same
    # TCP connection, retransmitting; a long one: a new connection and a full dump)
    received = env.status(b)["peer"]["replication"]["receiving"]["received"]
    streams = open_streams(env, 4)
    try:
        env.wait_replicated(b, received + 4)
    finally:
        for s in streams:
            s.close()


def test_every_path_down_two_actives_then_the_higher_priority_stays(env):
    """What happens without extra heartbeat links: with the sync link down and the private
    network's heartbeats dropped (nftables in the standby's namespace), the standby takes
    over and both are active; once they hear each other again the lower (priority, name)
    steps down within a heartbeat (whichever was active before), and the one that stays
    announces the VIPs again (the other one had announced them too)."""
    a = settle(env)
    b = 1 - a
    hi = 0 if env.lab.nodes[0].priority > env.lab.nodes[1].priority else 1
    lo = 1 - hi
    nsb = env.lab.nodes[b].ns
    rules = ("table inet zfpr_ha {\n"
             "  chain in { type filter hook input priority 0; udp dport 5405 drop; }\n"
             "  chain out { type filter hook output priority 0; udp dport 5405 drop; }\n}\n")
    with RoleWatch(env) as watch:
        t0 = time.monotonic()
        subprocess.run(["ip", "netns", "exec", nsb, "nft", "-f", "-"], input=rules, text=True,
                       check=True)
        try:
            env.links(a, False, ["sync0"])
            env.lab.wait_role(b, "active")
            time.sleep(0.5)
            both = env.roles()
        finally:
            # the private network first: heartbeats flow again from this moment
            subprocess.run(["ip", "netns", "exec", nsb, "nft", "delete", "table", "inet", "zfpr_ha"],
                           check=True)
            t_heal = time.monotonic()
            env.links(a, True, ["sync0"])
        env.lab.wait_role(lo, "standby")
        time.sleep(1.3)                # the announcements at 0, 50, 250 ms and 1 s
    split = [round(min(e, t_heal) - s, 3) for s, e in watch.both_active(t0) if s < t_heal]
    healed = [round(e - max(s, t_heal), 3) for s, e in watch.both_active(t0) if e > t_heal]
    report("all-paths-down", active_before=env.name(a), higher=env.name(hi),
           roles_while_cut=both, both_active_while_cut_s=split, both_active_after_heal_s=healed)
    assert both == ("active", "active")
    assert env.roles()[hi] == "active" and env.roles()[lo] == "standby"
    assert sum(healed) <= 2 * HB, f"two actives for {healed} s after the paths came back"
    last = role_events(env, lo)[-1]
    assert (last["old"], last["new"]) == ("active", "standby") and "ranks higher" in last["reason"]
    assert watch.changes(hi, t_heal) == ["active"], watch.transitions(hi)
    assert neighbour(env.lab.client, topology.VIP4) == mac_of(env.lab.nodes[hi].ns, "pub0")
    assert neighbour(env.lab.backends[0], topology.GATEWAY4) == mac_of(env.lab.nodes[hi].ns, "priv0")


# ---------------------------------------------------------------- 6. status and logs

def test_status_json_and_role_events_tell_the_story(env):
    a = settle(env)
    b = 1 - a
    out = []
    for i in range(2):
        p = zfast("status", "--json", "--state-dir", str(env.lab.nodes[i].state_dir))
        assert p.returncode == 0, p.stderr
        out.append(json.loads(p.stdout))
    for i, st in enumerate(out):
        peer = st["peer"]
        assert st["role"] == ("active" if i == a else "standby")
        assert peer["address"] == env.lab.nodes[i].peer4
        assert peer["state"] == "alive" and peer["node"] == env.name(1 - i)
        assert peer["role"] == ("active" if i == b else "standby")
        assert 0 <= peer["last_heartbeat_ms"] < DEAD * 1000
        assert peer["heartbeats"]["accepted"] > 0
        for k in ("forged", "replayed", "duplicate", "malformed"):
            assert k in peer["heartbeats"]
        assert set(peer["replication"]) == {"sending", "receiving"}
    sending = out[a]["peer"]["replication"]["sending"]
    assert sending["connected"] is True and "lag_ms" in sending and sending["lag_ms"] < 1000
    assert out[b]["peer"]["replication"]["receiving"]["connected"] is True

    # Every role change of the module is an event, in order: each one starts where the
    # previous one ended (or at init: a daemon started), and the last is the current role.
    for i in range(2):
        p = zfast("logs", "--json", "--state-dir", str(env.lab.nodes[i].state_dir))
        events = [json.loads(line) for line in p.stdout.splitlines()]
        roles = [e for e in events if e["kind"] == "role"]
        assert roles, f"{env.name(i)}: no role events"
        prev = None
        for e in roles:
            assert e["node"] == env.name(i) and e["reason"]
            assert e["old"] == "init" or e["old"] == prev, f"{env.name(i)}: {prev} then {e}"
            prev = e["new"]
        assert prev == out[i]["role"]
        report("events", node=env.name(i), transitions=[f"{e['old']}->{e['new']}: {e['reason']}"
                                                         for e in roles])
