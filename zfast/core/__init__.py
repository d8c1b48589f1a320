"""The core service: a project's balancer pair (and routers) as instances on one host.

runtime.py   the instance runtime: a network namespace with its links, a cgroup with CPU
             and memory limits, and a zfast daemon inside; behind an interface so that a
             real container manager (LXC/LXD, systemd) can be another implementation.
lxd.py       that interface over LXD's REST API: each instance a privileged container.
cgroups.py   CPU and memory limits and usage (cgroup v2, else v1).
spare.py     a parked spare daemon (compiled ahead), in the daemon's process.
plan.py      the instances' specs (addresses, sizes, project files) from the project file.
launcher.py  instances and the parked spare started and removed; the start boost.
observe.py   each instance's process, status and cgroup: the repair controller's input.
resizer.py   the scaling controller's samples in, its decisions carried out.
routes.py    the core's HTTP API (status, stats, certs, apply).
service.py   zfast core up: the loop that observes, asks the controllers, carries out.
"""
