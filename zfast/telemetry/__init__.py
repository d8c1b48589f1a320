"""Telemetry out of the node, and the statistics store it is read from.

series       samples of a time window in memory (Series), reset-aware deltas and rates
serieskeys   the series' names: a stats dict flattened into them, SeriesKey parsing one
seriesstore  the SQLite file the statistics controller writes: 1 s rows, then 1 min rows
summaries    `zfast stats --since`: totals and rates per service, backend, port, ...
prometheus   /metrics
syslog       RFC 5424 forwarding of events
report       `zfast report`: packets, drops and flows over time as a picture
"""
