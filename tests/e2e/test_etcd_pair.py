"""Two nodes on one etcd: an apply to either reaches both within a second, an etcd outage
leaves both forwarding on the last state (and saying so), and they resync when it returns.

Two independent labs (each its own client, balancer namespace, backends and node name), the
same project file apart from the node section and the store endpoint. etcd (Debian's
etcd-server, scripts/bootstrap.sh installs it) runs in a namespace of its own, "st", with a
veth into each balancer namespace:

    lab A's lb ns  st0 10.250.1.2  <->  s1 10.250.1.1   st ns (etcd)
    lab B's lb ns  st0 10.250.2.2  <->  s2 10.250.2.1

(a node's daemon runs in its balancer namespace, where 127.0.0.1 is that namespace's own).
Needs root: without it every test fails, none skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest
import yaml

from tests.e2e.kit import cli, lab, maps, oracle, traffic
from tests.e2e.kit.etcd import EtcdServer
from zfast.api import ApiError, Client
from zfast.lab import topology
from zfast.lab.netns import Topology
from zfast.lab.probe import Stream
from zfast.paths import pin_dir

WEIGHTS = [1, 1, 1]
FAMILIES = ((topology.VIP4, topology.CLIENT4, 0), (topology.VIP6, topology.CLIENT6, 1))
CONVERGE_S = 1.0           # the acceptance bound: an apply is seen by both within a second


@dataclass
class Node:
    name: str                 # "A" or "B"
    lab: topology.Lab
    api: Client
    endpoint: str
    ports: traffic.PortPool = field(default_factory=traffic.PortPool)

    def project(self, chosen: dict[int, int] | None = None) -> dict:
        chosen = chosen if chosen is not None else dict(enumerate(WEIGHTS))
        p = self.lab.project(weights=[chosen.get(i, 0) for i in range(len(WEIGHTS))],
                             backends=sorted(chosen))
        p["store"] = {"kind": "etcd", "endpoints": [self.endpoint]}
        return p

    def status(self) -> dict:
        return self.api.get("/status")


@dataclass
class Pair:
    a: Node
    b: Node
    etcd: EtcdServer

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.a, self.b


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    # Fail, never skip: a run without root must not look like a green one.
    assert os.geteuid() == 0, lab.NEED_ROOT
    workdir = tmp_path_factory.mktemp("etcd-pair")
    with ExitStack() as stack:
        store_topo = stack.enter_context(Topology(prefix="zfpst"))
        st = store_topo.add_ns("st")
        labs = []
        for n, prefix in ((1, "zfpa"), (2, "zfpb")):
            topo = stack.enter_context(Topology(prefix=prefix))
            lab_ = topology.build(topo, len(WEIGHTS), list(WEIGHTS), name=f"pair{n}")
            store_topo.veth(st, f"s{n}", lab_.lb, "st0", [f"10.250.{n}.1/24"],
                            [f"10.250.{n}.2/24"])
            labs.append(lab_)
        etcd = EtcdServer(workdir / "etcd", ["10.250.1.1", "10.250.2.1"], store_topo, st)
        nodes = []
        try:
            etcd.start()
            for lab_ in labs:
                lab_.start_servers()
            for lab_ in labs:
                lab.wait_servers(lab_)
            for n, (label, lab_) in enumerate(zip("AB", labs), start=1):
                node = Node(label, lab_, None, etcd.url(f"10.250.{n}.1"))
                node.api = lab.start_node(lab_, node.project())
                nodes.append(node)
            yield Pair(nodes[0], nodes[1], etcd)
        finally:
            for lab_ in labs:
                try:
                    lab_.stop_node()
                finally:
                    if pin_dir(lab_.node_name).exists():
                        cli.zfast("down", "--state-dir", str(lab_.state_dir))
            etcd.stop()


# ---------------------------------------------------------------- helpers

class RevisionWatch:
    """Polls a node's /status in a thread: when it first held each revision."""

    def __init__(self, node: Node, every: float = 0.02):
        self.node, self.every = node, every
        self.seen: dict[int, float] = {}
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_.is_set():
            try:
                rev = self.node.status()["revision"]
                self.seen.setdefault(rev, time.time())
            except ApiError:
                pass
            self.stop_.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_.set()
        self.thread.join(10)

    def wait(self, rev: int, timeout: float) -> float | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if rev in self.seen:
                return self.seen[rev]
            time.sleep(0.005)
        return self.seen.get(rev)


def commit_time(node: Node, rev: int) -> float:
    for h in node.api.get("/history"):
        if h["rev"] == rev:
            return h["time"]
    raise AssertionError(f"node {node.name}: no revision {rev} in its history")


def converge(pair: Pair, apply, timeout: float = 10.0) -> tuple[int, dict[str, float]]:
    """Run apply() (which returns the new revision) while both nodes are watched; the time
    from the store's commit to each node holding the revision."""
    with RevisionWatch(pair.a) as wa, RevisionWatch(pair.b) as wb:
        rev = apply()
        t_a, t_b = wa.wait(rev, timeout), wb.wait(rev, timeout)
    t0 = commit_time(pair.a, rev)
    lag = {"A": (t_a - t0) if t_a else None, "B": (t_b - t0) if t_b else None}
    return rev, lag


def check_new_connections(node: Node, chosen: dict[int, int], count: int = 60) -> dict:
    """New connections through this node go exactly where the table of `chosen` says."""
    names = lab.backend_names(node.lab)
    seen = {}
    for vip, client, fam in FAMILIES:
        spread = traffic.connections(node.lab.client, vip, topology.TCP_PORT, node.ports.take(count))
        assert not spread.failures, (node.name, list(spread.failures.items())[:5])
        table = [(topology.backend_addrs(i)[fam], w) for i, w in sorted(chosen.items())]
        wrong = {p: (got, names[oracle.expected_backend(table, client, p, vip, topology.TCP_PORT)])
                 for p, got in spread.by_port.items()
                 if names[oracle.expected_backend(table, client, p, vip, topology.TCP_PORT)] != got}
        assert not wrong, f"node {node.name} {vip}: off the table (port: (got, want)): {wrong}"
        seen[vip] = dict(sorted(spread.backends.items()))
    return seen


def backends_reached(seen: dict) -> set[str]:
    return set().union(*(set(s) for s in seen.values()))


def open_streams(node: Node, per_family: int = 20) -> list[Stream]:
    return [Stream(node.lab.client, vip, topology.TCP_PORT, timeout=10)
            for vip, _, _ in FAMILIES for _ in range(per_family)]


def stream_pinger(streams) -> traffic.Pinger:
    """Every stream pinged round after round, 10 ms apart; a minute to wait for rounds."""
    return traffic.Pinger(streams, pause=0.01, timeout=60.0)


def broken(streams):
    return [(s.backend, s.error) for s in streams if s.error]


def api_apply(node: Node, chosen: dict[int, int]) -> int:
    result = node.api.post("/apply", {"config": yaml.safe_dump(node.project(chosen)),
                                      "source": f"test on {node.name}"})
    return result["revision"]


def cli_apply(node: Node, chosen: dict[int, int], name: str):
    path = node.lab.write_config(node.project(chosen), node.lab.state_dir / name)
    return cli.zfast("apply", "-c", str(path), "--state-dir", str(node.lab.state_dir))


def store_health(node: Node) -> dict:
    p = cli.zfast("status", "--json", "--state-dir", str(node.lab.state_dir))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["store"]


def wait_store_ok(node: Node, ok: bool, timeout: float = 20.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        h = node.status()["store"]
        if h["ok"] is ok:
            return h
        assert time.monotonic() < end, f"node {node.name}: store ok is not {ok}: {h}"
        time.sleep(0.1)


def same_revision(pair: Pair, timeout: float = 10.0) -> int:
    """Until both nodes hold A's revision (the previous test's last apply may be on its way)."""
    end = time.monotonic() + timeout
    while True:
        ra, rb = pair.a.status()["revision"], pair.b.status()["revision"]
        if ra == rb:
            return ra
        assert time.monotonic() < end, f"A holds revision {ra}, B {rb}"
        time.sleep(0.05)


# ---------------------------------------------------------------- start: one shared state

def test_both_nodes_start_on_one_revision(pair):
    sa, sb = pair.a.status(), pair.b.status()
    assert sa["node"] != sb["node"] and sa["project"] == sb["project"] == "lab"
    for st in (sa, sb):
        assert st["store"]["kind"] == "etcd" and st["store"]["ok"] is True, st["store"]
        assert st["store"]["version"].startswith("3."), st["store"]
    assert sa["revision"] == sb["revision"] >= 1, (sa["revision"], sb["revision"])
    # B's file had the same shared part: B's `zfast up` committed nothing of its own
    hist = pair.b.api.get("/history")
    assert len(hist) == 1 and hist[0]["who"] == "zfast up", hist
    assert pair.a.lab.node_name in hist[0]["source"], hist   # A's file, committed by A
    for node in pair.nodes:
        check_new_connections(node, dict(enumerate(WEIGHTS)))


# ---------------------------------------------------------------- an apply reaches both

def test_apply_to_either_is_seen_by_both_within_1s(pair):
    streams = {n.name: open_streams(n) for n in pair.nodes}
    all_streams = streams["A"] + streams["B"]
    try:
        with stream_pinger(all_streams) as pinger:
            pinger.wait_rounds(1)
            # A (API): be1 goes away
            without1 = {1: 1, 2: 2}
            rev1, lag1 = converge(pair, lambda: api_apply(pair.a, without1))
            print(f"\napply to A (API), rev {rev1}: held by A after {lag1['A']:.3f} s, "
                  f"by B after {lag1['B']:.3f} s (from the commit)")
            assert lag1["B"] is not None and lag1["B"] <= CONVERGE_S, lag1
            assert lag1["A"] is not None and lag1["A"] <= CONVERGE_S, lag1
            for node in pair.nodes:
                seen = check_new_connections(node, without1)
                assert "be1" not in backends_reached(seen), (node.name, seen)

            # B (CLI): be1 back, weighted up
            with1 = {0: 3, 1: 1, 2: 1}

            def on_b():
                p = cli_apply(pair.b, with1, "with1.yaml")
                assert p.returncode == 0, p.stderr
                return pair.b.status()["revision"]

            rev2, lag2 = converge(pair, on_b)
            print(f"apply to B (CLI), rev {rev2}: held by B after {lag2['B']:.3f} s, "
                  f"by A after {lag2['A']:.3f} s (from the commit)")
            assert rev2 == rev1 + 1
            assert lag2["A"] is not None and lag2["A"] <= CONVERGE_S, lag2
            assert lag2["B"] is not None and lag2["B"] <= CONVERGE_S, lag2
            for node in pair.nodes:
                seen = check_new_connections(node, with1)
                assert "be1" in backends_reached(seen), (node.name, seen)
            pinger.wait_rounds(2)
        assert not broken(all_streams), broken(all_streams)[:5]

        # the history is one history: both nodes list the same revisions
        ha = [(h["rev"], h["source"]) for h in pair.a.api.get("/history")]
        hb = [(h["rev"], h["source"]) for h in pair.b.api.get("/history")]
        assert ha == hb and ha[0][0] == rev2, (ha, hb)
    finally:
        for s in all_streams:
            s.close()
        api_apply(pair.a, dict(enumerate(WEIGHTS)))


# ---------------------------------------------------------------- etcd away and back

def test_etcd_outage_keeps_forwarding_then_resyncs(pair):
    last = {0: 1, 1: 2, 2: 1}
    rev0, lag = converge(pair, lambda: api_apply(pair.a, last))
    assert lag["B"] is not None and lag["B"] <= CONVERGE_S, lag
    streams = open_streams(pair.a) + open_streams(pair.b)
    try:
        with stream_pinger(streams) as pinger:
            pinger.wait_rounds(1)
            pair.etcd.stop()
            t_down = time.monotonic()

            # both say so...
            for node in pair.nodes:
                h = wait_store_ok(node, False)
                assert h["error"] and "unreachable" in h["error"], h
                assert node.endpoint in h["error"], h
                assert store_health(node)["ok"] is False
                print(f"\nnode {node.name} with etcd down: store error {h['error']!r}")
            # ... and keep forwarding on the last state
            for node in pair.nodes:
                assert node.status()["revision"] == rev0
                check_new_connections(node, last)
            pinger.wait_rounds(2)
            assert not broken(streams), broken(streams)[:5]

            # an apply cannot be stored: it fails, clearly, and changes nothing anywhere
            before = {n.name: maps.maps_state(n.lab.node_name) for n in pair.nodes}
            p = cli_apply(pair.a, {0: 1}, "during-outage.yaml")
            assert p.returncode != 0, p.stdout
            assert "nothing changed" in p.stderr and "unreachable" in p.stderr, p.stderr
            assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
            print(f"zfast apply with etcd down: {p.stderr.strip()}")
            with pytest.raises(ApiError) as refused:
                api_apply(pair.b, {2: 1})
            assert refused.value.status == 409 and "unreachable" in str(refused.value)
            for node in pair.nodes:
                assert node.status()["revision"] == rev0
                after = maps.maps_state(node.lab.node_name)
                for name in maps.STATE_MAPS:
                    assert after[name] == before[node.name][name], (node.name, name)
                check_new_connections(node, last)
            # the history still answers, from the node's cache
            p = cli.zfast("history", "--json", "--state-dir", str(pair.b.lab.state_dir))
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)[0]["rev"] == rev0

            # etcd returns: both see it, and an apply reaches both again
            pair.etcd.start()
            outage = time.monotonic() - t_down
            for node in pair.nodes:
                wait_store_ok(node, True)
            t_ok = time.monotonic()
            time.sleep(2.5)   # the watches retry with a back-off of up to 2 s: let them in
            again = {0: 2, 2: 1}
            rev1, lag = converge(pair, lambda: api_apply(pair.a, again))
            print(f"etcd down {outage:.1f} s; back, healthy on both after "
                  f"{t_ok - t_down - outage:.2f} s; apply to A (rev {rev1}) held by B after "
                  f"{lag['B']:.3f} s")
            assert rev1 == rev0 + 1, (rev0, rev1)
            assert lag["B"] is not None and lag["B"] <= CONVERGE_S, lag
            for node in pair.nodes:
                seen = check_new_connections(node, again)
                assert "be2" not in backends_reached(seen), (node.name, seen)
            pinger.wait_rounds(2)
        assert not broken(streams), broken(streams)[:5]
    finally:
        for s in streams:
            s.close()
        if pair.etcd.proc is None:
            pair.etcd.start()
        api_apply(pair.a, dict(enumerate(WEIGHTS)))


def test_node_restarted_during_outage(pair):
    """kill -9 of B's daemon while etcd is away: B keeps forwarding; a `zfast up` of a file
    that is not the last revision cannot be stored, so it fails and leaves the data plane as
    it was; one of the last revision starts from the node's cache and adopts the maps."""
    base = dict(enumerate(WEIGHTS))
    last = {0: 2, 1: 1, 2: 1}
    rev0, lag = converge(pair, lambda: api_apply(pair.a, last))
    assert lag["B"] is not None and lag["B"] <= CONVERGE_S, lag
    b = pair.b
    streams = open_streams(b)
    try:
        with stream_pinger(streams) as pinger:
            pinger.wait_rounds(1)
            pair.etcd.stop()
            wait_store_ok(b, False)
            maps0 = maps.maps_state(b.lab.node_name)
            b.lab.node_proc.kill()
            b.lab.node_proc.wait(30)
            b.lab.node_proc = None
            pinger.wait_rounds(2)
            assert not broken(streams), broken(streams)[:5]

            # Restarted onto its own running data plane with an older file while etcd is
            # away: the node keeps the store's latest revision (from its cache), so the
            # stale file changes nothing and the node comes up forwarding as before.
            b.api = lab.start_node(b.lab, b.project(base))
            st = b.status()
            assert st["adopted"] is True and st["revision"] == rev0, st
            assert st["store"]["ok"] is False, st["store"]
            maps1 = maps.maps_state(b.lab.node_name)
            # (services entries may point at the other ring of a pair: an adopting daemon
            # rewrites every table into its spare ring and flips; where new connections go
            # is checked right below)
            changed = [name for name in ("backends", "fw_ports") if maps1[name] != maps0[name]]
            assert not changed, f"a restart with a stale file changed the maps: {changed}"
            check_new_connections(b, last)
            pinger.wait_rounds(2)
            assert not broken(streams), broken(streams)[:5]

            pair.etcd.start()
            wait_store_ok(b, True)
            wait_store_ok(pair.a, True)
            time.sleep(2.5)   # the watches' back-off
            rev1, lag = converge(pair, lambda: api_apply(pair.a, base))
            assert lag["B"] is not None and lag["B"] <= CONVERGE_S, lag
            check_new_connections(b, base)
            pinger.wait_rounds(1)
        assert not broken(streams), broken(streams)[:5]
    finally:
        for s in streams:
            s.close()
        if pair.etcd.proc is None:
            pair.etcd.start()
        if b.lab.node_proc is None:
            b.api = lab.start_node(b.lab, b.project(base))
        api_apply(pair.a, base)


def test_node_cut_off_catches_up_when_it_returns(pair):
    """B loses its link to etcd while A still has it: A's apply cannot reach B; B keeps
    forwarding on the last state it had; with the link back, B converges to A's revision."""
    base = dict(enumerate(WEIGHTS))
    rev0 = same_revision(pair)
    lb_b = pair.b.lab.topo.ns(pair.b.lab.lb)
    link = ["ip", "-n", lb_b, "link", "set", "st0"]
    subprocess.run([*link, "down"], check=True)
    try:
        wait_store_ok(pair.b, False)
        changed = {1: 1, 2: 1}
        rev1 = api_apply(pair.a, changed)
        assert rev1 == rev0 + 1
        time.sleep(1.0)
        assert pair.b.status()["revision"] == rev0, "B cannot have it: it is cut off"
        check_new_connections(pair.b, base)       # B: the last state it had
        check_new_connections(pair.a, changed)
    finally:
        subprocess.run([*link, "up"], check=True)
    t_up = time.monotonic()
    with RevisionWatch(pair.b) as wb:
        t_b = wb.wait(rev1, 30.0)
    assert t_b is not None, f"B did not catch up with revision {rev1} within 30 s"
    print(f"\nB back on its link: store ok again, revision {rev1} held after "
          f"{time.monotonic() - t_up:.2f} s at most")
    wait_store_ok(pair.b, True)
    seen = check_new_connections(pair.b, changed)
    assert "be1" not in backends_reached(seen), seen
    api_apply(pair.a, base)
