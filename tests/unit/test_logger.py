"""The logger controller: the event format, rotation within bounds, reading and following
across rotations, a SIGKILLed writer that loses nothing it logged, and a syslog target
that is away never slowing or breaking log()."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from zfast import events
from zfast.controllers import logger
from zfast.controllers.logger import LoggerController

REPO = Path(__file__).resolve().parents[2]


def test_the_event_format(tmp_path):
    # a log left by an earlier daemon: the controller appends to it in the same format
    old = {"time": events.rfc3339(time.time()), "node": "lb-a", "kind": "apply", "revision": 1,
           "changes": ["+ service app"]}
    (tmp_path / "events.jsonl").write_text(json.dumps(old) + "\n")
    new = LoggerController(tmp_path, "lb-a").log("apply", revision=2, changes=[])
    assert set(old) == set(new) == {"time", "node", "kind", "revision", "changes"}
    assert new["node"] == "lb-a" and new["kind"] == "apply"
    assert abs(events.parse_time(new["time"]) - time.time()) < 5
    assert new["time"].endswith("Z")
    # both readers read both lines: events.read and logger.read (zfast logs)
    assert [e["revision"] for e in events.read(tmp_path)] == [1, 2]
    assert [e["revision"] for e in logger.read(tmp_path)] == [1, 2]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert json.loads(lines[1]) == new


def test_read_since(tmp_path):
    t = [1_700_000_000.0]
    log = LoggerController(tmp_path, "n", clock=lambda: t[0])
    for i in range(10):
        log.log("scale", i=i)
        t[0] += 60
    assert [e["i"] for e in log.read(since=1_700_000_000.0 + 5 * 60)] == [5, 6, 7, 8, 9]


def test_rotation_keeps_the_newest_within_bounds(tmp_path):
    log = LoggerController(tmp_path, "n", max_bytes=2000, keep=2)
    for i in range(300):
        log.log("backend", address="10.1.0.2", state="down" if i % 2 else "up", seq=i)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    for name in files:
        assert (tmp_path / name).stat().st_size <= 2000
    seqs = [e["seq"] for e in log.read()]
    assert seqs == list(range(seqs[0], 300))          # oldest first, nothing in between lost
    assert len(seqs) >= 2 * 2000 // 120               # about three files of ~100-byte lines
    assert log.status()["rotations"] > 0


def test_follow_across_rotations(tmp_path):
    log = LoggerController(tmp_path, "n", max_bytes=1000, keep=50)
    log.log("apply", seq=-1)
    stop = threading.Event()
    got = []

    def reader():
        for ev in logger.follow(tmp_path, stop=stop, poll=0.01):
            got.append(ev["seq"])

    th = threading.Thread(target=reader)
    th.start()
    try:
        for i in range(200):
            log.log("scale", seq=i)
            if i % 20 == 0:
                time.sleep(0.02)
        deadline = time.time() + 5
        while len(got) < 201 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        th.join(5)
    assert log.status()["rotations"] >= 10
    assert got == list(range(-1, 200))


def test_follow_from_end_sees_only_new_events(tmp_path):
    log = LoggerController(tmp_path, "n")
    log.log("apply", seq=0)
    stop = threading.Event()
    got = []
    it = log.follow(stop=stop, poll=0.01, from_end=True)
    th = threading.Thread(target=lambda: [got.append(e["seq"]) for e in it])
    th.start()
    time.sleep(0.1)
    log.log("apply", seq=1)
    deadline = time.time() + 5
    while not got and time.time() < deadline:
        time.sleep(0.01)
    stop.set()
    th.join(5)
    assert got == [1]


def test_a_handler_turns_errors_into_events(tmp_path):
    log = LoggerController(tmp_path, "n")
    lg = logging.getLogger("zfast.test_logger")
    h = log.handler()
    lg.addHandler(h)
    try:
        lg.warning("not this one")
        lg.error("health check of %s failed", "10.1.0.2")
    finally:
        lg.removeHandler(h)
    got = list(log.read())
    assert len(got) == 1 and got[0]["kind"] == "error"
    assert got[0]["error"] == "health check of 10.1.0.2 failed"


def test_an_absent_syslog_never_blocks_nor_raises(tmp_path):
    log = LoggerController(tmp_path, "n", syslog=f"unix://{tmp_path}/no-such-socket")
    started = time.perf_counter()
    for i in range(500):
        log.log("role", role="active", seq=i)
    took = time.perf_counter() - started
    log.forwarder.flush(5)
    st = log.status()
    assert st["logged"] == 500 and len(list(log.read())) == 500
    assert st["syslog"]["errors"] + st["syslog"]["dropped"] == 500 and st["syslog"]["sent"] == 0
    assert "No such file" in st["syslog"]["last_error"] or "refused" in st["syslog"]["last_error"]
    assert took < 5, took
    log.close()


# Run with PYTHONPATH at this checkout: it imports the zfast under test.
CHILD = textwrap.dedent("""
    from zfast.controllers.logger import LoggerController
    log = LoggerController({state!r}, "lb-a", max_bytes=20000, keep=100)
    i = 0
    while True:
        log.log("repair", instance="lb-b", seq=i, note="x" * (i % 50))
        print(i, flush=True)     # log() returned: this event must survive
        i += 1
""")


def test_sigkill_loses_no_logged_event(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(state=str(tmp_path))],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    acknowledged = -1
    try:
        for line in child.stdout:
            acknowledged = int(line)
            if acknowledged >= 1500:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    seqs = [e["seq"] for e in logger.read(tmp_path)]
    assert seqs[:acknowledged + 1] == list(range(acknowledged + 1)), "an acknowledged event is missing"
    assert len(seqs) <= acknowledged + 2 + 5   # and nothing invented (the pipe may lag a few)
    assert len(list(tmp_path.glob("events.jsonl.*"))) >= 3   # it rotated meanwhile
