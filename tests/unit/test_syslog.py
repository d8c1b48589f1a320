"""Syslog forwarding, RFC 5424: real receivers (a UDP socket on 127.0.0.1, a unix datagram
socket in a temp dir) get every event, and each message's fields are parsed and checked.
A receiver that is slow or away loses events (counted), never blocks the sender."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest

from zfast.controllers.logger import LoggerController
from zfast.telemetry import syslog
from zfast.telemetry.syslog import SyslogForwarder, format_event, parse_message, parse_target

# RFC 5424 section 6, for the header: no parsing shortcut of ours decides it
HEADER = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    r"(?P<ts>-|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})) "
    r"(?P<host>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<proc>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
    r'(?P<sd>-|(?:\[[!-~]{1,32}(?: [!-~]{1,32}="(?:[^"\\\]]|\\["\\\]])*")*\])+)'
    r"(?: (?P<msg>.*))?$", re.S)

EVENTS = [
    ("apply", {"revision": 3, "changes": ["+ backend 10.1.0.4", "~ weight 1 -> 2"]}),
    ("role", {"role": "active", "previous": "standby", "reason": "peer silent 150 ms"}),
    ("repair", {"instance": "lb-b", "action": "restart", "restarts": 2}),
    ("scale", {"instance": "lb-a", "cpu": [0.5, 1.0], "why": "cpu 85% for 60 s"}),
    ("firewall", {"change": "+ allow 198.51.100.0/24 on 2222/tcp", "revision": 4}),
    ("backend", {"service": "app", "address": "10.1.0.3", "state": "down"}),
    ("error", {"error": 'bad "quote" ] and \\ backslash', "unicode": "réseau ✓"}),
]

SEVERITIES = {"apply": 6, "role": 5, "repair": 5, "scale": 5, "firewall": 5, "backend": 4,
              "error": 3}


SO_RCVBUFFORCE = 33   # asm-generic/socket.h; Python's socket module does not name it


class Receiver:
    """A syslog server: one datagram socket, every message it gets."""

    def __init__(self, family: int, address):
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        # Room for every datagram a test sends: a receiving thread starved on a loaded
        # machine must not lose them to a full socket buffer (~212 KiB by default; past
        # net.core.rmem_max only with CAP_NET_ADMIN, hence FORCE first).
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.got: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.got.append(self.sock.recv(65536))
            except socket.timeout:
                continue
            except OSError:
                return

    def wait(self, count: int, timeout: float = 5.0) -> list[bytes]:
        deadline = time.time() + timeout
        while len(self.got) < count and time.time() < deadline:
            time.sleep(0.01)
        return list(self.got)

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def check(raw: bytes, logged: dict, hostname: str):
    text = raw.decode("utf-8")
    m = HEADER.match(text)
    assert m, f"not RFC 5424: {text!r}"
    pri = int(m["pri"])
    assert pri // 8 == 3, "facility daemon"
    assert pri % 8 == SEVERITIES[logged["kind"]], (logged["kind"], pri % 8)
    assert m["version"] == "1"
    assert m["ts"] == logged["time"]
    assert m["host"] == hostname
    assert m["app"] == "zfast"
    assert m["proc"] == str(os.getpid())
    assert m["msgid"] == logged["kind"]
    parsed = parse_message(raw)
    assert parsed.sd_id == "zfast@32473"
    fields = {k: v for k, v in logged.items() if k not in ("time", "kind")}
    assert set(parsed.params) == set(fields)
    for k, v in fields.items():
        assert parsed.params[k] == (v if isinstance(v, str) else json.dumps(v, separators=(",", ":")))
    assert m["msg"].startswith("\ufeff"), "UTF-8 MSG starts with the BOM"
    assert json.loads(parsed.msg) == logged


@pytest.mark.parametrize("transport", ["udp", "unix"])
def test_a_receiver_gets_every_event(tmp_path, transport):
    if transport == "udp":
        rx = Receiver(socket.AF_INET, ("127.0.0.1", 0))
        target = f"udp://127.0.0.1:{rx.address[1]}"
    else:
        rx = Receiver(socket.AF_UNIX, str(tmp_path / "log.sock"))
        target = f"unix://{tmp_path}/log.sock"
    log = LoggerController(tmp_path / "state", "lb-a", syslog=target, hostname="balancer-1")
    try:
        logged = [log.log(kind, **fields) for kind, fields in EVENTS * 20]
        got = rx.wait(len(logged))
        assert log.forwarder.flush(5)
    finally:
        log.close()
        rx.close()
    assert len(got) == len(logged), log.status()
    for raw, event in zip(got, logged):
        check(raw, event, "balancer-1")
    assert log.status()["syslog"] == {"target": target, "queued": 0, "sent": len(logged),
                                      "dropped": 0, "errors": 0, "last_error": None}


def test_a_restarted_receiver_gets_events_again(tmp_path):
    path = str(tmp_path / "log.sock")
    rx = Receiver(socket.AF_UNIX, path)
    fwd = SyslogForwarder(f"unix://{path}", hostname="h")
    fwd.send({"time": "2024-01-01T00:00:00.000Z", "node": "n", "kind": "apply"})
    assert len(rx.wait(1)) == 1
    rx.close()
    os.unlink(path)
    fwd.send({"time": "2024-01-01T00:00:01.000Z", "node": "n", "kind": "apply"})  # nobody there
    fwd.flush(2)
    rx = Receiver(socket.AF_UNIX, path)
    fwd.send({"time": "2024-01-01T00:00:02.000Z", "node": "n", "kind": "role", "role": "active"})
    got = rx.wait(1)
    fwd.close()
    rx.close()
    assert len(got) == 1 and parse_message(got[0]).msgid == "role"
    assert fwd.errors == 1 and fwd.sent == 2


def test_full_queue_drops_the_oldest_and_counts(tmp_path):
    rx = Receiver(socket.AF_INET, ("127.0.0.1", 0))
    fwd = SyslogForwarder(f"udp://127.0.0.1:{rx.address[1]}", queue_size=10)
    gate, holding = threading.Event(), threading.Event()
    real = fwd._send_one

    def slow(event):           # the receiver's side is stuck while 30 more come
        holding.set()
        gate.wait(5)
        real(event)

    fwd._send_one = slow
    fwd.send({"time": "-", "kind": "apply", "seq": 0})
    assert holding.wait(5)     # the thread holds event 0 (a sleep raced it under load)
    started = time.perf_counter()
    for i in range(1, 31):
        fwd.send({"time": "-", "kind": "apply", "seq": i})
    assert time.perf_counter() - started < 0.5   # send() did not wait
    assert fwd.dropped == 20
    gate.set()
    got = rx.wait(11)
    fwd.close()
    rx.close()
    seqs = [json.loads(parse_message(g).msg)["seq"] for g in got]
    assert seqs == [0] + list(range(21, 31))       # the oldest went


def test_escaping_and_long_events():
    ev = {"time": "2024-05-01T10:00:00.123Z", "node": "n", "kind": "apply",
          "changes": ["x" * 100] * 500, "quote": 'a"b]c\\d', "weird key=]\"": 1}
    data = format_event(ev, hostname="h", procid=1, max_bytes=4096)
    assert len(data) <= 4096
    m = parse_message(data)
    assert m.params["quote"] == 'a"b]c\\d'
    assert "weirdkey" in m.params
    body = json.loads(m.msg)
    assert body["truncated"] is True and body["quote"] == 'a"b]c\\d'
    short = format_event({"time": "2024-05-01T10:00:00Z", "kind": "x y"}, hostname="", procid=7)
    m = parse_message(short)
    assert m.hostname == "-" and m.msgid == "xy" and m.sd_id == "zfast@32473" and m.params == {}


def test_parse_target():
    assert parse_target("udp://127.0.0.1:5514") == syslog.Target("udp", "127.0.0.1", 5514)
    assert parse_target("udp://[::1]:514") == syslog.Target("udp", "::1", 514)
    assert parse_target("udp://logs.example.org").port == 514
    assert parse_target("unix:///dev/log") == syslog.Target("unix", path="/dev/log")
    for bad in ("tcp://127.0.0.1:514", "udp://:514", "unix://relative", "127.0.0.1:514",
                "udp://127.0.0.1:99999"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_a_unix_receiver_that_falls_behind_loses_nothing(tmp_path):
    """A unix datagram socket queues 10 datagrams (net.unix.max_dgram_qlen): a syslogd
    busy for a moment must get every event once it reads again, none counted as errors."""
    path = str(tmp_path / "slow.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(path)
    log = LoggerController(tmp_path / "state", "lb-a", syslog=f"unix://{path}", hostname="h")
    try:
        logged = [log.log("repair", n=i) for i in range(40)]
        time.sleep(0.3)                   # not reading: the queue fills, the forwarder waits
        rx.settimeout(2)
        got = [rx.recv(65536) for _ in logged]
        assert log.forwarder.flush(5)
    finally:
        log.close()
        rx.close()
    assert [json.loads(parse_message(raw).msg)["n"] for raw in got] == list(range(40))
    assert log.status()["syslog"]["errors"] == 0 and log.status()["syslog"]["sent"] == 40
