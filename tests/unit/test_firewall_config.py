"""public_ports and firewall sections of the project file: what a good one gives, and a bad
one refused with every problem listed (config.ConfigError.problems, and one CLI line)."""

from __future__ import annotations

import copy
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
import yaml
from click.testing import CliRunner

from zfast import cli
from zfast.config import ConfigError, Datapath, Firewall, PublicPort, RateLimit, load, loads, parse
from zfast.dataplane import loader
from zfast.node import daemon


def project() -> dict:
    """A valid project with a v4 and a v6 service and one public port on each."""
    return {
        "project": "fw",
        "node": {"name": "lb-fw", "interfaces": [{"name": "eth0", "role": "public"}]},
        "services": [
            {"name": "app", "vip": "10.0.0.10",
             "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
             "backends": [{"address": "10.1.0.2"}]},
            {"name": "app6", "vip": "fd00::10",
             "ports": [{"port": 80, "proto": "tcp", "target_port": 8080},
                       {"port": 2300, "proto": "tcp"}],
             "backends": [{"address": "fd01::2"}]},
        ],
        "public_ports": [
            {"port": 2222, "proto": "tcp", "address": "203.0.113.10", "service": "app",
             "target_port": 22,
             "firewall": {"policy": "deny", "allow": ["198.51.100.0/24", "10.0.0.0/8"],
                          "deny": ["198.51.100.7/32"],
                          "limit": {"new_per_s": 100, "burst": 200}}},
            {"port": 2222, "proto": "udp", "address": "203.0.113.10", "service": "app"},
            {"port": 2222, "proto": "tcp", "address": "2001:db8::10", "service": "app6",
             "firewall": {"allow": ["2001:db8:1::/48"], "deny": ["2001:db8:1:2::/64"],
                          "limit": {"new_per_s": 5}}},
        ],
        "firewall": {"deny": ["192.0.2.0/24", "2001:db8:dead::/48"]},
    }


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse(data)
    return err.value.problems


# ---------------------------------------------------------------- good files

def test_public_ports_and_firewall_parse():
    p = parse(project())
    tcp, udp, v6 = p.public_ports
    assert tcp == PublicPort(
        port=2222, proto="tcp", address=IPv4Address("203.0.113.10"), service="app",
        target_port=22,
        firewall=Firewall(policy="deny",
                          allow=(IPv4Network("198.51.100.0/24"), IPv4Network("10.0.0.0/8")),
                          deny=(IPv4Network("198.51.100.7/32"),),
                          limit=RateLimit(new_per_s=100, burst=200)))
    # defaults: target port = port, policy allow, no rules, no limit
    assert udp == PublicPort(port=2222, proto="udp", address=IPv4Address("203.0.113.10"),
                             service="app", target_port=2222, firewall=Firewall())
    assert udp.firewall.policy == "allow" and udp.firewall.limit is None
    assert v6.address == IPv6Address("2001:db8::10") and v6.target_port == 2222
    assert v6.firewall.allow == (IPv6Network("2001:db8:1::/48"),)
    assert v6.firewall.limit == RateLimit(new_per_s=5, burst=5)   # burst defaults to the rate
    assert p.project_deny == (IPv4Network("192.0.2.0/24"), IPv6Network("2001:db8:dead::/48"))


def test_no_public_ports_no_firewall():
    data = project()
    del data["public_ports"], data["firewall"]
    p = parse(data)
    assert p.public_ports == () and p.project_deny == ()


def test_same_cidr_in_allow_and_deny_is_accepted():
    """Equal prefixes in both lists are legal: deny wins (the data plane's rule)."""
    data = project()
    data["public_ports"][0]["firewall"]["allow"].append("198.51.100.7/32")
    p = parse(data)
    assert IPv4Network("198.51.100.7/32") in p.public_ports[0].firewall.allow
    assert IPv4Network("198.51.100.7/32") in p.public_ports[0].firewall.deny


def test_project_deny_of_both_families_with_v4_and_v6_ports():
    # the project-wide list has no port address, so both families are fine there
    assert len(parse(project()).project_deny) == 2


# ---------------------------------------------------------------- one problem each

def _set(path, value):
    def change(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _append(path, value):
    def change(d):
        target = d
        for key in path:
            target = target[key]
        target.append(value)
    return change


PP0_FW = ("public_ports", 0, "firewall")

ONE_PROBLEM = {
    "host bits": (_append(PP0_FW + ("allow",), "198.51.100.1/24"),
                  'public_ports[0].firewall.allow[2]: "198.51.100.1/24" has host bits set '
                  "(the network is 198.51.100.0/24)"),
    "prefix 33": (_append(PP0_FW + ("deny",), "10.0.0.0/33"),
                  'public_ports[0].firewall.deny[1]: "10.0.0.0/33" is not a CIDR'),
    "not an address": (_append(PP0_FW + ("deny",), "10.0.0.300/32"),
                       'public_ports[0].firewall.deny[1]: "10.0.0.300/32" is not a CIDR'),
    "not a string": (_append(PP0_FW + ("deny",), 10),
                     "public_ports[0].firewall.deny[1]: 10 is not a CIDR"),
    "v6 on a v4 port": (_append(PP0_FW + ("allow",), "2001:db8::/32"),
                        'public_ports[0].firewall.allow[2]: "2001:db8::/32" is IPv6 but the '
                        "port's address 203.0.113.10 is IPv4"),
    "v4 on a v6 port": (_append(("public_ports", 2, "firewall", "deny"), "10.0.0.0/8"),
                        'public_ports[2].firewall.deny[1]: "10.0.0.0/8" is IPv4 but the '
                        "port's address 2001:db8::10 is IPv6"),
    "unknown service": (_set(("public_ports", 1, "service"), "nosuch"),
                        'public_ports[1].service: "nosuch" is not a service of this project '
                        "(known: app, app6)"),
    "duplicate port": (_append(("public_ports",),
                               {"port": 2222, "proto": "tcp", "address": "203.0.113.10",
                                "service": "app"}),
                       'public_ports[3]: "203.0.113.10:2222/tcp" is already public_ports[0]'),
    "a service's own port": (_append(("public_ports",),
                                     {"port": 2300, "proto": "tcp", "address": "fd00::10",
                                      "service": "app6"}),
                             'public_ports[3]: "[fd00::10]:2300/tcp" is already a port of '
                             "services.app6"),
    "port 80": (_set(("public_ports", 1, "port"), 80),
                "public_ports[1].port: 80 belongs to the routing service (HTTP/HTTPS)"),
    "port 443": (_set(("public_ports", 1, "port"), 443),
                 "public_ports[1].port: 443 belongs to the routing service (HTTP/HTTPS)"),
    "port 0": (_set(("public_ports", 1, "port"), 0), "public_ports[1].port: 0 is not a port"),
    "bad proto": (_set(("public_ports", 1, "proto"), "sctp"),
                  'public_ports[1].proto: "sctp" is not one of tcp, udp'),
    "bad address": (_set(("public_ports", 1, "address"), "203.0.113.300"),
                    'public_ports[1].address: "203.0.113.300" is not an IP address'),
    "address family vs service": (_set(("public_ports", 1, "address"), "2001:db8::10"),
                                  'public_ports[1].address: "2001:db8::10" is IPv6 but service '
                                  "app's backends are IPv4"),
    "bad policy": (_set(PP0_FW + ("policy",), "reject"),
                   'public_ports[0].firewall.policy: "reject" is not one of allow, deny'),
    "unknown firewall field": (_set(PP0_FW + ("colour",), "red"),
                               "public_ports[0].firewall.colour: unknown field"),
    "rate 0": (_set(PP0_FW + ("limit",), {"new_per_s": 0}),
               "public_ports[0].firewall.limit.new_per_s: 0 is out of range"),
    "burst not a number": (_set(PP0_FW + ("limit",), {"new_per_s": 5, "burst": "many"}),
                           'public_ports[0].firewall.limit.burst: "many" is not an integer'),
    "project deny host bits": (_append(("firewall", "deny"), "192.0.2.1/24"),
                               'firewall.deny[2]: "192.0.2.1/24" has host bits set'),
    "project firewall field": (_set(("firewall", "allow"), ["10.0.0.0/8"]),
                               "firewall.allow: unknown field"),
    "public_ports not a list": (_set(("public_ports",), {"port": 2222}),
                                'public_ports: {"port": 2222} is not a list'),
}


@pytest.mark.parametrize("name", sorted(ONE_PROBLEM))
def test_one_problem(name):
    change, expected = ONE_PROBLEM[name]
    data = project()
    change(data)
    problems = problems_of(data)
    assert any(expected in p for p in problems), f"{expected!r} not in {problems}"


def test_too_many_rules():
    data = project()
    data["datapath"] = {"max_rules": 16}
    data["public_ports"][0]["firewall"]["deny"] = [f"172.16.{i}.0/24" for i in range(20)]
    problems = problems_of(data)
    assert any("firewall rules are more than datapath.max_rules (16)" in p for p in problems)


def test_too_many_public_ports():
    data = project()
    data["datapath"] = {"max_public_ports": 3}   # slot 0 is the project-wide list
    problems = problems_of(data)
    assert any("public ports are more than datapath.max_public_ports - 1 (2)" in p
               for p in problems), problems


# ---------------------------------------------------------------- every problem at once

def bad_project() -> tuple[dict, list[str]]:
    """The issue's list of bad input in one file, with the lines each must give."""
    data = project()
    fw = data["public_ports"][0]["firewall"]
    fw["allow"].append("198.51.100.1/24")           # host bits
    fw["deny"].append("10.0.0.0/33")                # no such prefix
    fw["allow"].append("2001:db8::/32")             # a v6 prefix on a v4 port address
    data["public_ports"][1]["service"] = "nosuch"   # unknown service
    data["public_ports"].append({"port": 2222, "proto": "tcp", "address": "203.0.113.10",
                                 "service": "app"})  # duplicate port
    data["public_ports"].append({"port": 80, "proto": "tcp", "address": "203.0.113.10",
                                 "service": "app"})
    data["public_ports"].append({"port": 443, "proto": "tcp", "address": "203.0.113.10",
                                 "service": "app"})
    expected = [
        'public_ports[0].firewall.allow[2]: "198.51.100.1/24" has host bits set',
        'public_ports[0].firewall.allow[3]: "2001:db8::/32" is IPv6',
        'public_ports[0].firewall.deny[1]: "10.0.0.0/33" is not a CIDR',
        'public_ports[1].service: "nosuch" is not a service',
        'public_ports[3]: "203.0.113.10:2222/tcp" is already public_ports[0]',
        "public_ports[4].port: 80 belongs to the routing service",
        "public_ports[5].port: 443 belongs to the routing service",
    ]
    return data, expected


def test_every_problem_is_listed():
    data, expected = bad_project()
    problems = problems_of(data)
    for line in expected:
        assert sum(line in p for p in problems) == 1, f"{line!r} not once in {problems}"
    assert len(problems) == len(expected), problems


def test_every_problem_from_a_file(tmp_path):
    data, expected = bad_project()
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load(path)
    assert len(err.value.problems) == len(expected)
    assert all(any(e in p for p in err.value.problems) for e in expected)
    # the same text through loads() (what the node does with `zfast apply`)
    with pytest.raises(ConfigError) as err2:
        loads(path.read_text(), str(path))
    assert err2.value.problems == err.value.problems


def test_loads_refuses_a_key_given_twice():
    text = yaml.safe_dump(project(), sort_keys=False) + "firewall: {deny: []}\n"
    with pytest.raises(ConfigError) as err:
        loads(text, "twice.yaml")
    assert "given twice" in str(err.value), err.value.problems


def test_the_input_is_not_changed_by_parsing():
    data, _ = bad_project()
    before = copy.deepcopy(data)
    problems_of(data)
    assert data == before
    good = project()
    before = copy.deepcopy(good)
    p = parse(good)
    assert good == before and p.raw == before


@pytest.fixture
def no_kernel(monkeypatch):
    def touched(*args, **kwargs):
        raise AssertionError("the CLI touched the kernel for a bad file")

    monkeypatch.setattr(daemon.Node, "__init__", touched)
    monkeypatch.setattr(loader.Loaded, "__init__", touched)
    monkeypatch.setattr(loader, "_bcc", touched)


@pytest.mark.parametrize("command", ["apply", "up"])
def test_cli_lists_every_problem_on_one_line(tmp_path, no_kernel, command):
    data, expected = bad_project()
    data["node"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    args = [command, "-c", str(path)]
    if command == "apply":
        args += ["--state-dir", str(tmp_path / "state")]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, AssertionError), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"zfast: error: {path}: "), lines[0]
    for line in expected:
        assert line in lines[0], f"{line!r} not in {lines[0]!r}"
    assert "no zfast node" not in lines[0]     # refused before any node is asked
    assert not (tmp_path / "state").exists()


def test_datapath_rule_capacity_default_holds_100k():
    assert Datapath().max_rules >= 100_000 + 1
