"""The activity controller's verdicts, from a fake link source: no kernel, no root.

The controller has no clock: each verdict compares one check with the one before, so
these tests step it check by check.
"""

from zfast.controllers.activity import RX_WITHOUT_VERDICTS, Activity
from zfast.dataplane.links import LinkState, LinkWatch


class FakeSource:
    """What the node's LinkWatch would observe, set by the test before each check."""

    def __init__(self, *links: LinkState, verdicts: int = 0, errors: int = 0):
        self.now = list(links)
        self.verdicts = verdicts
        self.errors = errors

    def links(self) -> list[LinkState]:
        return list(self.now)

    def reason_counters(self) -> dict[str, tuple[int, int]]:
        return {"pass": (self.verdicts - self.errors, 0), "drop_error": (self.errors, 0)}

    def set(self, *links: LinkState, verdicts: int | None = None, errors: int | None = None):
        self.now = list(links)
        if verdicts is not None:
            self.verdicts = verdicts
        if errors is not None:
            self.errors = errors


def healthy(name: str, rx: int = 0, lost: int = 0) -> LinkState:
    return LinkState(name, attached=True, up=True, carrier=True, rx_packets=rx, xdp_lost=lost)


def test_a_healthy_node_has_no_problem():
    src = FakeSource(healthy("pub0"), healthy("priv0"))
    act = Activity(src)
    assert act.check() == []
    src.set(healthy("pub0", rx=500), healthy("priv0", rx=500), verdicts=1000)
    assert act.check() == []
    assert act.problems == []


def test_a_gone_interface_is_only_gone():
    src = FakeSource(healthy("pub0"), LinkState("priv0", present=False))
    act = Activity(src)
    assert act.check() == ["priv0 is gone"]
    assert act.problems == ["priv0 is gone"]


def test_an_interface_without_the_program():
    act = Activity(FakeSource(LinkState("pub0", up=True, carrier=True)))
    assert act.check() == ["zfast is not attached to pub0"]


def test_down_and_no_carrier():
    src = FakeSource(LinkState("pub0", attached=True, up=False, carrier=False),
                     LinkState("priv0", attached=True, up=True, carrier=False))
    act = Activity(src)
    # down says it all: a link that is down has no carrier either
    assert act.check() == ["pub0 is down", "priv0 has no carrier"]


def test_frames_the_kernel_lost_after_zfast_forwarded_them():
    src = FakeSource(healthy("pub0", lost=7))
    act = Activity(src)
    assert act.check() == []                     # the first check has nothing to compare with
    src.set(healthy("pub0", lost=7))
    assert act.check() == []                     # what was lost before is not a problem
    src.set(healthy("pub0", lost=12))
    assert act.check() == ["5 XDP frames the kernel lost at pub0 after zfast forwarded them"]
    src.set(healthy("pub0", lost=12))
    assert act.check() == []                     # no longer rising


def test_an_interface_back_from_gone_starts_its_loss_count_again():
    src = FakeSource(healthy("pub0", lost=3))
    act = Activity(src)
    act.check()
    src.set(LinkState("pub0", present=False))
    assert act.check() == ["pub0 is gone"]
    src.set(healthy("pub0", lost=9))             # a new link: its count is not compared
    assert act.check() == []


def test_packets_arrive_but_the_program_counts_none():
    src = FakeSource(healthy("pub0", rx=100), healthy("priv0", rx=100), verdicts=50)
    act = Activity(src)
    assert act.check() == []
    # the received packets of every interface count together
    src.set(healthy("pub0", rx=100 + RX_WITHOUT_VERDICTS), healthy("priv0", rx=101))
    assert act.check() == ["packets arrive but the program counts none"]


def test_few_packets_or_moving_verdicts_are_no_problem():
    src = FakeSource(healthy("pub0"), verdicts=50)
    act = Activity(src)
    act.check()
    src.set(healthy("pub0", rx=RX_WITHOUT_VERDICTS))          # not more than the threshold
    assert act.check() == []
    src.set(healthy("pub0", rx=10 * RX_WITHOUT_VERDICTS), verdicts=51)   # the program runs
    assert act.check() == []


def test_a_gone_interface_receives_nothing():
    src = FakeSource(healthy("pub0", rx=5000))
    act = Activity(src)
    act.check()
    src.set(LinkState("pub0", present=False, rx_packets=10 ** 6))
    assert act.check() == ["pub0 is gone"]


def test_internal_errors():
    src = FakeSource(healthy("pub0"), verdicts=10, errors=2)
    act = Activity(src)
    assert act.check() == []                     # errors before the first check are old
    src.set(healthy("pub0"), verdicts=13, errors=5)
    assert act.check() == ["3 internal errors (drop_error)"]
    src.set(healthy("pub0"), verdicts=14)
    assert act.check() == []


def test_every_problem_at_once_in_order():
    src = FakeSource(healthy("pub0"), healthy("priv0"), healthy("ext0"), verdicts=10)
    act = Activity(src)
    act.check()
    src.set(LinkState("pub0", attached=False, up=False, rx_packets=RX_WITHOUT_VERDICTS + 1,
                      xdp_lost=2),
            LinkState("priv0", present=False),
            LinkState("ext0", attached=True, up=True, carrier=False),
            errors=1)
    problems = act.check()
    assert problems == ["zfast is not attached to pub0",
                        "2 XDP frames the kernel lost at pub0 after zfast forwarded them",
                        "pub0 is down",
                        "priv0 is gone",
                        "ext0 has no carrier",
                        "packets arrive but the program counts none",
                        "1 internal errors (drop_error)"]
    assert act.problems == problems              # what the heartbeats carry until the next check


def test_the_node_s_link_source_says_a_missing_interface_is_gone():
    class NoDataPlane:
        attached: dict = {}

    watch = LinkWatch(NoDataPlane(), ["zf-no-such0"])
    assert watch.links() == [LinkState("zf-no-such0", present=False)]
