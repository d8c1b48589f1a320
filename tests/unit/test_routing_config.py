"""The project file's `routing` section: the L7 routing service's addresses, ACME and domains."""

import copy
import os
from ipaddress import IPv4Address, IPv6Address

import pytest
import yaml

from zfast import config
from zfast.config import (
    Acme,
    ConfigError,
    Domain,
    PortMap,
    Routing,
    domain_target,
    loads,
    parse,
    parse_host,
)

FILE = """
project: demo
services:
  - name: app
    vip: 10.0.0.10
    ports: [{port: 80, proto: tcp, target_port: 8080}, {port: 53, proto: udp}]
    backends: [{address: 10.1.0.2}]
  - name: api
    vip: 10.0.0.11
    ports: [{port: 443, proto: tcp, target_port: 8443}, {port: 9000, proto: tcp}]
    backends: [{address: 10.1.0.3}]
public_ports:
  - {port: 2222, proto: tcp, address: 203.0.113.10, service: app, target_port: 22}
routing:
  addresses: [203.0.113.10, "2001:db8::10"]
  acme: {directory: "https://127.0.0.1:14000/dir", email: ops@example.org, ca_bundle: CA}
  domains:
    - {host: app.example.org, service: app, port: 80, tls: acme, redirect_https: true}
    - {host: "*.app.example.org", service: app, port: 80, tls: self-signed}
    - {host: api.example.org, service: api, port: 9000}
"""


@pytest.fixture
def ca(tmp_path):
    path = tmp_path / "acme-ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


@pytest.fixture
def data(ca):
    d = yaml.safe_load(FILE)
    d["routing"]["acme"]["ca_bundle"] = ca
    return d


def routing(d):
    return d["routing"]


def domain(d, i=0):
    return d["routing"]["domains"][i]


def problems_of(d):
    with pytest.raises(ConfigError) as caught:
        parse(d)
    return caught.value.problems


# ---- good files -------------------------------------------------------------------------------

def test_a_valid_file_parses_into_the_dataclasses(data, ca):
    project = parse(data)
    assert project.routing == Routing(
        addresses=(IPv4Address("203.0.113.10"), IPv6Address("2001:db8::10")),
        acme=Acme(directory="https://127.0.0.1:14000/dir", email="ops@example.org",
                  ca_bundle=ca),
        domains=(Domain(host="app.example.org", service="app", port=80, tls="acme",
                        redirect_https=True),
                 Domain(host="*.app.example.org", service="app", port=80, tls="self-signed",
                        redirect_https=False),
                 Domain(host="api.example.org", service="api", port=9000)))
    assert [d.wildcard for d in project.routing.domains] == [False, True, False]
    assert project.raw["routing"] == data["routing"]  # kept for the code that reads raw


def test_defaults(data):
    routing(data).pop("acme")
    routing(data)["domains"] = [{"host": "a.example.org", "service": "app", "port": 80}]
    project = parse(data)
    assert project.routing.acme is None
    assert project.routing.domains == (Domain("a.example.org", "app", 80, "self-signed", False),)


def test_domains_are_optional(data):
    routing(data).pop("domains")
    assert parse(data).routing.domains == ()


def test_no_routing_section():
    d = yaml.safe_load(FILE)
    del d["routing"]
    assert parse(d).routing is None


def test_acme_email_and_ca_bundle_are_optional(data):
    routing(data)["acme"] = {"directory": "http://acme.internal:4001/directory"}
    assert parse(data).routing.acme == Acme(directory="http://acme.internal:4001/directory")


def test_hosts_are_lowercased_and_lose_one_trailing_dot(data):
    domain(data, 0)["host"] = "App.Example.ORG."
    domain(data, 1)["host"] = "*.APP.example.org"
    hosts = [d.host for d in parse(data).routing.domains]
    assert hosts == ["app.example.org", "*.app.example.org", "api.example.org"]


def test_a_port_may_be_named_by_its_target_port(data):
    """The spec's own example: `port: 8080` for the service's {port: 80, target_port: 8080}."""
    domain(data, 0)["port"] = 8080
    domain(data, 2)["port"] = 8443
    project = parse(data)
    assert [d.port for d in project.routing.domains] == [80, 80, 443]
    assert domain_target(project, project.routing.domains[2])[1] == \
        PortMap(port=443, proto="tcp", target_port=8443)


def test_a_port_is_first_matched_as_a_port(data):
    """9000 is api's port 9000 even when another map also targets 9000."""
    data["services"][1]["ports"][0]["target_port"] = 9000
    project = parse(data)
    assert domain_target(project, project.routing.domains[2])[1] == \
        PortMap(port=9000, proto="tcp", target_port=9000)


def test_domain_target(data):
    project = parse(data)
    service, port_map = domain_target(project, project.routing.domains[0])
    assert service is project.services[0]
    assert port_map == PortMap(port=80, proto="tcp", target_port=8080)
    service, port_map = domain_target(project, project.routing.domains[2])
    assert (service.name, port_map.target_port) == ("api", 9000)
    with pytest.raises(LookupError):
        domain_target(project, Domain("x.example.org", "app", 53))  # udp
    with pytest.raises(LookupError):
        domain_target(project, Domain("x.example.org", "nope", 80))


def test_the_spec_example_loads(ca):
    text = f"""
project: demo
services:
  - name: app
    vip: 10.0.0.10
    ports: [{{port: 80, proto: tcp, target_port: 8080}}]
    backends:
      - {{address: 10.1.0.2, weight: 1}}
      - {{address: 10.1.0.3, weight: 2}}
routing:                     # the L7 routing service (HTTP/HTTPS)
  addresses: [203.0.113.10, "2001:db8::10"]   # public addresses whose ports 80/443 it serves
  acme: {{directory: "https://127.0.0.1:14000/dir", email: ops@example.org,
         ca_bundle: {ca}}}   # optional: trust for a private ACME server's own TLS
  domains:
    - {{host: app.example.org, service: app, port: 8080, tls: acme, redirect_https: true}}
    - {{host: "*.app.example.org", service: app, port: 8080, tls: self-signed}}
"""
    project = loads(text)
    assert [(d.host, d.port, d.tls) for d in project.routing.domains] == [
        ("app.example.org", 80, "acme"), ("*.app.example.org", 80, "self-signed")]
    assert project.raw["routing"]["domains"][0]["port"] == 8080


def test_parse_does_not_change_its_input(data):
    domain(data, 0)["host"] = "APP.example.org."
    before = copy.deepcopy(data)
    parse(data)
    assert data == before


GOOD_HOSTS = {
    "app.example.org": "app.example.org",
    "A-1.Example.Org": "a-1.example.org",
    "app.example.org.": "app.example.org",
    "*.example.org": "*.example.org",
    "*.Example.org.": "*.example.org",
    "xn--bcher-kva.example": "xn--bcher-kva.example",
    "1x.org": "1x.org",
    "a" * 63 + ".org": "a" * 63 + ".org",
    ".".join(["a" * 61] * 4): ".".join(["a" * 61] * 4),  # 247 characters
}


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_parse_host_good(host):
    assert parse_host(host) == GOOD_HOSTS[host]


@pytest.mark.parametrize("host", ["a*.x.org", "*.*.x.org", "x.*.org", "*.org", "*", "localhost",
                                  "10.0.0.1", "2001:db8::1", "x.org:443", "x..org", "x.org..",
                                  "", "-x.org", "x-.org", "a_b.org", "bücher.de", "x.123",
                                  "https://x.org", None, 7])
def test_parse_host_bad(host):
    with pytest.raises(ValueError):
        parse_host(host)


# ---- one problem each -------------------------------------------------------------------------

D0 = "routing.domains[0]"

BAD_CASES = {
    # routing itself
    "routing not a mapping": (lambda d: d.update(routing=["203.0.113.10"]),
                              'routing: ["203.0.113.10"] is not a mapping'),
    "routing null": (lambda d: d.update(routing=None), "routing: null is not a mapping"),
    "unknown in routing": (lambda d: routing(d).update(domain=[]),
                           "routing.domain: unknown field (known: acme, addresses, domains, routers)"),
    # addresses
    "addresses missing": (lambda d: routing(d).pop("addresses"), "routing.addresses: is required"),
    "addresses empty": (lambda d: routing(d).update(addresses=[]),
                        "routing.addresses: [] has no addresses (the routing service serves "
                        "ports 80 and 443 on them)"),
    "addresses not a list": (lambda d: routing(d).update(addresses="203.0.113.10"),
                             'routing.addresses: "203.0.113.10" is not a list'),
    "address not an ip": (lambda d: routing(d)["addresses"].append("app.example.org"),
                          'routing.addresses[2]: "app.example.org" is not an IP address'),
    "address as int": (lambda d: routing(d)["addresses"].append(3405803786),
                       "routing.addresses[2]: 3405803786 is not an IP address"),
    "address multicast": (lambda d: routing(d)["addresses"].append("ff02::1"),
                          'routing.addresses[2]: "ff02::1" is a multicast address, not a usable '
                          "public address"),
    "address twice": (lambda d: routing(d)["addresses"].append("2001:db8:0::10"),
                      'routing.addresses[2]: "2001:db8::10" is listed twice '
                      "(also routing.addresses[1])"),
    "address is a service's on 80": (
        lambda d: routing(d)["addresses"].append("10.0.0.10"),
        'routing.addresses[2]: "10.0.0.10" is the routing service\'s on 80/tcp, but '
        "services.app.ports[0] already listens there"),
    "address is a service's on 443": (
        lambda d: routing(d)["addresses"].append("10.0.0.11"),
        'routing.addresses[2]: "10.0.0.11" is the routing service\'s on 443/tcp, but '
        "services.api.ports[0] already listens there"),
    # a public port on 80/443 is refused by public_ports itself, and only there
    "public port 80 on a routing address": (
        lambda d: d["public_ports"].append({"port": 80, "proto": "tcp", "service": "app",
                                            "address": "203.0.113.10"}),
        "public_ports[1].port: 80 belongs to the routing service (HTTP/HTTPS): use "
        "routing.domains for it"),
    "public port 443 on a routing address": (
        lambda d: d["public_ports"].append({"port": 443, "proto": "tcp", "service": "app",
                                            "address": "203.0.113.10"}),
        "public_ports[1].port: 443 belongs to the routing service (HTTP/HTTPS): use "
        "routing.domains for it"),
    # acme
    "acme not a mapping": (lambda d: routing(d).update(acme="https://acme.test/dir"),
                           'routing.acme: "https://acme.test/dir" is not a mapping'),
    "unknown in acme": (lambda d: routing(d)["acme"].update(eab_kid="x"),
                        "routing.acme.eab_kid: unknown field (known: ca_bundle, directory, email)"),
    "directory missing": (lambda d: routing(d)["acme"].pop("directory"),
                          "routing.acme.directory: is required"),
    "directory not a string": (lambda d: routing(d)["acme"].update(directory=14000),
                               "routing.acme.directory: 14000 is not a non-empty string"),
    "directory ftp": (lambda d: routing(d)["acme"].update(directory="ftp://acme.test/dir"),
                      'routing.acme.directory: "ftp://acme.test/dir" is not an http:// or '
                      "https:// URL with a host"),
    "directory no scheme": (lambda d: routing(d)["acme"].update(directory="acme.test/dir"),
                            'routing.acme.directory: "acme.test/dir" is not an http:// or '
                            "https:// URL with a host"),
    "directory no host": (lambda d: routing(d)["acme"].update(directory="https:///dir"),
                          'routing.acme.directory: "https:///dir" is not an http:// or '
                          "https:// URL with a host"),
    "directory bad port": (lambda d: routing(d)["acme"].update(directory="https://a.test:99999/"),
                           'routing.acme.directory: "https://a.test:99999/" is not an http:// '
                           "or https:// URL with a host"),
    "directory with a space": (lambda d: routing(d)["acme"].update(directory="https://a.test/d ir"),
                               'routing.acme.directory: "https://a.test/d ir" is not an http:// '
                               "or https:// URL with a host"),
    "email without @": (lambda d: routing(d)["acme"].update(email="ops.example.org"),
                        'routing.acme.email: "ops.example.org" is not an email address '
                        "(like ops@example.org)"),
    "email without a domain": (lambda d: routing(d)["acme"].update(email="ops@"),
                               'routing.acme.email: "ops@" is not an email address '
                               "(like ops@example.org)"),
    "email with one label": (lambda d: routing(d)["acme"].update(email="ops@localhost"),
                             'routing.acme.email: "ops@localhost" is not an email address '
                             "(like ops@example.org)"),
    "email with a space": (lambda d: routing(d)["acme"].update(email="o ps@example.org"),
                           'routing.acme.email: "o ps@example.org" is not an email address '
                           "(like ops@example.org)"),
    "email empty": (lambda d: routing(d)["acme"].update(email=""),
                    'routing.acme.email: "" is not a non-empty string'),
    "ca_bundle missing": (lambda d: routing(d)["acme"].update(ca_bundle="/nonexistent/ca.pem"),
                          'routing.acme.ca_bundle: "/nonexistent/ca.pem" does not exist'),
    "ca_bundle a directory": (lambda d: routing(d)["acme"].update(ca_bundle="/"),
                              'routing.acme.ca_bundle: "/" is not a file'),
    "ca_bundle not a string": (lambda d: routing(d)["acme"].update(ca_bundle=True),
                               "routing.acme.ca_bundle: true is not a non-empty string"),
    # domains
    "domains not a list": (lambda d: routing(d).update(domains={"host": "x.org"}),
                           'routing.domains: {"host": "x.org"} is not a list'),
    "domain not a mapping": (lambda d: routing(d)["domains"].append("x.example.org"),
                             'routing.domains[3]: "x.example.org" is not a mapping'),
    "unknown in domain": (lambda d: domain(d).update(path="/"),
                          f"{D0}.path: unknown field (known: host, port, redirect_https, "
                          "service, tls)"),
    # host
    "host missing": (lambda d: domain(d).pop("host"), f"{D0}.host: is required"),
    "host not a string": (lambda d: domain(d).update(host=42),
                          f"{D0}.host: 42 is not a host name (like app.example.org or "
                          "*.example.org)"),
    "host empty": (lambda d: domain(d).update(host=""),
                   f'{D0}.host: "" is not a host name (like app.example.org or *.example.org)'),
    "host ipv4": (lambda d: domain(d).update(host="203.0.113.10"),
                  f'{D0}.host: "203.0.113.10" is an IP address, not a host name'),
    "host ipv6": (lambda d: domain(d).update(host="2001:db8::10"),
                  f'{D0}.host: "2001:db8::10" is an IP address, not a host name'),
    "host ipv6 bracketed": (lambda d: domain(d).update(host="[2001:db8::10]"),
                            f'{D0}.host: "[2001:db8::10]" is an IP address, not a host name'),
    "host ip and port": (lambda d: domain(d).update(host="203.0.113.10:80"),
                         f'{D0}.host: "203.0.113.10:80" is an IP address, not a host name'),
    "host with a port": (lambda d: domain(d).update(host="app.example.org:8080"),
                         f'{D0}.host: "app.example.org:8080" has a port: a host is a name only '
                         "(the routing service serves 80 and 443)"),
    "host a url": (lambda d: domain(d).update(host="https://app.example.org/"),
                   f'{D0}.host: "https://app.example.org/" is a URL, not a host name (give the '
                   "name only, like app.example.org)"),
    "host one label": (lambda d: domain(d).update(host="localhost"),
                       f'{D0}.host: "localhost" is not a host name: it needs at least two labels '
                       "(like example.org)"),
    "host empty label": (lambda d: domain(d).update(host="app..example.org"),
                         f'{D0}.host: "app..example.org" is not a host name: it has an empty '
                         "label"),
    "host two trailing dots": (lambda d: domain(d).update(host="app.example.org.."),
                               f'{D0}.host: "app.example.org.." is not a host name: it has an '
                               "empty label"),
    "host leading dot": (lambda d: domain(d).update(host=".example.org"),
                         f'{D0}.host: ".example.org" is not a host name: it has an empty label'),
    "host leading hyphen": (lambda d: domain(d).update(host="-app.example.org"),
                            f'{D0}.host: "-app.example.org" is not a host name: label "-app" '
                            "starts or ends with '-'"),
    "host trailing hyphen": (lambda d: domain(d).update(host="app.example-.org"),
                             f'{D0}.host: "app.example-.org" is not a host name: label '
                             "\"example-\" starts or ends with '-'"),
    "host underscore": (lambda d: domain(d).update(host="my_app.example.org"),
                        f'{D0}.host: "my_app.example.org" is not a host name: label "my_app" '
                        "has a character other than a-z, 0-9 and '-'"),
    "host not ascii": (lambda d: domain(d).update(host="bücher.example.org"),
                       f'{D0}.host: "bücher.example.org" is not a host name: label "bücher" '
                       "has a character other than a-z, 0-9 and '-'"),
    "host label of 64": (lambda d: domain(d).update(host="a" * 64 + ".org"),
                         f'{D0}.host: "{"a" * 56}... is not a host name: a label is longer '
                         "than 63 characters"),
    "host of 254": (lambda d: domain(d).update(host=".".join(["a" * 63] * 4) + ".o"),
                    f'{D0}.host: "{"a" * 56}... is not a host name: it is longer than 253 '
                    "characters"),
    "host numeric tld": (lambda d: domain(d).update(host="app.example.123"),
                         f'{D0}.host: "app.example.123" is not a host name: its last label '
                         '"123" is all digits'),
    "host wildcard inside a label": (
        lambda d: domain(d, 1).update(host="a*.example.org"),
        'routing.domains[1].host: "a*.example.org" has a \'*\' that is not the whole leftmost '
        "label (a wildcard is *. before a name, like *.example.org)"),
    "host two wildcards": (
        lambda d: domain(d, 1).update(host="*.*.example.org"),
        'routing.domains[1].host: "*.*.example.org" has a \'*\' that is not the whole leftmost '
        "label (a wildcard is *. before a name, like *.example.org)"),
    "host wildcard not leftmost": (
        lambda d: domain(d, 1).update(host="app.*.org"),
        'routing.domains[1].host: "app.*.org" has a \'*\' that is not the whole leftmost '
        "label (a wildcard is *. before a name, like *.example.org)"),
    "host wildcard of a tld": (
        lambda d: domain(d, 1).update(host="*.org"),
        'routing.domains[1].host: "*.org" is not a host name: a wildcard needs a name of at '
        "least two labels after '*.' (like *.example.org)"),
    "host twice": (lambda d: domain(d, 2).update(host="app.example.org"),
                   'routing.domains[2].host: "app.example.org" is listed twice '
                   "(also routing.domains[0].host)"),
    "host twice but for case and dot": (
        lambda d: domain(d, 2).update(host="APP.Example.org."),
        'routing.domains[2].host: "APP.Example.org." is listed twice '
        "(also routing.domains[0].host)"),
    "wildcard host twice": (
        lambda d: routing(d)["domains"].append({"host": "*.App.example.org", "service": "app",
                                                "port": 80}),
        'routing.domains[3].host: "*.App.example.org" is listed twice '
        "(also routing.domains[1].host)"),
    # service and port
    "service missing": (lambda d: domain(d).pop("service"), f"{D0}.service: is required"),
    "service unknown": (lambda d: domain(d).update(service="web"),
                        f'{D0}.service: "web" is not a service of this project '
                        "(known: api, app)"),
    "service not a name": (lambda d: domain(d).update(service="my app"),
                           f'{D0}.service: "my app" is not a name ([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})'),
    "port missing": (lambda d: domain(d).pop("port"), f"{D0}.port: is required"),
    "port not a port": (lambda d: domain(d).update(port=0), f"{D0}.port: 0 is not a port (1-65535)"),
    "port as string": (lambda d: domain(d).update(port="80"),
                       f'{D0}.port: "80" is not a port (1-65535)'),
    "port not the service's": (lambda d: domain(d).update(port=81),
                               f"{D0}.port: 81 is not a tcp port of service app "
                               "(its tcp ports: 80 (target_port 8080))"),
    "port is the service's udp port": (lambda d: domain(d).update(port=53),
                                       f"{D0}.port: 53 is not a tcp port of service app "
                                       "(its tcp ports: 80 (target_port 8080))"),
    "port of another service": (lambda d: domain(d, 2).update(port=80),
                                "routing.domains[2].port: 80 is not a tcp port of service api "
                                "(its tcp ports: 443 (target_port 8443), 9000)"),
    "service without tcp ports": (
        lambda d: d["services"][1].update(ports=[{"port": 9000, "proto": "udp"}]),
        "routing.domains[2].port: 9000 is not a tcp port of service api (it has no tcp ports)"),
    # tls and redirect_https
    "tls unknown": (lambda d: domain(d).update(tls="letsencrypt"),
                    f'{D0}.tls: "letsencrypt" is not one of acme, self-signed, none'),
    "tls acme on a wildcard": (lambda d: domain(d, 1).update(tls="acme"),
                               'routing.domains[1].tls: "acme" cannot be used for the wildcard '
                               "host *.app.example.org: HTTP-01 cannot validate a wildcard; use "
                               "self-signed or an exact host"),
    "tls acme without acme": (lambda d: routing(d).pop("acme"),
                              f'{D0}.tls: "acme" needs a routing.acme section (its directory)'),
    "redirect without tls": (lambda d: domain(d).update(tls="none"),
                             f"{D0}.redirect_https: true redirects to HTTPS, which tls: none "
                             "does not serve"),
    "redirect not a bool": (lambda d: domain(d).update(redirect_https="yes"),
                            f'{D0}.redirect_https: "yes" is not true or false'),
}


@pytest.mark.parametrize("change, expected", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_each_bad_input_is_one_problem(data, change, expected):
    change(data)
    assert problems_of(data) == [expected]


def test_a_bad_acme_section_still_counts_as_given(data):
    """tls: acme is judged against the section's presence, not its validity: one problem."""
    routing(data)["acme"] = {"directory": "gopher://x"}
    assert problems_of(data) == [
        'routing.acme.directory: "gopher://x" is not an http:// or https:// URL with a host']


def test_a_broken_service_does_not_add_port_problems(data):
    data["services"][0]["ports"][0]["port"] = 70000
    assert problems_of(data) == ["services.app.ports[0].port: 70000 is not a port (1-65535)"]


def test_redirect_with_self_signed_is_fine(data):
    domain(data, 1)["redirect_https"] = True
    assert parse(data).routing.domains[1].redirect_https is True


def test_tls_none_without_redirect_is_fine(data):
    domain(data, 2)["tls"] = "none"
    assert parse(data).routing.domains[2].tls == "none"


def test_ca_bundle_may_be_relative(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    routing(data)["acme"]["ca_bundle"] = "acme-ca.pem"
    assert parse(data).routing.acme.ca_bundle == "acme-ca.pem"
    routing(data)["acme"]["ca_bundle"] = "other.pem"
    assert problems_of(data) == ['routing.acme.ca_bundle: "other.pem" does not exist']


def test_ca_bundle_unreadable_as_access_says(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    routing(data)["acme"]["ca_bundle"] = "acme-ca.pem"
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert problems_of(data) == ['routing.acme.ca_bundle: "acme-ca.pem" is not readable']


def test_several_problems_are_listed_together(data):
    routing(data)["addresses"] = ["203.0.113.10", "not-an-ip", "203.0.113.10"]
    routing(data)["acme"].update(directory="ftp://x", email="nobody", color="blue")
    domain(data, 0).update(host="APP.example.org", tls="acme")
    domain(data, 1).update(host="*.example.org", tls="acme", service="web")
    domain(data, 2).update(host="app.example.org.", port=8080, tls="none", redirect_https=True)
    routing(data)["domains"].append({"host": "x.*.org", "service": "app", "port": 80,
                                     "tls": "plain", "extra": 1})
    with pytest.raises(ConfigError) as caught:
        parse(data, source="demo.yaml")
    assert caught.value.problems == [
        'routing.addresses[1]: "not-an-ip" is not an IP address',
        'routing.addresses[2]: "203.0.113.10" is listed twice (also routing.addresses[0])',
        "routing.acme.color: unknown field (known: ca_bundle, directory, email)",
        'routing.acme.directory: "ftp://x" is not an http:// or https:// URL with a host',
        'routing.acme.email: "nobody" is not an email address (like ops@example.org)',
        'routing.domains[1].service: "web" is not a service of this project (known: api, app)',
        'routing.domains[1].tls: "acme" cannot be used for the wildcard host *.example.org: '
        "HTTP-01 cannot validate a wildcard; use self-signed or an exact host",
        "routing.domains[2].port: 8080 is not a tcp port of service api "
        "(its tcp ports: 443 (target_port 8443), 9000)",
        "routing.domains[2].redirect_https: true redirects to HTTPS, which tls: none does not "
        "serve",
        'routing.domains[2].host: "app.example.org." is listed twice '
        "(also routing.domains[0].host)",
        "routing.domains[3].extra: unknown field (known: host, port, redirect_https, service, tls)",
        'routing.domains[3].host: "x.*.org" has a \'*\' that is not the whole leftmost label '
        "(a wildcard is *. before a name, like *.example.org)",
        'routing.domains[3].tls: "plain" is not one of acme, self-signed, none',
    ]
    assert str(caught.value) == "; ".join(caught.value.problems)


def test_routing_problems_come_with_the_others(data):
    data["services"][1]["vip"] = "nope"
    domain(data, 0)["host"] = "10.0.0.1"
    problems = problems_of(data)
    assert problems == ['services.api.vip: "nope" is not an IP address',
                        f'{D0}.host: "10.0.0.1" is an IP address, not a host name']


def test_routers_make_the_balancers_routing_services():
    raw = {"project": "p",
           "services": [{"name": "app", "vip": "10.0.0.10",
                         "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                         "backends": [{"address": "10.0.0.2"}]}],
           "routing": {"addresses": ["203.0.113.10", "2001:db8::10"],
                       "domains": [{"host": "a.example.org", "service": "app", "port": 80}],
                       "routers": [{"address": "10.0.0.50"}, {"address": "10.0.0.51", "weight": 0}]}}
    project = config.parse(raw)
    (routing,) = [s for s in project.services if s.name.startswith("routing-")]
    assert str(routing.vip) == "203.0.113.10"            # no v6 routers: no v6 service
    assert [(p.port, p.proto, p.target_port) for p in routing.ports] == [(80, "tcp", 80), (443, "tcp", 443)]
    assert [(str(b.address), b.weight) for b in routing.backends] == [("10.0.0.50", 1), ("10.0.0.51", 0)]
    assert routing.health.kind == "tcp"
    raw["services"][0]["name"] = "routing-7"
    raw["routing"]["domains"][0]["service"] = "routing-7"
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    assert str(err.value) == ('services.routing-7.name: "routing-7" is reserved: services named '
                              'routing-* come from routing.routers')
