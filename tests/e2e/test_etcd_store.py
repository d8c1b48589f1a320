"""zfast.store with etcd: a real etcd (Debian's etcd-server) on loopback, two store "nodes" on it.

Each test starts its own etcd (temp data dir, free ports) and always stops it. If etcd is not
installed, the fixture installs etcd-server with apt-get; if that fails the tests fail (never
skip: a CI that skips them tests nothing).
"""

import socket
import threading
import time

import pytest

from tests.e2e.kit.etcd import EtcdServer
from tests.e2e.kit.traffic import free_port
from zfast.store import StoreError, open_store
from zfast.store.etcd import EtcdStore

YAML = "project: demo\nservices: []\n"
START_S = 15.0      # etcd on loopback is healthy well within this


class Proxy:
    """A TCP forwarder to cut one node off etcd while the other still reaches it."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def up(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        if self.listener:
            self.listener.close()
            self.listener = None
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path, port=free_port(), peer_port=free_port())
    try:
        server.start(START_S)
        yield server
    finally:
        server.stop()


@pytest.fixture
def nodes(etcd, tmp_path):
    """Two stores on one etcd, each with its own state dir (local cache and events)."""
    spec = {"kind": "etcd", "endpoints": [etcd.local]}
    a = open_store(spec, tmp_path / "lb-a", "lb-a")
    b = open_store(spec, tmp_path / "lb-b", "lb-b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


class Seen:
    def __init__(self):
        self.revs: list[int] = []
        self.cond = threading.Condition()

    def __call__(self, r):
        with self.cond:
            self.revs.append(r.rev)
            self.cond.notify_all()

    def wait_for(self, rev: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: rev in self.revs, timeout)


def test_version_gateway_and_health(etcd, nodes):
    a, _ = nodes
    assert isinstance(a, EtcdStore)
    h = a.health()
    assert h["ok"] is True and h["error"] is None and h["kind"] == "etcd"
    assert h["endpoints"] == [etcd.local] and h["last_ok"] > 0
    assert h["version"] == etcd.version() and h["version"].startswith("3.")
    assert h["prefix"] in ("/v3", "/v3beta")


def test_commit_by_one_node_is_seen_by_the_other_within_1s(nodes):
    a, b = nodes
    seen_a, seen_b = Seen(), Seen()
    a.watch("demo", seen_a)
    b.watch("demo", seen_b)
    time.sleep(0.3)  # let the watch streams open
    t0 = time.monotonic()
    r1 = a.commit("demo", YAML, "alice", ["+ service app"], "cli")
    assert r1.rev == 1
    assert seen_b.wait_for(1, 1.0), "lb-b did not see lb-a's commit within 1 s"
    assert seen_a.wait_for(1, 1.0)
    assert time.monotonic() - t0 < 1.0
    r2 = b.commit("demo", YAML + "# 2\n", "bob", ["~ app weight"], "api")
    assert r2.rev == 2
    assert seen_a.wait_for(2, 1.0), "lb-a did not see lb-b's commit within 1 s"
    assert seen_b.wait_for(2, 1.0)
    assert seen_a.revs == [1, 2] and seen_b.revs == [1, 2]
    got = a.latest("demo")
    assert (got.rev, got.who, got.changes, got.source, got.config) == \
        (2, "bob", ["~ app weight"], "api", YAML + "# 2\n")
    assert [r.rev for r in b.history("demo")] == [2, 1]
    assert b.get("demo", 1).who == "alice"
    with pytest.raises(KeyError):
        b.get("demo", 3)
    assert b.latest("other") is None


def test_concurrent_commits_never_share_a_number(nodes):
    a, b = nodes
    got, errors = [], []

    def worker(s):
        try:
            for _ in range(10):
                got.append(s.commit("demo", YAML, s.node, [], "test").rev)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(got) == list(range(1, 41))
    hist = a.history("demo", limit=1000)
    assert [r.rev for r in hist] == list(range(40, 0, -1))
    assert a.latest("demo").rev == 40


def test_outage_keeps_last_state_and_resyncs(etcd, tmp_path):
    proxy = Proxy(etcd.port)
    proxy.up()
    a = open_store({"kind": "etcd", "endpoints": [etcd.local]}, tmp_path / "lb-a", "lb-a")
    b = open_store({"kind": "etcd", "endpoints": [f"http://127.0.0.1:{proxy.port}"]},
                   tmp_path / "lb-b", "lb-b")
    try:
        seen_a, seen_b = Seen(), Seen()
        a.watch("demo", seen_a)
        b.watch("demo", seen_b)
        a.commit("demo", YAML, "alice", ["initial"], "cli")
        assert seen_a.wait_for(1, 1.0) and seen_b.wait_for(1, 1.0)

        etcd.stop()
        for s in (a, b):
            h = s.health()
            assert h["ok"] is False
            assert "etcd unreachable" in h["error"] and h["endpoints"][0] in h["error"], h
            with pytest.raises(StoreError, match="unreachable"):
                s.commit("demo", YAML, s.node, [], "cli")
            last = s.latest("demo")  # from the local cache: the node keeps its state
            assert last is not None and last.rev == 1 and last.who == "alice"
            assert [r.rev for r in s.history("demo")] == [1]
            with pytest.raises(StoreError):
                s.lease_campaign("active", s.node, 2, project="demo")

        # etcd comes back, but lb-b is still cut off: lb-a commits rev 2 without it.
        proxy.down()
        etcd.start(START_S)
        r2 = a.commit("demo", YAML + "# 2\n", "alice", ["~ during b's outage"], "cli")
        assert r2.rev == 2
        assert seen_a.wait_for(2, 3.0), "lb-a's watch did not resync after etcd restarted"
        assert a.health()["ok"] is True
        time.sleep(0.5)
        assert 2 not in seen_b.revs
        assert b.latest("demo").rev == 1 and b.health()["ok"] is False

        # lb-b reconnects: its watch resyncs and delivers rev 2 (committed while it was away).
        proxy.up()
        assert seen_b.wait_for(2, 4.0), "lb-b's watch did not resync after reconnecting"
        assert seen_b.revs == [1, 2] and seen_a.revs == [1, 2]
        assert b.health()["ok"] is True
        assert b.latest("demo").rev == 2
        # and the stream is live again, both ways
        b.commit("demo", YAML + "# 3\n", "bob", [], "cli")
        assert seen_a.wait_for(3, 1.0) and seen_b.wait_for(3, 1.0)
    finally:
        a.close()
        b.close()
        proxy.down()


def test_cache_survives_a_restart_with_etcd_down(etcd, tmp_path):
    spec = {"kind": "etcd", "endpoints": [etcd.local]}
    a = open_store(spec, tmp_path / "lb-a", "lb-a")
    a.commit("demo", YAML, "alice", [], "cli")
    a.close()
    etcd.stop()
    a = open_store(spec, tmp_path / "lb-a", "lb-a")  # a node restarting during the outage
    try:
        assert a.latest("demo").rev == 1
        assert a.get("demo", 1).who == "alice"
        assert a.health()["ok"] is False
    finally:
        a.close()


def test_lease_one_holder_and_takeover_after_ttl(nodes):
    a, b = nodes
    ttl = 2
    assert a.lease_holder("active", project="demo") is None
    assert a.lease_campaign("active", "lb-a", ttl, project="demo")
    assert not b.lease_campaign("active", "lb-b", ttl, project="demo")
    assert b.lease_holder("active", project="demo") == "lb-a"
    assert a.lease_campaign("active", "lb-a", ttl, project="demo")  # still ours
    time.sleep(ttl + 1.0)  # kept alive beyond the TTL
    assert b.lease_holder("active", project="demo") == "lb-a"
    assert not b.lease_campaign("active", "lb-b", ttl, project="demo")

    a.close()  # keepalive stops, nothing revoked: the lease must expire on its own
    t0 = time.monotonic()
    while not b.lease_campaign("active", "lb-b", ttl, project="demo"):
        assert time.monotonic() - t0 < ttl + 3, "lb-b never got the lease after lb-a stopped"
        time.sleep(0.2)
    assert b.lease_holder("active", project="demo") == "lb-b"


def test_lease_resign_hands_over_at_once(nodes):
    a, b = nodes
    assert a.lease_campaign("active", "lb-a", 5)
    assert not b.lease_campaign("active", "lb-b", 5)
    b.lease_resign("active", "lb-b")  # not the holder: nothing happens
    assert a.lease_holder("active") == "lb-a"
    a.lease_resign("active", "lb-a")
    assert b.lease_holder("active") is None
    assert b.lease_campaign("active", "lb-b", 5)
    assert a.lease_holder("active") == "lb-b"


def test_events_stay_local_per_node(nodes):
    a, b = nodes
    a.add_event({"kind": "apply", "rev": 1})
    assert [e["kind"] for e in a.events()] == ["apply"]
    assert a.events()[0]["node"] == "lb-a"
    assert b.events() == []


def test_documents_are_shared_through_etcd(nodes):
    a, b = nodes
    assert b.fetch("certs/x.example.org") is None
    a.put("certs/x.example.org", "PEM-1")
    a.put("certs/y.example.org", "PEM-2")
    a.put("certsz", "not under certs/")
    assert b.fetch("certs/x.example.org") == "PEM-1"
    assert b.items("certs/") == {"certs/x.example.org": "PEM-1", "certs/y.example.org": "PEM-2"}
