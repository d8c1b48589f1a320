"""What a rejected project file says: every problem found, one line each.

A line reads ``<field path>: <value> <why>`` (a bad value) or ``<field path>: <text>`` (a
missing field, a count over a limit); values are shown as YAML-like JSON, short.
"""

from __future__ import annotations

import json
from typing import Any


class ConfigError(Exception):
    """A project file that cannot be used; ``problems`` lists every reason, one per field."""

    def __init__(self, problems: list[str], source: str = "<file>"):
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(self.problems))


class Problems(list):
    """Every problem found so far, as the lines ConfigError shows."""

    def add(self, path: str, value: Any, why: str) -> None:
        """A bad value: `path: value why`."""
        self.append(f"{path}: {show(value)} {why}")

    def say(self, path: str, text: str) -> None:
        """A problem that is not about one value (a missing field, a count)."""
        self.append(f"{path}: {text}")


def show(value: Any) -> str:
    """A value as the problem line shows it: YAML-like and short."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def host_port(address, port: int, proto: str) -> str:
    """A listener as problems name it: ``10.0.0.10:80/tcp``, ``[2001:db8::10]:80/tcp``."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}/{proto}"
