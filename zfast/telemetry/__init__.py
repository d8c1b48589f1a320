"""Telemetry out of the node.

prometheus  /metrics
syslog      RFC 5424 forwarding of events
report      `zfast report`: packets, drops and flows over time as a picture
"""
