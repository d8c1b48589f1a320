"""Telemetry out of the node: Prometheus /metrics (prometheus.py), syslog RFC 5424 (syslog.py)."""
