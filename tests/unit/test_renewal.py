"""The certificate controller (zfast.routing.renewal): its schedule on a fake clock, which
CertManager it uses, and what a round does; a fake manager stands in (certs.py has its own
tests: tests/unit/test_certs.py). No network, no store."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from zfast.routing.renewal import EVERY_S, Renewal, acme_spec, domains_of


def routing(*domains, directory="https://acme.test/dir", email=None):
    acme = (SimpleNamespace(directory=directory, email=email, ca_bundle=None)
            if directory else None)
    return SimpleNamespace(acme=acme, domains=[SimpleNamespace(host=h, tls=t) for h, t in domains])


class FakeManager:
    def __init__(self, store, project, acme, log_event):
        self.acme, self.calls = acme, []
        self.fail_ensure = None

    def ensure(self, domains):
        self.calls.append(("ensure", list(domains)))
        if self.fail_ensure:
            raise self.fail_ensure
        return []

    def tick(self):
        self.calls.append(("tick",))
        return []

    def renew(self, host):
        self.calls.append(("renew", host))
        return SimpleNamespace(public=lambda: {"host": host})

    def certs(self):
        return [SimpleNamespace(public=lambda: {"host": "a.example"})]


class Events(list):
    def __call__(self, kind, **fields):
        self.append({"kind": kind, **fields})


def renewal(events=None) -> tuple[Renewal, list]:
    made = []

    def make(*args, **kw):
        made.append(FakeManager(*args, **kw))
        return made[-1]
    return Renewal("store", "demo", events if events is not None else Events(),
                   clock=lambda: 0.0, make_manager=make), made


def test_acme_spec_and_domains_from_the_routing_section():
    r = routing(("a.example", "acme"), ("b.example", "self-signed"), email="ops@example")
    assert acme_spec(r) == {"directory": "https://acme.test/dir", "email": "ops@example",
                            "ca_bundle": None}
    assert domains_of(r) == [("a.example", "acme"), ("b.example", "self-signed")]
    assert acme_spec(routing(directory=None)) is None
    assert acme_spec(None) is None and domains_of(None) == []


def test_a_round_every_second_and_at_once_after_an_apply():
    rn, _ = renewal()
    rn.configure(routing(("a.example", "acme")))
    assert rn.due(100.0) and rn.wait_s(100.0) == 0.0
    rn.round(100.0)
    assert not rn.due(100.5) and rn.wait_s(100.25) == EVERY_S - 0.25
    assert rn.due(100.0 + EVERY_S)
    rn.round(101.0)
    rn.configure(routing(("a.example", "acme"), ("b.example", "acme")))   # an apply
    assert rn.due(101.1) and rn.wait_s(101.1) == 0.0


def test_a_round_ensures_today_s_domains_then_ticks():
    rn, made = renewal()
    rn.configure(routing(("a.example", "acme")))
    rn.round(0.0)
    rn.configure(routing(("a.example", "acme"), ("b.example", "self-signed")))
    rn.round(0.1)
    assert made[0].calls == [("ensure", [("a.example", "acme")]), ("tick",),
                             ("ensure", [("a.example", "acme"), ("b.example", "self-signed")]),
                             ("tick",)]
    assert rn.hosts() == {"a.example", "b.example"}


def test_one_manager_until_routing_acme_changes():
    rn, made = renewal()
    rn.configure(routing(("a.example", "acme")))
    rn.start(threading.Event())           # the first ensure, in the caller's thread
    rn.round(1.0)
    rn.configure(routing(("a.example", "acme"), ("c.example", "acme")))
    rn.round(2.0)
    assert len(made) == 1
    rn.configure(routing(("a.example", "acme"), directory="https://other.test/dir"))
    assert len(made) == 1                 # made by the next round, not by the apply
    rn.round(3.0)
    assert [m.acme["directory"] for m in made] == ["https://acme.test/dir", "https://other.test/dir"]
    assert made[1].calls[0] == ("ensure", [("a.example", "acme")])


def test_a_failing_round_is_an_error_event_not_an_exception():
    events = Events()
    rn, made = renewal(events)
    rn.configure(routing(("a.example", "acme")))
    rn.round(0.0)
    made[0].fail_ensure = OSError("database is locked")
    rn.round(1.0)
    assert events == [{"kind": "error", "controller": "certs", "error": "database is locked"}]
    assert rn.last_round == 1.0 and not rn.due(1.5)


def test_renew_and_the_list_use_the_manager_in_use():
    rn, made = renewal()
    assert rn.certs() == []               # none before the first round
    rn.configure(routing(("a.example", "acme")))
    rn.round(0.0)
    assert rn.renew("a.example").public() == {"host": "a.example"}
    assert made[0].calls[-1] == ("renew", "a.example")
    assert rn.certs() == [{"host": "a.example"}]


def test_run_stops_when_told():
    rn, made = renewal()
    rn.configure(routing(("a.example", "acme")))
    stop = threading.Event()
    stop.set()
    rn.run(stop)                          # returns at once: no round
    assert made == []
