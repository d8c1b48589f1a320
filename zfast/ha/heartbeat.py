"""Heartbeats between the two nodes of a pair: UDP datagrams, HMAC-SHA256, no replays.

A datagram is MAGIC | tag (32 bytes) | JSON payload, the tag an HMAC of the
payload under the pair's shared key. Replay protection: every daemon start
draws a random boot id and numbers its heartbeats; a receiver accepts from a
(node, boot) only a higher number than the last one it accepted, and accepts
a new boot only if its clock is within MAX_SKEW_S of its own (so an old
boot's recorded heartbeats cannot be replayed later).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAGIC = b"ZFH1"
TAG_LEN = 32
MAX_SKEW_S = 5.0
MIN_KEY_LEN = 16


class KeyError_(Exception):
    """The pair's key file is missing, unreadable or too short."""


def load_key(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes().strip()
    except OSError as err:
        raise KeyError_(f"ha.key_file {path}: {err.strerror}") from None
    if len(data) < MIN_KEY_LEN:
        raise KeyError_(f"ha.key_file {path}: the key has {len(data)} bytes, at least "
                        f"{MIN_KEY_LEN} are needed (e.g. `head -c 32 /dev/urandom | base64`)")
    return data


@dataclass
class Heartbeat:
    node: str
    boot: str
    seq: int
    time: float                 # sender's wall clock, for the skew check
    role: str                   # init | standby | active
    priority: int
    healthy: bool = True
    problems: list[str] = field(default_factory=list)
    sync_port: int = 0          # where the sender receives replicated flows
    active_since: float = 0.0   # when it last became active (to break ties between actives)


def encode(hb: Heartbeat, key: bytes) -> bytes:
    payload = json.dumps(asdict(hb), separators=(",", ":")).encode()
    tag = hmac.new(key, payload, hashlib.sha256).digest()
    return MAGIC + tag + payload


class Sender:
    """Numbers this daemon's heartbeats under a fresh boot id."""

    def __init__(self, node: str, key: bytes):
        self.node = node
        self.key = key
        self.boot = secrets.token_hex(8)
        self.seq = 0

    def make(self, **fields) -> bytes:
        self.seq += 1
        return encode(Heartbeat(node=self.node, boot=self.boot, seq=self.seq, time=time.time(),
                                **fields), self.key)


@dataclass
class Counters:
    accepted: int = 0
    forged: int = 0      # bad tag: wrong key or tampered
    replayed: int = 0    # an older number, or an old boot
    duplicate: int = 0   # the same heartbeat over a second link: expected, harmless
    malformed: int = 0
    own: int = 0         # our own heartbeat looped back


class Verifier:
    """Checks heartbeats as they arrive. With several links every heartbeat comes once
    over each, and the listener of one link may run late: `link` (where it came in) tells
    a copy that is new on its link (duplicate: harmless, expected) from one this link
    delivered already (replayed). Without a link, any older number counts as replayed."""

    def __init__(self, me: str, key: bytes, clock=time.time):
        self.me = me
        self.key = key
        self.clock = clock
        self.counters = Counters()
        self.last: dict[str, tuple[str, int, float]] = {}  # node -> (boot, seq, time)
        self.last_on_link: dict[tuple[str, object], tuple[str, int]] = {}  # (node, link) -> (boot, seq)
        self._lock = threading.Lock()  # one listener thread per link

    def check(self, data: bytes, link: object = None) -> Heartbeat | None:
        """The heartbeat, or None (and a counter) for anything forged, replayed or broken."""
        with self._lock:
            return self._check(data, link)

    def _check(self, data: bytes, link: object) -> Heartbeat | None:
        if len(data) <= len(MAGIC) + TAG_LEN or not data.startswith(MAGIC):
            self.counters.malformed += 1
            return None
        tag = data[len(MAGIC):len(MAGIC) + TAG_LEN]
        payload = data[len(MAGIC) + TAG_LEN:]
        if not hmac.compare_digest(tag, hmac.new(self.key, payload, hashlib.sha256).digest()):
            self.counters.forged += 1
            return None
        try:
            hb = Heartbeat(**json.loads(payload))
        except (ValueError, TypeError):
            self.counters.malformed += 1
            return None
        if hb.node == self.me:
            self.counters.own += 1
            return None
        prev = self.last.get(hb.node)
        if prev is not None and prev[0] == hb.boot:
            if hb.seq <= prev[1]:
                if link is None:
                    if hb.seq == prev[1]:
                        self.counters.duplicate += 1
                    else:
                        self.counters.replayed += 1
                    return None
                seen = self.last_on_link.get((hb.node, link))
                if seen is not None and seen[0] == hb.boot and hb.seq <= seen[1]:
                    self.counters.replayed += 1   # this link delivered it (or a newer one) already
                else:
                    self.counters.duplicate += 1  # came over another link first
                    self.last_on_link[(hb.node, link)] = (hb.boot, hb.seq)
                return None
        elif abs(hb.time - self.clock()) > MAX_SKEW_S or (prev is not None and hb.time <= prev[2]):
            self.counters.replayed += 1  # an old boot's heartbeat, recorded and sent again
            return None
        self.last[hb.node] = (hb.boot, hb.seq, hb.time)
        self.last_on_link[(hb.node, link)] = (hb.boot, hb.seq)
        self.counters.accepted += 1
        return hb


def random_key() -> bytes:
    return secrets.token_hex(32).encode()


def write_key(path: str | Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(random_key())
