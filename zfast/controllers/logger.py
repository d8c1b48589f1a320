"""The logger controller: every event of the node, recorded, bounded, and sent to syslog.

An event is one JSON object a line in ``<state_dir>/events.jsonl`` (the format of
zfast.events: ``time`` RFC 3339 UTC, ``node``, ``kind`` and its fields), written and
fsynced before ``log()`` returns: a daemon killed with SIGKILL right after keeps it.

The file is bounded: when a line would take it past ``max_bytes`` it is renamed
``events.jsonl.1`` (``.1`` to ``.2`` ... up to ``.keep``; the oldest is removed) and a new
one started, so the log takes at most (keep + 1) * max_bytes. ``read()`` goes through the
rotated files oldest first; ``follow()`` keeps reading across rotations.

With a syslog target, each event is also queued for the syslog forwarder (RFC 5424, a
background thread, bounded queue that drops its oldest): syslog never blocks the node.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from zfast.events import FILE_NAME, parse_time, rfc3339
from zfast.telemetry.syslog import SyslogForwarder

MAX_BYTES = 10 * 2 ** 20     # 10 MiB a file
KEEP = 5                     # rotated files kept: at most 60 MiB of events


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def log_files(state_dir: Path, keep: int | None = None) -> list[Path]:
    """The event files that exist, oldest first: events.jsonl.K ... .1, events.jsonl."""
    state_dir = Path(state_dir)
    rotated = []
    for p in state_dir.glob(FILE_NAME + ".*"):
        suffix = p.name[len(FILE_NAME) + 1:]
        if suffix.isdigit() and (keep is None or int(suffix) <= keep):
            rotated.append((int(suffix), p))
    return [p for _, p in sorted(rotated, reverse=True)] + [state_dir / FILE_NAME]


def _events_in(path: Path, since: float | None) -> Iterator[dict]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                break   # a line being written (or cut by a crash mid-write)
            event = _event(line, since)
            if event is not None:
                yield event


def _event(line: bytes, since: float | None) -> dict | None:
    """One log line as an event, or None if it is not one or is older than since."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if since is not None and parse_time(event["time"]) < since:
        return None
    return event


def read(state_dir: Path, since: float | None = None) -> Iterator[dict]:
    """Every event in the log, the rotated files included, oldest first."""
    for path in log_files(state_dir):
        yield from _events_in(path, since)


def follow(state_dir: Path, since: float | None = None, stop: threading.Event | None = None,
           poll: float = 0.2, from_end: bool = False) -> Iterator[dict]:
    """The events since `since` (all with since=None; none of the past with from_end),
    then each new one as it is logged, across rotations, until stop is set."""
    state_dir = Path(state_dir)
    current = state_dir / FILE_NAME
    if not from_end:
        # the rotated files first; then the current file from its start
        for path in log_files(state_dir)[:-1]:
            yield from _events_in(path, since)
    f = None
    ino = None
    pending = b""
    while True:
        if f is None:
            try:
                f = open(current, "rb")
                ino = os.fstat(f.fileno()).st_ino
                if from_end:
                    f.seek(0, os.SEEK_END)
                    from_end = False
            except FileNotFoundError:
                f = None
        got = False
        if f is not None:
            while True:
                chunk = f.readline()
                if not chunk:
                    break
                pending += chunk
                if not pending.endswith(b"\n"):
                    continue  # the rest of the line is on its way
                line, pending = pending, b""
                got = True
                event = _event(line, since)
                if event is not None:
                    yield event
            # rotated? the name now points at another file: finish this one (done), reopen
            try:
                if os.stat(current).st_ino != ino:
                    rest = f.read()
                    for line in (pending + rest).splitlines(keepends=True):
                        if line.endswith(b"\n"):
                            try:
                                event = json.loads(line)
                            except ValueError:
                                continue
                            if since is None or parse_time(event["time"]) >= since:
                                yield event
                    pending = b""
                    f.close()
                    f = None
                    # files rotated after ours (several rotations between two polls)
                    # hold events we have not seen: read them, oldest first
                    rotated = log_files(state_dir)[:-1]
                    inodes = []
                    for path in rotated:
                        try:
                            inodes.append(path.stat().st_ino)
                        except FileNotFoundError:
                            inodes.append(None)
                    after = rotated[inodes.index(ino) + 1:] if ino in inodes else rotated
                    for path in after:
                        yield from _events_in(path, since)
                    continue
            except FileNotFoundError:
                pass
        if got:
            continue
        if stop is not None:
            if stop.wait(poll):
                break
        else:
            time.sleep(poll)
    if f is not None:
        f.close()


class LoggerController:
    """The node's event log: .log(kind, **fields) -> the event; plus rotation,
    syslog forwarding, .read(since), .follow(), .status(), .close()."""

    def __init__(self, state_dir: Path, node: str, syslog: str | None = None,
                 max_bytes: int = MAX_BYTES, keep: int = KEEP,
                 clock: Callable[[], float] = time.time, hostname: str | None = None,
                 fsync: bool = True):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / FILE_NAME
        self.node = node
        self.max_bytes = max_bytes
        self.keep = keep
        self.clock = clock
        self.fsync = fsync
        self._lock = threading.Lock()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0
        self._open()
        self.logged = 0
        self.rotations = 0
        self.write_errors = 0
        self.forwarder = None
        if syslog:
            self.forwarder = SyslogForwarder(syslog, hostname=hostname)

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    # ---- writing

    def log(self, kind: str, **fields) -> dict:
        """Record one event; it is on disk (fsynced) when this returns. Never raises for a
        disk problem (counted in write_errors, reported by status()): the node goes on."""
        event = {"time": rfc3339(self.clock()), "node": self.node, "kind": kind, **fields}
        line = (json.dumps(event, default=str) + "\n").encode()
        with self._lock:
            try:
                if self._fd is None:
                    self._open()
                if self._size and self._size + len(line) > self.max_bytes:
                    self._rotate()
                written = 0
                while written < len(line):   # O_APPEND writes of a line this size are whole
                    written += os.write(self._fd, line[written:])
                if self.fsync:
                    os.fsync(self._fd)
                self._size += len(line)
                self.logged += 1
            except OSError as err:
                self.write_errors += 1
                self.last_write_error = f"{type(err).__name__}: {err}"
                if self._fd is not None:
                    try:
                        os.close(self._fd)
                    except OSError:
                        pass
                    self._fd = None
        if self.forwarder is not None:
            self.forwarder.send(event)
        return event

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = None
        oldest = self.state_dir / f"{FILE_NAME}.{self.keep}"
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest.unlink(missing_ok=True)
            for i in range(self.keep - 1, 0, -1):
                src = self.state_dir / f"{FILE_NAME}.{i}"
                if src.exists():
                    src.rename(self.state_dir / f"{FILE_NAME}.{i + 1}")
            self.path.rename(self.state_dir / f"{FILE_NAME}.1")
        self._open()
        if self.fsync:
            _fsync_dir(self.state_dir)   # the renames and the new file survive a crash too
        self.rotations += 1

    def handler(self, level: int = logging.ERROR) -> logging.Handler:
        """A logging.Handler that records log records at `level` and above as events of
        kind "error" (attach it to logging.getLogger("zfast"))."""
        ctl = self

        class _Handler(logging.Handler):
            _busy = threading.local()

            def emit(self, record: logging.LogRecord) -> None:
                if getattr(self._busy, "on", False):
                    return  # an error while logging an error: do not loop
                self._busy.on = True
                try:
                    ctl.log("error", error=record.getMessage(), logger=record.name,
                            level=record.levelname.lower())
                except Exception:
                    pass
                finally:
                    self._busy.on = False

        return _Handler(level)

    # ---- reading

    def read(self, since: float | None = None) -> Iterator[dict]:
        return read(self.state_dir, since)

    def follow(self, since: float | None = None, stop: threading.Event | None = None,
               poll: float = 0.2, from_end: bool = False) -> Iterator[dict]:
        return follow(self.state_dir, since, stop, poll, from_end)

    def status(self) -> dict:
        out = {"healthy": self.write_errors == 0, "file": str(self.path), "bytes": self._size,
               "max_bytes": self.max_bytes, "keep": self.keep, "logged": self.logged,
               "rotations": self.rotations, "write_errors": self.write_errors}
        if self.write_errors:
            out["last_write_error"] = getattr(self, "last_write_error", None)
        if self.forwarder is not None:
            out["syslog"] = self.forwarder.status()
        return out

    def close(self, timeout: float = 2.0) -> None:
        if self.forwarder is not None:
            self.forwarder.close(timeout)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
