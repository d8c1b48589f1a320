"""Every controller: a decision, taken from observations and a clock, that the daemon
around it carries out.

activity    is this node's data plane healthy (the pair hands over when it is not)?
health      backend health checks: UP, DOWN, draining
repair      (core service) which instances are abnormal, and what replaces them
scaling     (core service) CPU, memory and map sizes of each instance
statistics  counters sampled every second into the statistics store (telemetry)
logger      every event, to a rotated file and optionally syslog
"""
