"""The node's controllers: loops that run beside the data plane and act on what it does.

For example ``statistics.StatisticsController`` samples the counters every second into an
embedded SQLite time-series store, and ``logger.LoggerController`` records every event
(a rotated, fsynced file, optionally forwarded to syslog).
"""
