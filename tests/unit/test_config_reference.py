"""The configuration reference in docs/ and the validator's fields are one and the same."""

import dataclasses
import re
from pathlib import Path

import pytest

from zfast import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_documented_reference_is_the_validators():
    text = DOC.read_text()
    block = re.search(r"<!-- reference: begin -->\n(.*?)<!-- reference: end -->", text, re.S)
    assert block, "docs/configuration.md lost its generated reference block"
    assert block.group(1) == config.reference(), \
        "docs/configuration.md differs from zfast.config.FIELDS: run python -m zfast.config --reference"


def test_the_documented_field_tables_are_the_schemas():
    blocks = dict(re.findall(r"<!-- fields: (\S+) begin -->\n(.*?)<!-- fields: \1 end -->",
                             DOC.read_text(), re.S))
    assert {"datapath", "core"} <= set(blocks), "docs/configuration.md lost a field table"
    for section, block in blocks.items():
        assert block == config.field_table(section), \
            f"docs/configuration.md's {section} table differs from the schema: run " \
            f"python -m zfast.config --fields {section}"


def test_datapath_fields_are_the_dataclass_fields():
    assert set(config.FIELDS["datapath"]) == {f.name for f in dataclasses.fields(config.Datapath)}


def _minimal():
    return {"project": "p",
            "node": {"name": "n", "interfaces": [{"name": "eth0", "role": "public"}]},
            "services": [{"name": "s", "vip": "10.0.0.10",
                          "ports": [{"port": 80, "proto": "tcp"}],
                          "backends": [{"address": "10.1.0.2"}],
                          "health": {"kind": "tcp"}}],
            "public_ports": [{"port": 2222, "proto": "tcp", "address": "10.0.0.20",
                              "service": "s", "firewall": {"limit": {"new_per_s": 5}}}],
            "firewall": {"deny": []}, "datapath": {}, "telemetry": {},
            "ha": {"peer": "10.9.0.2", "bind": "10.9.0.1", "key_file": "/k",
                   "links": [{"bind": "10.8.0.1", "peer": "10.8.0.2"}]},
            "routing": {"addresses": ["10.0.0.30"], "acme": {"directory": "https://acme.test/dir"},
                        "domains": [{"host": "a.example.org", "service": "s", "port": 80}],
                        "routers": [{"address": "10.0.0.40"}]},
            "core": {"public": {"subnet": "10.230.0.0/24"}, "private": {"subnet": "10.231.0.0/24"},
                     "balancer": {"scale": {}}, "routers": {}, "runtime": {}}}


SECTIONS = {  # where each FIELDS section sits in _minimal()
    "": lambda d: d, "node": lambda d: d["node"],
    "node.interfaces[]": lambda d: d["node"]["interfaces"][0],
    "datapath": lambda d: d["datapath"], "services[]": lambda d: d["services"][0],
    "services[].ports[]": lambda d: d["services"][0]["ports"][0],
    "services[].backends[]": lambda d: d["services"][0]["backends"][0],
    "services[].health": lambda d: d["services"][0]["health"],
    "public_ports[]": lambda d: d["public_ports"][0],
    "public_ports[].firewall": lambda d: d["public_ports"][0]["firewall"],
    "public_ports[].firewall.limit": lambda d: d["public_ports"][0]["firewall"]["limit"],
    "firewall": lambda d: d["firewall"], "ha": lambda d: d["ha"],
    "ha.links[]": lambda d: d["ha"]["links"][0], "telemetry": lambda d: d["telemetry"],
    "routing": lambda d: d["routing"], "routing.acme": lambda d: d["routing"]["acme"],
    "routing.domains[]": lambda d: d["routing"]["domains"][0],
    "routing.routers[]": lambda d: d["routing"]["routers"][0],
    "core": lambda d: d["core"], "core.public": lambda d: d["core"]["public"],
    "core.private": lambda d: d["core"]["private"],
    "core.balancer": lambda d: d["core"]["balancer"],
    "core.balancer.scale": lambda d: d["core"]["balancer"]["scale"],
    "core.routers": lambda d: d["core"]["routers"],
    "core.runtime": lambda d: d["core"]["runtime"],
}


def test_every_section_is_checked():
    assert set(SECTIONS) == set(config.FIELDS)
    config.parse(_minimal())


@pytest.mark.parametrize("section", sorted(config.FIELDS))
def test_an_unknown_field_is_refused_in_every_section(section):
    data = _minimal()
    SECTIONS[section](data)["no_such_field"] = 1
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert any("no_such_field: unknown field" in p for p in err.value.problems), err.value.problems
