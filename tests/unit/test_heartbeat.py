"""zfast.ha.heartbeat: the wire format, the Verifier's counters (accepted, forged, replayed,
duplicate, malformed, own), replay protection across boots and links, and load_key's
errors. No root, no network."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import asdict

import pytest

from zfast.ha.heartbeat import (
    MAGIC,
    MAX_SKEW_S,
    MIN_KEY_LEN,
    TAG_LEN,
    Heartbeat,
    KeyError_,
    Sender,
    Verifier,
    encode,
    load_key,
    random_key,
    write_key,
)

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def hb(node: str = "b", boot: str = "boot1", seq: int = 1, time: float = NOW, **kw) -> Heartbeat:
    fields = dict(role="standby", priority=100)
    fields.update(kw)
    return Heartbeat(node=node, boot=boot, seq=seq, time=time, **fields)


def verifier(clock: Clock | None = None) -> Verifier:
    return Verifier("a", KEY, clock or Clock())


def counts(v: Verifier) -> dict:
    return {k: n for k, n in vars(v.counters).items() if n}


# ---------------------------------------------------------------- the wire format

def test_encode_is_magic_tag_payload():
    data = encode(hb(), KEY)
    assert data.startswith(MAGIC)
    tag, payload = data[len(MAGIC):len(MAGIC) + TAG_LEN], data[len(MAGIC) + TAG_LEN:]
    assert tag == hmac.new(KEY, payload, hashlib.sha256).digest()
    assert json.loads(payload) == asdict(hb())


def test_sender_numbers_heartbeats_under_one_random_boot():
    s1, s2 = Sender("b", KEY), Sender("b", KEY)
    assert s1.boot != s2.boot
    v = Verifier("a", KEY)                   # the real clock: Sender stamps time.time()
    first = s1.make(role="active", priority=100)
    second = s1.make(role="active", priority=100)
    a, b = v.check(first), v.check(second)
    assert (a.seq, b.seq) == (1, 2) and a.boot == b.boot == s1.boot
    assert a.role == "active" and a.node == "b"


# ---------------------------------------------------------------- the Verifier

def test_accepts_a_good_heartbeat_and_returns_it():
    v = verifier()
    got = v.check(encode(hb(role="active", priority=200, healthy=False, problems=["x"]), KEY))
    assert got == hb(role="active", priority=200, healthy=False, problems=["x"])
    assert counts(v) == {"accepted": 1}


def test_accepts_increasing_numbers():
    v = verifier()
    for seq in (1, 2, 5, 6):
        assert v.check(encode(hb(seq=seq), KEY)) is not None
    assert counts(v) == {"accepted": 4}


def test_wrong_key_is_forged():
    v = verifier()
    assert v.check(encode(hb(role="active", priority=255), OTHER_KEY)) is None
    assert counts(v) == {"forged": 1}
    assert v.last == {}                       # nothing of it was believed


def test_tampered_payload_is_forged():
    v = verifier()
    data = encode(hb(role="standby"), KEY).replace(b'"standby"', b'"active" ')
    assert v.check(data) is None
    assert counts(v) == {"forged": 1}


def test_truncated_tag_or_bad_magic_or_empty_is_malformed():
    v = verifier()
    good = encode(hb(), KEY)
    assert v.check(b"") is None
    assert v.check(MAGIC + b"\0" * TAG_LEN) is None          # no payload
    assert v.check(b"ZFH2" + good[4:]) is None                # not our magic
    assert v.check(good[:20]) is None
    assert counts(v) == {"malformed": 4}


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'{"node": "b"}',
                                     b'{"node": "b", "boot": "x", "seq": 1, "time": 1, '
                                     b'"role": "active", "priority": 1, "extra": 1}'])
def test_authentic_but_unreadable_payload_is_malformed(payload):
    v = verifier()
    data = MAGIC + hmac.new(KEY, payload, hashlib.sha256).digest() + payload
    assert v.check(data) is None
    assert counts(v) == {"malformed": 1}


def test_own_heartbeat_looped_back_is_counted_and_ignored():
    v = verifier()
    assert v.check(encode(hb(node="a"), KEY)) is None
    assert counts(v) == {"own": 1}


def test_same_heartbeat_twice_is_a_duplicate():
    v = verifier()
    data = encode(hb(seq=7), KEY)
    assert v.check(data) is not None
    assert v.check(data) is None
    assert counts(v) == {"accepted": 1, "duplicate": 1}


def test_older_number_of_the_same_boot_is_replayed():
    v = verifier()
    old = encode(hb(seq=3), KEY)
    assert v.check(old) is not None
    assert v.check(encode(hb(seq=4), KEY)) is not None
    assert v.check(old) is None
    assert counts(v) == {"accepted": 2, "replayed": 1}


def test_a_new_boot_with_a_current_clock_is_accepted():
    """The peer restarted: a new boot id, numbers from 1 again."""
    clock = Clock()
    v = verifier(clock)
    assert v.check(encode(hb(boot="boot1", seq=500), KEY)) is not None
    clock.t += 10
    assert v.check(encode(hb(boot="boot2", seq=1, time=clock.t), KEY)) is not None
    assert v.last["b"][:2] == ("boot2", 1)
    assert counts(v) == {"accepted": 2}


def test_an_old_boot_recorded_and_sent_later_is_replayed():
    """A heartbeat of a boot the receiver has not seen, stamped long ago (recorded from an
    earlier run of the peer): outside the skew window, refused."""
    clock = Clock()
    v = verifier(clock)
    assert v.check(encode(hb(boot="old", seq=9, time=NOW - MAX_SKEW_S - 1), KEY)) is None
    assert v.check(encode(hb(boot="old", seq=9, time=NOW + MAX_SKEW_S + 1), KEY)) is None
    assert counts(v) == {"replayed": 2}
    assert v.last == {}


def test_the_previous_boot_after_a_restart_is_replayed_even_within_the_skew():
    """The peer restarted a second ago; a heartbeat of its previous boot, recorded just
    before, is sent again: older than what the new boot said, refused."""
    clock = Clock()
    v = verifier(clock)
    recorded = encode(hb(boot="boot1", seq=40, time=NOW - 1.0), KEY)
    assert v.check(recorded) is not None
    assert v.check(encode(hb(boot="boot2", seq=1, time=NOW - 0.5), KEY)) is not None
    assert v.check(recorded) is None
    assert v.check(encode(hb(boot="boot1", seq=41, time=NOW - 0.6), KEY)) is None
    assert counts(v) == {"accepted": 2, "replayed": 2}
    assert v.last["b"][0] == "boot2"


def test_two_links_each_heartbeat_twice_is_duplicate_not_replayed():
    v = verifier()
    for seq in range(1, 6):
        data = encode(hb(seq=seq), KEY)
        assert v.check(data, "sync") is not None
        assert v.check(data, "priv") is None
    assert counts(v) == {"accepted": 5, "duplicate": 5}


def test_two_links_a_late_copy_over_the_other_link_is_duplicate_not_replayed():
    """The listener of one link ran late: heartbeat 2 over sync was taken before heartbeat
    1 over priv was read. That is no replay."""
    v = verifier()
    one, two, three = (encode(hb(seq=n), KEY) for n in (1, 2, 3))
    assert v.check(one, "sync") is not None
    assert v.check(two, "sync") is not None
    assert v.check(one, "priv") is None        # late
    assert v.check(two, "priv") is None
    assert v.check(three, "priv") is not None
    assert v.check(three, "sync") is None
    assert counts(v) == {"accepted": 3, "duplicate": 3}


def test_two_links_a_heartbeat_sent_again_on_a_link_that_delivered_it_is_replayed():
    v = verifier()
    recorded = encode(hb(seq=1), KEY)
    assert v.check(recorded, "priv") is not None
    assert v.check(recorded, "sync") is None      # its copy over the other link
    for seq in range(2, 10):
        assert v.check(encode(hb(seq=seq), KEY), "priv") is not None
    assert v.check(recorded, "priv") is None
    assert v.check(recorded, "sync") is None
    assert counts(v) == {"accepted": 9, "duplicate": 1, "replayed": 2}


def test_forged_heartbeats_do_not_disturb_the_numbering():
    v = verifier()
    assert v.check(encode(hb(seq=1), KEY)) is not None
    assert v.check(encode(hb(seq=10_000), OTHER_KEY)) is None
    assert v.check(encode(hb(seq=2), KEY)) is not None
    assert counts(v) == {"accepted": 2, "forged": 1}


def test_each_peer_node_is_numbered_on_its_own():
    v = verifier()
    assert v.check(encode(hb(node="b", seq=5), KEY)) is not None
    assert v.check(encode(hb(node="c", boot="c1", seq=1), KEY)) is not None
    assert counts(v) == {"accepted": 2}


# ---------------------------------------------------------------- the key file

def test_load_key_reads_and_strips(tmp_path):
    path = tmp_path / "ha.key"
    path.write_bytes(b"  " + b"s" * MIN_KEY_LEN + b"\n")
    assert load_key(path) == b"s" * MIN_KEY_LEN


def test_load_key_missing_file_is_one_clear_line(tmp_path):
    path = tmp_path / "nope.key"
    with pytest.raises(KeyError_) as err:
        load_key(path)
    message = str(err.value)
    assert str(path) in message and "No such file" in message and "\n" not in message


def test_load_key_unreadable_is_an_error(tmp_path):
    with pytest.raises(KeyError_) as err:
        load_key(tmp_path)                    # a directory
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"short", b"x" * (MIN_KEY_LEN - 1),
                                     b"  " + b"y" * (MIN_KEY_LEN - 1) + b"  \n"])
def test_load_key_too_short_says_how_long_it_must_be(tmp_path, content):
    path = tmp_path / "ha.key"
    path.write_bytes(content)
    with pytest.raises(KeyError_) as err:
        load_key(path)
    message = str(err.value)
    assert str(path) in message and f"at least {MIN_KEY_LEN}" in message
    assert f"has {len(content.strip())} bytes" in message and "\n" not in message


def test_write_key_makes_a_private_loadable_key(tmp_path):
    path = tmp_path / "ha.key"
    write_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(load_key(path)) >= MIN_KEY_LEN
    assert random_key() != random_key()
