"""``core``: the core service of `zfast core up` (zfast/core/service.py; docs/operations.md).

::

    core:
      public:                    # required: the bridge clients reach the VIPs on
        subnet: 10.230.0.0/24    # required; the instances' addresses count down from the top
        bridge: zpub0            # default zpub0
        subnet6: "fd00:230::/64" # optional: IPv6 addresses for the instances too
      private:                   # required: the bridge of the backends
        subnet: 10.231.0.0/24    # required
        gateway: 10.231.0.254    # default: the subnet's last address but one; a VIP of the pair
        bridge: zpriv0           # default zpriv0
      balancer:                  # optional: each balancer instance's starting size
        cpu: 0.5                 # CPUs (its cgroup's quota)
        memory: 256Mi            # bytes, or a number with Ki, Mi, Gi, K, M or G
        flow_table: 131072       # default ZF_FLOW_TABLE (bpf/zfast_shared.h), as datapath's
        scale:                   # the scaling controller's bounds; each default its own
          cpu: [0.25, 2]         # [min, max]
          memory: [128Mi, 1Gi]
          flow_table: [131072, 1048576]
          cooldown_s: 60         # a resource shrinks only after this long unchanged
      routers:                   # optional; used when the file has a routing section
        count: 2                 # HTTP balancer instances
        cpu: 0.5
        memory: 256Mi
      runtime:                   # optional: what an instance is
        kind: netns              # netns (default: a namespace and a cgroup) or lxd (a container)
        socket: /var/lib/lxd/unix.socket   # lxd: the API; a list: one per member, tried in order
        image: zfast-...         # lxd: an image alias; default the one zfast builds and imports
        pool: default            # lxd: the storage pool of the containers' root disks

Only `zfast core up` reads it; the instances' files are made without it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, fields
from typing import Any

from zfast.config import kinds
from zfast.config.datapath import FLOW_TABLE
from zfast.config.problems import Problems
from zfast.config.schema import From, Reader, Section, setting
from zfast.dataplane.reasons import defines

# A CFS quota below 1 ms of its 10 ms period is raised to 1 ms (zfast/core/cgroups.py).
CPUS = kinds.Number(0.1, 1024)
MEMORY = kinds.Size(16 << 20, 1 << 40)
_SUBNET4 = kinds.Subnet(4, "10.230.0.0/24", max_prefix=30)
_SCALING = "the scaling controller's"   # its Bounds (zfast/controllers/scaling.py)


@dataclass(frozen=True)
class CorePublic:
    subnet: ipaddress.IPv4Network = setting(
        _SUBNET4, doc="the clients' side; the instances' addresses count down from the top")
    bridge: str = setting(kinds.INTERFACE_NAME, default="zpub0", doc="made if missing")
    subnet6: ipaddress.IPv6Network | None = setting(
        kinds.Subnet(6, "fd00:230::/64"), default=None, doc="IPv6 addresses for the instances too")


def read_core_private(problems: Problems, path: str, value: Any) -> CorePrivate:
    section = Reader(problems, path, value, CorePrivate)
    private = CorePrivate(**section.read_all())
    if (private.subnet is not None and private.gateway is not None
            and private.gateway not in private.subnet):
        problems.add(f"{path}.gateway", section.raw("gateway"), f"is not in {private.subnet}")
    return private


@dataclass(frozen=True)
class CorePrivate:
    subnet: ipaddress.IPv4Network = setting(
        _SUBNET4, doc="the backends' side; the instances' addresses count down from the top")
    gateway: ipaddress.IPv4Address = setting(
        kinds.Address("gateway", version=4), default=From("subnet", lambda subnet: subnet[-2]),
        shown_default="the subnet's last address but one",
        doc="in the subnet: the backends' default route, a VIP of the pair")
    bridge: str = setting(kinds.INTERFACE_NAME, default="zpriv0", doc="made if missing")


@dataclass(frozen=True)
class CoreScale:
    """The scaling controller's bounds; one the file leaves out is the controller's own."""
    cpu: tuple[float, float] | None = setting(kinds.MinMax(CPUS), default=None,
                                              shown_default=_SCALING, doc="CPUs of a balancer")
    memory: tuple[int, int] | None = setting(kinds.MinMax(MEMORY), default=None,
                                             shown_default=_SCALING, doc="its memory limit")
    flow_table: tuple[int, int] | None = setting(kinds.MinMax(FLOW_TABLE), default=None,
                                                 shown_default=_SCALING,
                                                 doc="its flow table's entries")
    cooldown_s: float | None = setting(kinds.Number(0, 86400), default=None,
                                       shown_default=_SCALING,
                                       doc="a resource shrinks only after this long unchanged")

    def given(self) -> dict[str, Any]:
        """The bounds the file gives, by name (what scaling.bounds_from takes)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class CoreBalancer:
    """Each balancer instance's size at start; the scaling controller changes it."""
    cpu: float = setting(CPUS, default=0.5, doc="CPUs of each balancer (its cgroup's quota)")
    memory: int = setting(MEMORY, default=256 << 20, shown_default="`256Mi`",
                          doc="memory limit of each balancer")
    flow_table: int = setting(FLOW_TABLE, default=defines()["ZF_FLOW_TABLE"],
                              doc="each balancer's datapath.flow_table")
    scale: CoreScale = setting(Section(CoreScale), default=CoreScale())


@dataclass(frozen=True)
class CoreRouters:
    """The routing service's HTTP balancers; made only when the file has a routing section."""
    count: int = setting(kinds.Integer(1, 26), default=2,   # named rt-a, rt-b, ...: a letter each
                         doc="router instances")
    cpu: float = setting(CPUS, default=0.5, doc="CPUs of each router")
    memory: int = setting(MEMORY, default=256 << 20, shown_default="`256Mi`",
                          doc="memory limit of each router")


class Sockets(kinds.Scalar):
    """One path, or a list of them (each a member of one cluster on this machine)."""
    failed = ()

    def parse(self, value):
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v.startswith("/") for v in items):
            raise kinds.Bad("is not an absolute path or a list of them")
        return tuple(items)

    def describe(self):
        return "absolute path, or a list of them"


LXD_SOCKET = "/var/lib/lxd/unix.socket"      # Debian's LXD_DIR


def read_core_runtime(problems: Problems, path: str, value: Any) -> CoreRuntime:
    section = Reader(problems, path, value, CoreRuntime)
    runtime = CoreRuntime(**section.read_all())
    if runtime.kind == "netns":
        for name in ("socket", "image", "pool"):
            if section.present(name):
                problems.add(f"{path}.{name}", section.raw(name), "is for kind: lxd only")
    return runtime


@dataclass(frozen=True)
class CoreRuntime:
    """What an instance is: a network namespace with a cgroup on this host, or an LXD
    container (on any member of a cluster: zfast/core/lxd.py)."""
    kind: str = setting(kinds.Choice(("netns", "lxd")), default="netns",
                        doc="`netns`: namespaces and cgroups here; `lxd`: LXD containers")
    socket: tuple[str, ...] = setting(Sockets(), default=(LXD_SOCKET,),
                                      shown_default=f"`{LXD_SOCKET}`",
                                      doc="lxd: its API's unix socket; a list: one per member "
                                          "on this machine, the next tried when one is down")
    image: str | None = setting(kinds.Name(), default=None,
                                shown_default="zfast's, built from Debian's packages",
                                doc="lxd: the image alias instances start from")
    pool: str = setting(kinds.Name(), default="default",
                        doc="lxd: the storage pool of the instances' root disks")


@dataclass(frozen=True)
class Core:
    public: CorePublic = setting(Section(CorePublic))
    private: CorePrivate = setting(Section(CorePrivate, read=read_core_private))
    balancer: CoreBalancer = setting(Section(CoreBalancer), default=CoreBalancer())
    routers: CoreRouters = setting(Section(CoreRouters), default=CoreRouters())
    runtime: CoreRuntime = setting(Section(CoreRuntime, read=read_core_runtime),
                                   default=CoreRuntime())
