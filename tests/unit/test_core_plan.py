"""The core's plan: the instances' shared project file and their specs."""

from zfast import config
from zfast.core.plan import Plan, parse_core


def _project(tmp_path) -> config.Project:
    ca = tmp_path / "acme-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    return config.parse({
        "project": "p",
        "services": [{"name": "app", "vip": "10.231.0.10", "ports": [{"port": 80, "proto": "tcp"}],
                      "backends": [{"address": "10.231.0.2"}]}],
        "routing": {"addresses": ["10.230.0.20"],
                    "acme": {"directory": "https://acme.test/dir", "ca_bundle": str(ca)},
                    "domains": [{"host": "a.example.org", "service": "app", "port": 80}]},
        "core": {"public": {"subnet": "10.230.0.0/24"}, "private": {"subnet": "10.231.0.0/24"}},
    })


def test_the_instances_file_has_no_ca_bundle_of_the_cores_host(tmp_path):
    """Only the core talks to the ACME server; an instance in a container (or on another
    machine) has no such path, and a file naming a missing one is refused whole."""
    project = _project(tmp_path)
    plan = Plan(project, parse_core(project), tmp_path / "core")
    raw = plan.shared_raw(set())
    assert raw["routing"]["acme"] == {"directory": "https://acme.test/dir"}
    assert "ca_bundle" in project.raw["routing"]["acme"]          # the operator's file as given
    for spec in plan.specs(set()):
        assert "ca_bundle" not in spec.config["routing"]["acme"], spec.name
    assert [r["address"] for r in raw["routing"]["routers"]] == ["10.231.0.251", "10.231.0.250"]
