"""The node's event log format: one JSON object a line in <state_dir>/events.jsonl.

Every event has ``time`` (RFC 3339, UTC), ``node`` and ``kind`` (apply, role,
repair, scale, backend, firewall, error, ...) plus its own fields. The logger
controller (zfast/controllers/logger.py) writes them, fsynced, and rotates the
file; ``read`` here reads the current file only.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

FILE_NAME = "events.jsonl"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


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
