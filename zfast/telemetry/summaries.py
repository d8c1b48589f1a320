"""The figures of `zfast stats --since`: totals and rates per service, backend, public
port, drop reason, instance and map over a window of stored samples."""

from __future__ import annotations

import warnings

import numpy as np

from zfast.telemetry.series import Series, deltas
from zfast.telemetry.serieskeys import SeriesKey, is_gauge

_CHUNK = 512      # counter columns at a time: bounded temporaries with many series


def _num(x) -> float | None:
    """A JSON-friendly float (None for NaN)."""
    x = float(x)
    return None if x != x else round(x, 3)


def _rate(x: float | None) -> float | None:
    return _num(x) if x is not None else None


def _percentiles(rates: np.ndarray, qs=(50, 99)) -> np.ndarray:
    """nanpercentile of each column, NaN for columns with no value (no warning)."""
    if rates.shape[0] == 0:
        return np.full((len(qs), rates.shape[1]), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanpercentile(rates, qs, axis=0)


class _Window:
    """The figures of one Series: each counter's increase and per-sample rates (computed
    once for all of them), each gauge's last value."""

    def __init__(self, s: Series, seconds: float):
        self.s = s
        self.seconds = seconds
        self._counters: dict[str, dict] = {}
        columns = [j for j, name in enumerate(s.names) if not is_gauge(name)]
        if len(s) < 2 or not columns:
            return
        dt = np.diff(s.time)
        for lo in range(0, len(columns), _CHUNK):
            cols = columns[lo:lo + _CHUNK]
            d, valid = deltas(s.matrix[:, cols])
            with np.errstate(divide="ignore", invalid="ignore"):
                r = d / dt[:, None]
            r[~valid | (dt[:, None] <= 0)] = np.nan
            p50, p99 = _percentiles(r)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                peak = np.nanmax(r, axis=0) if r.shape[0] else np.full(len(cols), np.nan)
            total = d.sum(axis=0)
            for k, j in enumerate(cols):
                self._counters[s.names[j]] = {"total": int(total[k]), "p50": p50[k],
                                              "p99": p99[k], "max": peak[k]}

    def counter(self, name: str) -> dict:
        """{"total": increase, "rate": its average per second (None over no time), and
        "p50", "p99", "max" of the per-sample rates}."""
        st = self._counters.get(name, {"total": 0, "p50": np.nan, "p99": np.nan, "max": np.nan})
        return {"total": st["total"], "rate": st["total"] / self.seconds if self.seconds > 0 else None,
                "p50": _num(st["p50"]), "p99": _num(st["p99"]), "max": _num(st["max"])}

    def gauge_last(self, name: str) -> int | None:
        if name not in self.s:
            return None
        col = self.s[name]
        present = col[col >= 0]
        return int(present[-1]) if len(present) else None

    def gauge_max(self, name: str) -> float | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return _num(np.nanmax(self.s.get(name)))

    def present(self, name: str) -> bool:
        """Is the series in the last sample (not gone, e.g. with its backend)?"""
        return bool(self.s[name][-1] >= 0)


def summarize(s: Series) -> dict:
    """Totals and rates of a Series: {"since", "until", "seconds", "samples", "services": [{
    "name", "vip", "packets", "bytes", "pps", "bps", "p50_pps", "p99_pps", "max_pps",
    "backends": [{"address", "packets", "bytes", "pps", "bps", "p50_pps", "p99_pps",
    "weight", "healthy"}]}], "public_ports": [...], "drops": {reason: {"packets", "pps"}},
    "flows": {"last", "max"}, "instances": {name: {"cpu", "cpu_p99", "memory"}},
    "maps": {name: {"entries", "max", "fill"}}}. Packets and bytes are the increase over the
    window (resets counted); pps its average; p50/p99/max of the per-sample rates."""
    n = len(s)
    out = {"since": float(s.time[0]) if n else None, "until": float(s.time[-1]) if n else None,
           "seconds": float(s.time[-1] - s.time[0]) if n > 1 else 0.0, "samples": n,
           "services": [], "public_ports": [], "drops": {}, "flows": None, "instances": {},
           "maps": {}}
    if n == 0:
        return out
    w = _Window(s, out["seconds"])
    keys = [(name, key) for name in s.names if (key := SeriesKey.parse(name)) is not None]
    services: dict[str, dict] = {}
    for name, key in keys:
        if key.kind == "service" and key.field == "packets":
            services[key.service] = _service(w, key, s.meta.get("services", {}).get(key.service))
    for name, key in keys:
        if key.kind == "backend" and key.field == "packets" and key.service in services:
            services[key.service]["backends"].append(_backend(w, key))
        elif key.kind == "port" and key.field == "packets":
            out["public_ports"].append(_public_port(w, key))
        elif key.kind == "drop":
            p = w.counter(name)
            out["drops"][key.reason] = {"packets": p["total"], "pps": _rate(p["rate"])}
        elif key.kind == "cpu":
            out["instances"][key.instance] = _instance(w, key)
        elif key.kind == "map" and key.field == "entries":
            entries, most = w.gauge_last(name), w.gauge_last(key.sibling(field="max"))
            fill = round(entries / most, 6) if entries is not None and most and most > 0 else None
            out["maps"][key.map] = {"entries": entries, "max": most, "fill": fill}
    out["services"] = list(services.values())
    if "flows" in s:
        out["flows"] = {"last": w.gauge_last("flows"), "max": w.gauge_max("flows")}
    return out


def _service(w: _Window, key: SeriesKey, vip: str | None) -> dict:
    p, b = w.counter(key.name), w.counter(key.sibling(field="bytes"))
    return {"name": key.service, "vip": vip, "packets": p["total"], "bytes": b["total"],
            "pps": _rate(p["rate"]), "bps": _rate(b["rate"]),
            "p50_pps": p["p50"], "p99_pps": p["p99"], "max_pps": p["max"],
            "present": w.present(key.name), "backends": []}


def _backend(w: _Window, key: SeriesKey) -> dict:
    p, b = w.counter(key.name), w.counter(key.sibling(field="bytes"))
    healthy = w.gauge_last(key.sibling(field="healthy"))
    return {"address": key.address, "packets": p["total"], "bytes": b["total"],
            "pps": _rate(p["rate"]), "bps": _rate(b["rate"]),
            "p50_pps": p["p50"], "p99_pps": p["p99"], "max_pps": p["max"],
            "weight": w.gauge_last(key.sibling(field="weight")),
            "healthy": None if healthy is None else bool(healthy),
            "present": w.present(key.name)}


def _public_port(w: _Window, key: SeriesKey) -> dict:
    p = w.counter(key.name)
    entry = {"address": key.address, "port": key.port, "proto": key.proto,
             "packets": p["total"], "pps": _rate(p["rate"]), "p99_pps": p["p99"]}
    for field in ("allowed", "denied", "rate_limited"):
        if key.sibling(field=field) in w.s:
            entry[field] = w.counter(key.sibling(field=field))["total"]
    return entry


def _instance(w: _Window, key: SeriesKey) -> dict:
    c = w.counter(key.name)
    memory = key.sibling(kind="memory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {
            # microseconds of CPU a second / 1e6: the share of one CPU
            "cpu": _num(c["rate"] / 1e6) if c["rate"] is not None else None,
            "cpu_p99": _num(c["p99"] / 1e6) if c["p99"] is not None else None,
            "memory": w.gauge_last(memory),
            "memory_max": w.gauge_max(memory) if memory in w.s else None}
