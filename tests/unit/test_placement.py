"""Placement in an LXD cluster: a pure choice of member (zfast/core/placement.py)."""

from zfast.core.placement import choose_member, shares_member


def test_the_pair_goes_to_two_members_and_the_spare_to_a_third():
    online = ["m1", "m2", "m3"]
    placed = []
    for kind in ("balancer", "balancer", "spare"):
        placed.append((kind, choose_member(kind, online, placed)))
    assert [m for _, m in placed] == ["m1", "m2", "m3"]


def test_routers_spread_apart_and_away_from_the_busiest_member():
    placed = [("balancer", "m1"), ("balancer", "m2")]
    first = choose_member("router", ["m1", "m2", "m3"], placed)
    assert first == "m3"                       # no router anywhere: the emptiest member
    placed.append(("router", first))
    second = choose_member("router", ["m1", "m2", "m3"], placed)
    assert second in ("m1", "m2")              # not m3, which has a router already


def test_a_successor_avoids_the_surviving_peer():
    # lb-a's member m1 is lost: online are m2 (lb-b) and m3 (nothing of the group)
    placed = [("balancer", "m1"), ("balancer", "m2")]
    assert choose_member("balancer", ["m2", "m3"], placed) == "m3"
    # lb-a crashed on a member that is fine (its container is gone): back there, not on m2
    assert choose_member("balancer", ["m1", "m2", "m3"], [("balancer", "m2"), ("spare", "m3")]) == "m1"


def test_one_member_left_takes_both_and_it_is_known():
    placed = [("balancer", "m2")]
    assert choose_member("balancer", ["m2"], placed) == "m2"
    assert shares_member("balancer", "m2", placed)
    assert not shares_member("router", "m2", placed)
    assert choose_member("balancer", [], placed) is None
