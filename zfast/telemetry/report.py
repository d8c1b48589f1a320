"""``zfast report``: a PNG of packets, drops and flows over time, from the statistics store.

``render(series, path, since)`` draws three panels sharing the time axis: packets per
second of each service (and of the busiest backends when there are few), drops per second
by reason, and the flow table's entries. matplotlib with the Agg canvas: no display, no
global pyplot state (safe from any thread).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from zfast.telemetry.series import Series

MAX_LINES = 12   # per panel; the rest are summed into "other"


def _dates(ts: np.ndarray) -> list[datetime]:
    return [datetime.fromtimestamp(t, timezone.utc) for t in ts]


def _top(series: Series, names: list[str], label) -> list[tuple[str, np.ndarray]]:
    """(label, rate) of each counter, the busiest MAX_LINES of them plus "other"."""
    rates = [(label(n), series.rate(n)) for n in names]
    rates.sort(key=lambda lr: -np.nansum(lr[1]))
    if len(rates) <= MAX_LINES:
        return rates
    head, tail = rates[:MAX_LINES - 1], rates[MAX_LINES - 1:]
    other = np.nansum(np.vstack([r for _, r in tail]), axis=0)
    return head + [(f"other ({len(tail)})", other)]


def render(series: Series, path: str | Path, since: float | None = None,
           until: float | None = None, title: str | None = None) -> Path:
    """Write the PNG to path; returns it. An empty series gives a PNG that says so."""
    path = Path(path)
    until = until if until is not None else (float(series.time[-1]) if len(series) else time.time())
    since = since if since is not None else (float(series.time[0]) if len(series) else until - 600)
    fig = Figure(figsize=(11, 9), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    span = f"{datetime.fromtimestamp(since, timezone.utc):%Y-%m-%d %H:%M:%S} to " \
           f"{datetime.fromtimestamp(until, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    fig.suptitle(f"{title or 'zfast'}: {span}")
    x = _dates(series.time)

    ax = axes[0]
    services = [n for n in series.names if n.startswith("service/") and n.endswith("/packets")]
    for label, r in _top(series, services, lambda n: n.split("/")[1]):
        ax.plot(x, r, label=label, linewidth=1)
    if len(services) <= 3:   # few services: their backends too, dashed
        backends = [n for n in series.names if n.startswith("backend/") and n.endswith("/packets")]
        for label, r in _top(series, backends, lambda n: "/".join(n.split("/")[1:3]))[:8]:
            ax.plot(x, r, label=label, linewidth=0.8, linestyle="--")
    ax.set_ylabel("packets/s")
    ax.set_title("packets per second, per service (dashed: backends)", fontsize=10)

    ax = axes[1]
    drops = [n for n in series.names if n.startswith("drop/")]
    drawn = 0
    for label, r in _top(series, drops, lambda n: n.split("/", 1)[1].removeprefix("drop_")):
        if np.nansum(r) > 0:
            ax.plot(x, r, label=label, linewidth=1)
            drawn += 1
    if not drawn:
        ax.plot(x, np.zeros(len(x)), label="no drops", linewidth=1, color="grey")
    ax.set_ylabel("packets/s")
    ax.set_title("drops per second, by reason", fontsize=10)

    ax = axes[2]
    if "flows" in series:
        ax.plot(x, series.get("flows"), label="flows", linewidth=1, color="tab:purple")
    else:
        ax.text(0.5, 0.5, "no flow count recorded", transform=ax.transAxes, ha="center",
                va="center", color="grey")
    ax.set_ylabel("entries")
    ax.set_title("flow table", fontsize=10)

    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8, ncol=2)
    axes[-1].set_xlim(datetime.fromtimestamp(since, timezone.utc),
                      datetime.fromtimestamp(until, timezone.utc))
    locator = AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    if not len(series):
        axes[0].text(0.5, 0.5, "no samples in this window", transform=axes[0].transAxes,
                     ha="center", va="center")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
