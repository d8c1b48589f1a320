"""zfast report: a PNG from the statistics store (no display needed: the Agg canvas)."""

from __future__ import annotations

import struct

import numpy as np

from zfast.controllers.statistics import StatisticsController
from zfast.telemetry import report
from zfast.telemetry.series import Series

T0 = 1_700_000_000.0


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_render_from_the_store(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    t = [T0]
    n = [0]

    def collect():
        n[0] += 1
        p = n[0] * 100
        return {"services": [{"name": "app", "vip": "10.0.0.10", "packets": 2 * p, "bytes": 0,
                              "backends": [{"address": "10.1.0.2", "packets": p, "bytes": 0},
                                           {"address": "10.1.0.3", "packets": p, "bytes": 0}]}],
                "drops": {"drop_malformed": n[0] // 10, "drop_fw_denied": 0},
                "flows": 50 + n[0] % 7}

    ctl = StatisticsController(collect, tmp_path / "s.sqlite", clock=lambda: t[0])
    for _ in range(120):
        ctl.tick()
        t[0] += 1
    series = ctl.series(T0)
    ctl.stop()
    out = report.render(series, tmp_path / "out" / "report.png", since=T0)
    w, h = _png_size(out)
    assert (w, h) == (1100, 900)
    assert out.stat().st_size > 20_000   # three panels with lines, not an empty canvas


def test_render_an_empty_window(tmp_path):
    empty = Series(np.zeros(0), [], np.zeros((0, 0), dtype=np.int64))
    out = report.render(empty, tmp_path / "empty.png", since=T0, until=T0 + 600)
    assert _png_size(out) == (1100, 900)


def test_many_series_are_folded_into_other(tmp_path):
    names = [f"service/s{i}/packets" for i in range(30)]
    m = np.cumsum(np.ones((10, 30), dtype=np.int64), axis=0) * np.arange(1, 31)
    s = Series(T0 + np.arange(10.0), names, m)
    top = report._top(s, names, lambda n: n.split("/")[1])
    assert len(top) == report.MAX_LINES and top[-1][0] == "other (19)"
    assert top[0][0] == "s29"
    assert np.allclose(top[-1][1][1:], sum(range(1, 20)))   # s0..s18 summed, per second
