"""Statistics series in memory: the samples of a time window, one int64 column a series,
with reset-aware deltas and rates.

Rates come from reset-aware deltas: a counter that goes down (the daemon restarted with
fresh maps, a backend slot was reused) restarted from zero, so the delta is its new value,
never negative.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

MISSING = -1                   # no value (counters and gauges are never negative)


def deltas(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reset-aware deltas of counter columns m (n, k) int64 (MISSING where absent):
    (d (n-1, k) int64, valid (n-1, k) bool). A counter that went down restarted at 0,
    so its delta is its new value: never negative."""
    prev, cur = m[:-1], m[1:]
    valid = (prev >= 0) & (cur >= 0)
    d = cur - prev
    d = np.where(d < 0, cur, d)
    return np.where(valid, d, 0), valid


@dataclass
class Series:
    """Samples from ``since`` to ``until``: ``time`` (n,) seconds, one int64 column per name
    (MISSING where that series was absent: before it existed, after it went away)."""

    time: np.ndarray
    names: list[str]
    matrix: np.ndarray                       # (n, len(names)) int64
    meta: dict = field(default_factory=dict)  # the last layout's meta ({"services": {name: vip}})

    def __len__(self) -> int:
        return len(self.time)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __post_init__(self):
        self._index = {n: i for i, n in enumerate(self.names)}

    def __getitem__(self, name: str) -> np.ndarray:
        return self.matrix[:, self._index[name]]

    def get(self, name: str) -> np.ndarray:
        """Values as float64, NaN where absent (for gauges and plots)."""
        col = self[name].astype(np.float64)
        col[col < 0] = np.nan
        return col

    def delta(self, name: str) -> np.ndarray:
        """Reset-aware increase between consecutive samples, (n-1,) int64 (0 where unknown)."""
        d, _ = deltas(self[name][:, None])
        return d[:, 0]

    def total(self, name: str) -> int:
        """Increase of a counter over the whole series, resets counted."""
        return int(self.delta(name).sum()) if len(self) > 1 else 0

    def rate(self, name: str) -> np.ndarray:
        """Per second, (n,) float64: NaN for the first sample and where unknown."""
        out = np.full(len(self), np.nan)
        if len(self) < 2:
            return out
        d, valid = deltas(self[name][:, None])
        dt = np.diff(self.time)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = d[:, 0] / dt
        r[~valid[:, 0] | (dt <= 0)] = np.nan
        out[1:] = r
        return out

    def matching(self, pattern: str) -> list[str]:
        return [n for n in self.names if fnmatch.fnmatchcase(n, pattern)]

    def to_json(self) -> dict:
        """{"time": [...], "series": {name: [int | None, ...]}, "meta": ...} (for the API)."""
        return {"time": self.time.tolist(),
                "series": {n: [None if v < 0 else int(v) for v in self.matrix[:, i]]
                           for i, n in enumerate(self.names)},
                "meta": self.meta}

    @classmethod
    def from_json(cls, doc: dict) -> "Series":
        names = list(doc["series"])
        n = len(doc["time"])
        m = np.full((n, len(names)), MISSING, dtype=np.int64)
        for j, name in enumerate(names):
            col = doc["series"][name]
            m[:, j] = [MISSING if v is None else v for v in col]
        return cls(np.asarray(doc["time"], dtype=np.float64), names, m, doc.get("meta", {}))


def name_selector(names: Iterable[str] | None) -> Callable[[str], bool]:
    """A test for series names: exact names or fnmatch patterns ("backend/app/*/packets");
    None selects every series."""
    if names is None:
        return lambda _n: True
    exact = {n for n in names if not any(c in n for c in "*?[")}
    patterns = [n for n in names if n not in exact]
    return lambda n: n in exact or any(fnmatch.fnmatchcase(n, p) for p in patterns)
