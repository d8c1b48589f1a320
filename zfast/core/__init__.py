"""The core service: a project's balancer pair (and routers) as instances on one host.

runtime.py   the instance runtime: a network namespace with its links, a cgroup with CPU
             and memory limits, and a zfast daemon inside; behind an interface so that a
             real container manager (LXC/LXD, systemd) can be another implementation.
cgroups.py   CPU and memory limits and usage (cgroup v2, else v1).
service.py   zfast core up: the instances, the repair controller, core status.
"""
