"""The project file's `core` section (`zfast core up`): every field's good values, bad values
with their path-qualified problems, defaults, and unknown keys refused."""

import copy
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from zfast.config import (
    ConfigError,
    Core,
    CoreBalancer,
    CorePrivate,
    CorePublic,
    CoreRouters,
    CoreScale,
    parse,
)
from zfast.config.schema import Section, settings
from zfast.controllers import scaling
from zfast.core.cgroups import parse_size
from zfast.core.plan import CoreError, CoreSpec, parse_core
from zfast.dataplane.reasons import defines

MI = 1 << 20
BASE = {
    "project": "demo",
    "services": [{"name": "app", "vip": "10.0.0.10", "ports": [{"port": 80, "proto": "tcp"}],
                  "backends": [{"address": "10.1.0.2"}]}],
    "core": {"public": {"subnet": "10.230.0.0/24"}, "private": {"subnet": "10.231.0.0/24"}},
}


def with_core(**sections) -> dict:
    data = copy.deepcopy(BASE)
    data["core"].update(copy.deepcopy(sections))
    return data


def core_of(**sections) -> Core:
    return parse(with_core(**sections)).core


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return caught.value.problems


# ---------------------------------------------------------------- defaults and good values

def test_defaults():
    core = core_of()
    assert core == Core(public=CorePublic(subnet=IPv4Network("10.230.0.0/24")),
                        private=CorePrivate(subnet=IPv4Network("10.231.0.0/24"),
                                            gateway=IPv4Address("10.231.0.254")))
    assert core.public.bridge == "zpub0" and core.public.subnet6 is None
    assert core.private.bridge == "zpriv0"
    assert core.balancer == CoreBalancer(cpu=0.5, memory=256 * MI,
                                         flow_table=defines()["ZF_FLOW_TABLE"], scale=CoreScale())
    assert core.balancer.scale.given() == {}
    assert core.routers == CoreRouters(count=2, cpu=0.5, memory=256 * MI)


def test_no_core_section():
    data = copy.deepcopy(BASE)
    del data["core"]
    assert parse(data).core is None


def test_every_field_given():
    core = core_of(
        public={"subnet": "10.230.0.0/24", "bridge": "pub-br", "subnet6": "fd00:230::/64"},
        private={"subnet": "10.231.0.0/24", "gateway": "10.231.0.1", "bridge": "priv-br"},
        balancer={"cpu": 1, "memory": "512Mi", "flow_table": 262144,
                  "scale": {"cpu": [0.25, 2], "memory": ["128Mi", 1 << 30],
                            "flow_table": [65536, 1 << 20], "cooldown_s": 8}},
        routers={"count": 3, "cpu": 0.25, "memory": "1Gi"})
    assert core.public == CorePublic(subnet=IPv4Network("10.230.0.0/24"), bridge="pub-br",
                                     subnet6=IPv6Network("fd00:230::/64"))
    assert core.private == CorePrivate(subnet=IPv4Network("10.231.0.0/24"),
                                       gateway=IPv4Address("10.231.0.1"), bridge="priv-br")
    assert core.balancer == CoreBalancer(
        cpu=1.0, memory=512 * MI, flow_table=262144,
        scale=CoreScale(cpu=(0.25, 2.0), memory=(128 * MI, 1 << 30),
                        flow_table=(65536, 1 << 20), cooldown_s=8.0))
    assert isinstance(core.balancer.cpu, float)
    assert core.routers == CoreRouters(count=3, cpu=0.25, memory=1 << 30)


GOOD = {   # field path under core -> (value, what it reads as)
    "public.subnet": ("192.168.0.0/30", IPv4Network("192.168.0.0/30")),
    "public.bridge": ("a" * 15, "a" * 15),
    "public.subnet6": ("2001:db8::/48", IPv6Network("2001:db8::/48")),
    "private.subnet": ("10.0.0.0/8", IPv4Network("10.0.0.0/8")),
    "private.gateway": ("10.231.0.100", IPv4Address("10.231.0.100")),
    "private.bridge": ("br.priv-0", "br.priv-0"),
    "balancer.cpu": (0.1, 0.1),
    "balancer.memory": (64 * MI, 64 * MI),
    "balancer.flow_table": (1024, 1024),
    "balancer.scale.cpu": ([0.5, 0.5], (0.5, 0.5)),
    "balancer.scale.memory": (["1.5Gi", "2G"], (int(1.5 * (1 << 30)), 2 * 10**9)),
    "balancer.scale.flow_table": ([1024, 2**31 - 1], (1024, 2**31 - 1)),
    "balancer.scale.cooldown_s": (0, 0.0),
    "routers.count": (26, 26),
    "routers.cpu": (1024, 1024.0),
    "routers.memory": ("16Mi", 16 * MI),
    "runtime.kind": ("lxd", "lxd"),
    "runtime.socket": (["/var/lib/lxd1/unix.socket", "/var/lib/lxd2/unix.socket"],
                       ("/var/lib/lxd1/unix.socket", "/var/lib/lxd2/unix.socket")),
    "runtime.image": ("zfast-0123abcd", "zfast-0123abcd"),
    "runtime.pool": ("fast", "fast"),
}


def _set(data: dict, path: str, value) -> None:
    *sections, key = path.split(".")
    if sections == ["runtime"] and key != "kind":     # LXD's fields need kind: lxd
        data["core"].setdefault("runtime", {})["kind"] = "lxd"
    target = data["core"]
    for section in sections:
        target = target.setdefault(section, {})
    target[key] = value


def _get(core: Core, path: str):
    for part in path.split("."):
        core = getattr(core, part)
    return core


@pytest.mark.parametrize("path, value, expected", [(p, *v) for p, v in GOOD.items()], ids=GOOD)
def test_good_value(path, value, expected):
    data = with_core()
    _set(data, path, value)
    assert _get(parse(data).core, path) == expected


def _leaves(schema, prefix=""):
    """Every field of the schema that holds a value, as a path under core."""
    for name, setting in settings(schema).items():
        if isinstance(setting.kind, Section):
            yield from _leaves(setting.kind.schema, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_field_has_a_good_and_a_bad_case():
    leaves = set(_leaves(Core))
    assert set(GOOD) == leaves
    assert {path for (path, _), _ in BAD.values()} == leaves


# ---------------------------------------------------------------- bad values

BAD = {   # case -> (field path under core, value), and the problem it gives
    "subnet host bits": (("public.subnet", "10.230.0.1/24"),
                         'core.public.subnet: "10.230.0.1/24" has host bits set (the network is '
                         '10.230.0.0/24)'),
    "subnet v6 for v4": (("public.subnet", "fd00::/64"),
                         'core.public.subnet: "fd00::/64" is not an IPv4 subnet (like '
                         '10.230.0.0/24)'),
    "subnet not a string": (("public.subnet", 167772160),
                            "core.public.subnet: 167772160 is not an IPv4 subnet"),
    "subnet too small": (("private.subnet", "10.231.0.0/31"),
                         'core.private.subnet: "10.231.0.0/31" is too small: it needs room for '
                         'addresses (a /30 or larger)'),
    "bridge too long": (("public.bridge", "a" * 16),
                        'core.public.bridge: "aaaaaaaaaaaaaaaa" is not an interface name '
                        "(1-15 characters, no '/', ':' or spaces)"),
    "bridge empty": (("private.bridge", ""),
                     'core.private.bridge: "" is not a non-empty string'),
    "subnet6 v4": (("public.subnet6", "10.0.0.0/24"),
                   'core.public.subnet6: "10.0.0.0/24" is not an IPv6 subnet (like '
                   'fd00:230::/64)'),
    "subnet6 null": (("public.subnet6", None), "core.public.subnet6: null is not an IPv6 subnet"),
    "gateway outside": (("private.gateway", "10.9.0.1"),
                        'core.private.gateway: "10.9.0.1" is not in 10.231.0.0/24'),
    "gateway v6": (("private.gateway", "fd00::1"),
                   'core.private.gateway: "fd00::1" is not an IPv4 address'),
    "gateway multicast": (("private.gateway", "224.0.0.1"),
                          'core.private.gateway: "224.0.0.1" is a multicast address, not a '
                          'usable gateway address'),
    "cpu zero": (("balancer.cpu", 0), "core.balancer.cpu: 0 is out of range (0.1-1024)"),
    "cpu string": (("balancer.cpu", "0.5"), 'core.balancer.cpu: "0.5" is not a number'),
    "cpu bool": (("routers.cpu", True), "core.routers.cpu: true is not a number"),
    "memory unit": (("balancer.memory", "256MB"),
                    'core.balancer.memory: "256MB" is not a size (bytes, or a number with Ki, '
                    'Mi, Gi, K, M or G)'),
    "memory float": (("routers.memory", 1.5), "core.routers.memory: 1.5 is not a size"),
    "memory small": (("balancer.memory", "1Mi"),
                     'core.balancer.memory: "1Mi" is out of range (16Mi-1Ti)'),
    "flow table small": (("balancer.flow_table", 1000),
                         "core.balancer.flow_table: 1000 is out of range (1024-2147483647)"),
    "flow table string": (("balancer.flow_table", "65536"),
                          'core.balancer.flow_table: "65536" is not an integer'),
    "scale not a pair": (("balancer.scale.cpu", [1]),
                         "core.balancer.scale.cpu: [1] is not a [min, max] pair"),
    "scale min above max": (("balancer.scale.memory", ["1Gi", "128Mi"]),
                            'core.balancer.scale.memory: ["1Gi", "128Mi"] has its min above its '
                            'max'),
    "scale bad item": (("balancer.scale.flow_table", [65536, "big"]),
                       'core.balancer.scale.flow_table[1]: "big" is not an integer'),
    "cooldown negative": (("balancer.scale.cooldown_s", -1),
                          "core.balancer.scale.cooldown_s: -1 is out of range (0-86400)"),
    "routers count zero": (("routers.count", 0),
                           "core.routers.count: 0 is out of range (1-26)"),
    "routers count float": (("routers.count", 2.0),
                            "core.routers.count: 2.0 is not an integer"),
    "runtime kind": (("runtime.kind", "docker"),
                     'core.runtime.kind: "docker" is not one of netns, lxd'),
    "runtime socket relative": (("runtime.socket", "lxd/unix.socket"),
                                'core.runtime.socket: "lxd/unix.socket" is not an absolute path '
                                'or a list of them'),
    "runtime socket empty list": (("runtime.socket", []),
                                  "core.runtime.socket: [] is not an absolute path"),
    "runtime image": (("runtime.image", "my image"),
                      'core.runtime.image: "my image" is not a name'),
    "runtime pool": (("runtime.pool", 3), "core.runtime.pool: 3 is not a name"),
}


def test_a_runtime_setting_for_lxd_alone_is_refused_under_netns():
    data = with_core(runtime={"kind": "netns", "socket": "/var/lib/lxd/unix.socket"})
    assert problems_of(data) == ['core.runtime.socket: "/var/lib/lxd/unix.socket" is for '
                                 'kind: lxd only']


def test_runtime_defaults():
    runtime = core_of().runtime
    assert (runtime.kind, runtime.socket, runtime.image, runtime.pool) == \
        ("netns", ("/var/lib/lxd/unix.socket",), None, "default")


@pytest.mark.parametrize("change, expected", BAD.values(), ids=BAD)
def test_bad_value_is_named(change, expected):
    data = with_core()
    _set(data, *change)
    problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize("section", ["public", "private"])
def test_required_sections(section):
    data = with_core()
    del data["core"][section]
    assert problems_of(data) == [f"core.{section}: is required"]


@pytest.mark.parametrize("section", ["public", "private"])
def test_required_subnets(section):
    data = with_core(**{section: {"bridge": "br0"}})
    assert problems_of(data) == [f"core.{section}.subnet: is required"]


@pytest.mark.parametrize("section", ["core", "core.public", "core.private", "core.balancer",
                                     "core.balancer.scale", "core.routers", "core.runtime"])
def test_not_a_mapping(section):
    data = with_core()
    *parents, key = section.split(".")
    target = data
    for parent in parents:
        target = target.setdefault(parent, {})
    target[key] = ["x"]
    assert problems_of(data) == [f'{section}: ["x"] is not a mapping']


UNKNOWN = {   # a misspelt key in each mapping of core
    "core": ("", "balancers", "balancer, private, public, routers, runtime"),
    "core.public": ("public", "subnet4", "bridge, subnet, subnet6"),
    "core.private": ("private", "gw", "bridge, gateway, subnet"),
    "core.balancer": ("balancer", "flows", "cpu, flow_table, memory, scale"),
    "core.balancer.scale": ("balancer.scale", "cooldown", "cooldown_s, cpu, flow_table, memory"),
    "core.routers": ("routers", "counts", "count, cpu, memory"),
    "core.runtime": ("runtime", "sockets", "image, kind, pool, socket"),
}


@pytest.mark.parametrize("section, key, known", UNKNOWN.values(), ids=UNKNOWN)
def test_unknown_key_is_refused(section, key, known):
    data = with_core()
    target = data["core"]
    for part in filter(None, section.split(".")):
        target = target.setdefault(part, {})
    target[key] = 1
    path = ".".join(filter(None, ("core", section, key)))
    assert problems_of(data) == [f"{path}: unknown field (known: {known})"]


def test_every_problem_is_listed():
    data = with_core(public={"subnet": "x", "bridge": "a/b"},
                     balancer={"cpu": -1, "scale": {"cooldown_s": "soon"}},
                     routers={"count": 100, "colour": "red"})
    assert problems_of(data) == [
        'core.public.subnet: "x" is not an IPv4 subnet (like 10.230.0.0/24)',
        "core.public.bridge: \"a/b\" is not an interface name (1-15 characters, no '/', ':' "
        "or spaces)",
        "core.balancer.cpu: -1 is out of range (0.1-1024)",
        'core.balancer.scale.cooldown_s: "soon" is not a number',
        "core.routers.colour: unknown field (known: count, cpu, memory)",
        "core.routers.count: 100 is out of range (1-26)",
    ]


# ---------------------------------------------------------------- what `zfast core up` takes

def test_parse_core_takes_the_checked_section():
    spec = parse_core(parse(with_core(balancer={"cpu": 1, "memory": "512Mi",
                                                "scale": {"cpu": [0.25, 1], "cooldown_s": 8}},
                                      routers={"count": 3})))
    assert spec == CoreSpec(
        public_bridge="zpub0", public_subnet=IPv4Network("10.230.0.0/24"), public_subnet6=None,
        private_bridge="zpriv0", private_subnet=IPv4Network("10.231.0.0/24"),
        gateway=IPv4Address("10.231.0.254"), cpu=1.0, memory=512 * MI,
        flow_table=defines()["ZF_FLOW_TABLE"], scale={"cpu": (0.25, 1.0), "cooldown_s": 8.0},
        routers=0,   # no routing section: no routers
        router_cpu=0.5, router_memory=256 * MI)
    assert scaling.bounds_from(spec.scale, parse_size) == scaling.Bounds(cpu=(0.25, 1.0),
                                                                         cooldown_s=8.0)


def test_parse_core_makes_routers_for_a_routing_section():
    data = with_core(routers={"count": 3})
    data["routing"] = {"addresses": ["203.0.113.10"]}
    assert parse_core(parse(data)).routers == 3


def test_parse_core_without_a_core_section():
    data = copy.deepcopy(BASE)
    del data["core"]
    with pytest.raises(CoreError, match="the project file has no core section"):
        parse_core(parse(data))


def test_scaling_default_flow_table_is_the_c_default():
    assert scaling.Bounds().flow_table[0] == defines()["ZF_FLOW_TABLE"]
