"""``telemetry``: where the node exports its counters and events (docs/operations.md).

Checked here by zfast.telemetry's own parsers; the node reads the values from
``Project.raw``.
"""

from __future__ import annotations

from dataclasses import dataclass

from zfast.config import kinds
from zfast.config.schema import setting
from zfast.telemetry.syslog import parse_target


def _check_prometheus(value) -> None:
    # prometheus_client (~9 ms) is not for every reader of a project file (every zfast
    # command): only a file with a prometheus address pays for it
    from zfast.telemetry.prometheus import parse_addr  # noqa: PLC0415
    parse_addr(value)


@dataclass(frozen=True)
class Telemetry:
    prometheus: str | None = setting(kinds.Checked(_check_prometheus, "HOST:PORT"), default=None,
                                     doc="the /metrics endpoint")
    syslog: str | None = setting(kinds.Checked(parse_target, "udp://HOST:PORT or unix:///PATH"),
                                 default=None, doc="where events go as RFC 5424 syslog")
