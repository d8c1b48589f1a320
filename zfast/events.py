"""The node's event log: one JSON object a line in <state_dir>/events.jsonl.

Every event has ``time`` (RFC 3339, UTC), ``node`` and ``kind`` (apply, role,
repair, scale, backend, firewall, error, ...) plus its own fields. Lines are
flushed and fsynced as they are written, so an event logged before a crash
is there after it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

FILE_NAME = "events.jsonl"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class EventLog:
    def __init__(self, state_dir: Path, node: str):
        self.path = Path(state_dir) / FILE_NAME
        self.node = node
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, kind: str, **fields) -> dict:
        event = {"time": rfc3339(time.time()), "node": self.node, "kind": kind, **fields}
        line = json.dumps(event, default=str) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return event


def read(state_dir: Path, since: float | None = None) -> Iterator[dict]:
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if since is None or parse_time(event["time"]) >= since:
                yield event
