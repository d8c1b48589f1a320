"""Project file: a valid file gives the expected dataclasses, a bad one every problem."""

import copy
import dataclasses
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
import yaml

from zfast.config import (
    HA,
    Acme,
    Backend,
    ConfigError,
    Core,
    CorePrivate,
    CorePublic,
    Datapath,
    Domain,
    Firewall,
    Health,
    Interface,
    Node,
    PortMap,
    Project,
    PublicPort,
    Routing,
    Service,
    load,
    parse,
)

SPEC_EXAMPLE = """
project: demo
node:
  name: lb-a
  state_dir: /run/zfast/lb-a
  interfaces:
    - {name: eth0, role: public}
    - {name: eth1, role: private}
  mode: auto
ha:
  peer: 10.203.0.2
  bind: 10.203.0.1
  priority: 100
  key_file: /etc/zfast/ha.key
  heartbeat_ms: 50
  vips: [203.0.113.10, "2001:db8::10"]
store: {kind: sqlite}
services:
  - name: app
    vip: 10.0.0.10
    ports: [{port: 80, proto: tcp, target_port: 8080}]
    backends:
      - {address: 10.1.0.2, weight: 1}
      - {address: 10.1.0.3, weight: 2}
    health: {kind: tcp, interval_ms: 500, fall: 3, rise: 2}
public_ports:
  - port: 2222
    proto: tcp
    address: 203.0.113.10
    service: app
    target_port: 22
    firewall: {policy: deny, allow: ["198.51.100.0/24"], deny: []}
routing:
  addresses: [203.0.113.10, "2001:db8::10"]
  acme: {directory: "https://127.0.0.1:14000/dir", email: ops@example.org}
  domains:
    - {host: app.example.org, service: app, port: 8080, tls: acme, redirect_https: true}
    - {host: "*.app.example.org", service: app, port: 8080, tls: self-signed}
telemetry:
  prometheus: 127.0.0.1:9469
core:
  public:  {bridge: zpub0, subnet: 10.230.0.0/24}
  private: {bridge: zpriv0, subnet: 10.231.0.0/24}
"""


def example():
    return yaml.safe_load(SPEC_EXAMPLE)


def test_spec_example_parses():
    project = parse(example())
    assert project == Project(
        project="demo",
        node=Node(name="lb-a", state_dir="/run/zfast/lb-a", mode="auto", interfaces=(
            Interface(name="eth0", role="public"), Interface(name="eth1", role="private"))),
        services=(Service(
            name="app", vip=IPv4Address("10.0.0.10"),
            ports=(PortMap(port=80, proto="tcp", target_port=8080),),
            backends=(Backend(IPv4Address("10.1.0.2"), 1), Backend(IPv4Address("10.1.0.3"), 2)),
            health=Health(kind="tcp", interval_ms=500, fall=3, rise=2)),),
        datapath=Datapath(),
        raw=example(),
        public_ports=(PublicPort(port=2222, proto="tcp", address=IPv4Address("203.0.113.10"),
                                 service="app", target_port=22,
                                 firewall=Firewall(policy="deny",
                                                   allow=(IPv4Network("198.51.100.0/24"),))),),
        ha=HA(peer=IPv4Address("10.203.0.2"), bind=IPv4Address("10.203.0.1"),
              key_file="/etc/zfast/ha.key", priority=100, heartbeat_ms=50,
              vips=(IPv4Address("203.0.113.10"), IPv6Address("2001:db8::10"))),
        # port 8080 is the target_port of the service's port 80: the domain names that map
        routing=Routing(addresses=(IPv4Address("203.0.113.10"), IPv6Address("2001:db8::10")),
                        acme=Acme(directory="https://127.0.0.1:14000/dir", email="ops@example.org"),
                        domains=(Domain(host="app.example.org", service="app", port=80, tls="acme",
                                        redirect_https=True),
                                 Domain(host="*.app.example.org", service="app", port=80))),
        core=Core(public=CorePublic(subnet=IPv4Network("10.230.0.0/24")),
                  private=CorePrivate(subnet=IPv4Network("10.231.0.0/24"),
                                      gateway=IPv4Address("10.231.0.254"))))
    assert project.raw["ha"]["priority"] == 100
    assert project.raw["public_ports"][0]["target_port"] == 22


def test_defaults():
    project = parse({
        "project": "p",
        "node": {"name": "lb-b", "interfaces": [{"name": "veth-lb0", "role": "public",
                                                 "mode": "generic"}]},
        "services": [{"name": "web6", "vip": "2001:db8::10",
                      "ports": [{"port": 53, "proto": "udp"}],
                      "backends": [{"address": "2001:db8::2"}],
                      "health": {"kind": "http"}}],
        "datapath": {"maglev_size": 1009},
    })
    assert project.node == Node(name="lb-b", state_dir="/run/zfast/lb-b", mode="auto",
                                interfaces=(Interface("veth-lb0", "public", "generic"),))
    service = project.services[0]
    assert service.vip == IPv6Address("2001:db8::10")
    assert service.ports == (PortMap(port=53, proto="udp", target_port=53),)
    assert service.backends == (Backend(IPv6Address("2001:db8::2"), weight=1),)
    assert service.health == Health(kind="http", interval_ms=500, fall=3, rise=2, path="/")
    assert project.datapath == Datapath(maglev_size=1009, flow_table=65536, max_services=64,
                                        max_backends=4096, max_ifindex=4096)


def test_core_mode_has_no_node():
    data = example()
    del data["node"], data["ha"]
    project = parse(data)
    assert project.node is None and project.services[0].name == "app"


def test_frozen():
    project = parse(example())
    with pytest.raises(dataclasses.FrozenInstanceError):
        project.services[0].ports[0].port = 81


def with_change(change):
    """The spec example with one change made by `change(data)`."""
    data = example()
    change(data)
    return data


def service(data):
    return data["services"][0]


def add_service(datapath=None, **fields):
    """A change that adds a second service (and sets the datapath section, if given)."""
    def change(data):
        if datapath is not None:
            data["datapath"] = datapath
        data["services"].append({"name": "second", "vip": "10.0.0.11",
                                 "ports": [{"port": 80, "proto": "tcp"}],
                                 "backends": [{"address": "10.1.0.9"}], **fields})
    return change


BAD_CASES = {
    "port 70000": (lambda d: service(d)["ports"][0].update(port=70000),
                   "services.app.ports[0].port: 70000 is not a port"),
    "port 0": (lambda d: service(d)["ports"][0].update(port=0),
               "services.app.ports[0].port: 0 is not a port"),
    "port as bool": (lambda d: service(d)["ports"][0].update(port=True),
                     "services.app.ports[0].port: true is not a port"),
    "port as string": (lambda d: service(d)["ports"][0].update(port="80"),
                       'services.app.ports[0].port: "80" is not a port'),
    "target port": (lambda d: service(d)["ports"][0].update(target_port=65536),
                    "services.app.ports[0].target_port: 65536 is not a port"),
    "proto": (lambda d: service(d)["ports"][0].update(proto="sctp"),
              'services.app.ports[0].proto: "sctp" is not one of tcp, udp'),
    "proto missing": (lambda d: service(d)["ports"][0].pop("proto"),
                      "services.app.ports[0].proto: is required"),
    "no ports": (lambda d: service(d).update(ports=[]), "services.app.ports: [] has no ports"),
    "vip not an ip": (lambda d: service(d).update(vip="app.example.org"),
                      'services.app.vip: "app.example.org" is not an IP address'),
    "vip as int": (lambda d: service(d).update(vip=167772170),
                   "services.app.vip: 167772170 is not an IP address"),
    "vip missing": (lambda d: service(d).pop("vip"), "services.app.vip: is required"),
    "vip multicast": (lambda d: service(d).update(vip="224.0.0.5"),
                      'services.app.vip: "224.0.0.5" is a multicast address'),
    "vip unspecified": (lambda d: service(d).update(vip="::"),
                        'services.app.vip: "::" is the unspecified address'),
    "vip broadcast": (lambda d: service(d).update(vip="255.255.255.255"),
                      'services.app.vip: "255.255.255.255" is the broadcast address'),
    "backend not an ip": (lambda d: service(d)["backends"][1].update(address="10.1.0.300"),
                          'services.app.backends[1].address: "10.1.0.300" is not an IP'),
    "backend family": (lambda d: service(d)["backends"][1].update(address="2001:db8::3"),
                       'services.app.backends[1].address: "2001:db8::3" is IPv6 but the VIP'),
    "backend twice": (lambda d: service(d)["backends"][1].update(address="10.1.0.2"),
                      'services.app.backends[1].address: "10.1.0.2" is already'
                      " services.app.backends[0]"),
    "weight negative": (lambda d: service(d)["backends"][0].update(weight=-1),
                        "services.app.backends[0].weight: -1 is out of range (0-65535)"),
    "weight too big": (lambda d: service(d)["backends"][0].update(weight=65536),
                       "services.app.backends[0].weight: 65536 is out of range"),
    "weight as bool": (lambda d: service(d)["backends"][0].update(weight=False),
                       "services.app.backends[0].weight: false is not an integer"),
    "no backends": (lambda d: service(d).update(backends=[]),
                    "services.app.backends: has no backends"),
    "backends missing": (lambda d: service(d).pop("backends"),
                         "services.app.backends: has no backends"),
    "duplicate service": (add_service(name="app"),
                          'services[1].name: "app" is already the name of services[0]'),
    "duplicate listener": (add_service(vip="10.0.0.10"),
                           'services.second.ports[0]: "10.0.0.10:80/tcp" is already served by'
                           " services.app.ports[0]"),
    "service name": (lambda d: service(d).update(name="my app"),
                     'services[0].name: "my app" is not a name'),
    "service name too long": (lambda d: service(d).update(name="a" * 64),
                              "services[0].name: \"aaaa"),
    "service name missing": (lambda d: service(d).pop("name"), "services[0].name: is required"),
    "project name": (lambda d: d.update(project="-demo"), 'project: "-demo" is not a name'),
    "project missing": (lambda d: d.pop("project"), "project: is required"),
    "too many services": (add_service(datapath={"max_services": 1}),
                          "services: 2 services are more than datapath.max_services (1)"),
    "too many backends": (lambda d: d.update(datapath={"max_backends": 1}),
                          "services: 2 backends in all are more than datapath.max_backends (1)"),
    "unknown top-level": (lambda d: d.update(servics=[]), "servics: unknown field"),
    "unknown in node": (lambda d: d["node"].update(iface="eth0"), "node.iface: unknown field"),
    "unknown in service": (lambda d: service(d).update(vips=[]), "services.app.vips: unknown"),
    "unknown in port": (lambda d: service(d)["ports"][0].update(protocol="tcp"),
                        "services.app.ports[0].protocol: unknown field"),
    "unknown in backend": (lambda d: service(d)["backends"][0].update(port=1),
                           "services.app.backends[0].port: unknown field"),
    "unknown in health": (lambda d: service(d)["health"].update(timeout_ms=1),
                          "services.app.health.timeout_ms: unknown field"),
    "unknown in datapath": (lambda d: d.update(datapath={"rings": 2}),
                            "datapath.rings: unknown field"),
    "health kind": (lambda d: service(d)["health"].update(kind="icmp"),
                    'services.app.health.kind: "icmp" is not one of tcp, http'),
    "health interval": (lambda d: service(d)["health"].update(interval_ms=0),
                        "services.app.health.interval_ms: 0 is out of range"),
    "health path for tcp": (lambda d: service(d)["health"].update(path="/"),
                            'services.app.health.path: "/" is only for http checks'),
    "health path relative": (lambda d: service(d)["health"].update(kind="http", path="ok"),
                             'services.app.health.path: "ok" does not start with'),
    "maglev size not prime": (lambda d: d.update(datapath={"maglev_size": 65536}),
                              "datapath.maglev_size: 65536 is not a prime number"),
    "flow table small": (lambda d: d.update(datapath={"flow_table": 1000}),
                         "datapath.flow_table: 1000 is out of range (1024-"),
    "node name": (lambda d: d["node"].update(name="lb a"), 'node.name: "lb a" is not a name'),
    "node mode": (lambda d: d["node"].update(mode="offload"),
                  'node.mode: "offload" is not one of native, generic, tc, auto'),
    "interface name slash": (lambda d: d["node"]["interfaces"][0].update(name="eth/0"),
                             'node.interfaces[0].name: "eth/0" is not an interface name'),
    "interface name long": (lambda d: d["node"]["interfaces"][0].update(name="a" * 16),
                            "node.interfaces[0].name: \"aaaaaaaaaaaaaaaa\" is not an interface"),
    "interface name space": (lambda d: d["node"]["interfaces"][0].update(name="eth 0"),
                             'node.interfaces[0].name: "eth 0" is not an interface name'),
    "interface role": (lambda d: d["node"]["interfaces"][1].update(role="inside"),
                       'node.interfaces[1].role: "inside" is not one of public, private'),
    "interface mode": (lambda d: d["node"]["interfaces"][1].update(mode="fast"),
                       'node.interfaces[1].mode: "fast" is not one of native, generic, tc, auto'),
    "interface twice": (lambda d: d["node"]["interfaces"][1].update(name="eth0"),
                        'node.interfaces[1].name: "eth0" is already node.interfaces[0]'),
    "no interfaces": (lambda d: d["node"].update(interfaces=[]),
                      "node.interfaces: [] has no interfaces"),
    "services not a list": (lambda d: d.update(services={"app": {}}),
                            'services: {"app": {}} is not a list'),
    "service not a mapping": (lambda d: d["services"].append("web"),
                              'services[1]: "web" is not a mapping'),
    "ha not a mapping": (lambda d: d.update(ha=["10.203.0.2"]),
                         'ha: ["10.203.0.2"] is not a mapping'),
    "public_ports not a list": (lambda d: d.update(public_ports={"port": 22}),
                                'public_ports: {"port": 22} is not a list'),
    "node null": (lambda d: d.update(node=None), "node: null is not a mapping"),
}


@pytest.mark.parametrize("change, expected", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_field_is_named(change, expected):
    with pytest.raises(ConfigError) as caught:
        parse(with_change(change))
    assert any(problem.startswith(expected) for problem in caught.value.problems), \
        caught.value.problems


def test_every_problem_is_listed():
    data = example()
    service(data)["ports"][0]["port"] = 70000
    service(data)["vip"] = "not-an-ip"
    service(data)["backends"][0]["weight"] = "heavy"
    data["node"]["mode"] = "fast"
    data["datapath"] = {"maglev_size": 100}
    data["extra"] = 1
    with pytest.raises(ConfigError) as caught:
        parse(data)
    paths = [problem.split(":")[0] for problem in caught.value.problems]
    assert sorted(paths) == sorted([
        "services.app.ports[0].port", "services.app.vip", "services.app.backends[0].weight",
        "node.mode", "datapath.maglev_size", "extra"])
    assert str(caught.value) == "; ".join(caught.value.problems)
    assert "\n" not in str(caught.value)


def test_parse_does_not_change_its_input():
    data = example()
    before = copy.deepcopy(data)
    project = parse(data)
    assert data == before
    project.raw["ha"]["priority"] = 1
    assert data["ha"]["priority"] == 100


def test_not_a_mapping():
    with pytest.raises(ConfigError, match=r"^x.yaml: \[1, 2\] is not a mapping"):
        parse([1, 2], source="x.yaml")


def test_load(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(SPEC_EXAMPLE)
    assert load(path) == parse(example())


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]
    assert caught.value.source == str(path)


def test_load_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("project: demo\nservices: [\n  - name: x\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line \d+, column \d+: is not valid YAML"):
        load(path)


def test_load_key_given_twice(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("project: demo\nservices: []\nproject: other\n")
    with pytest.raises(ConfigError, match=r'line 3, column 1: .*key "project" is given twice'):
        load(path)


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="null is not a mapping"):
        load(path)
