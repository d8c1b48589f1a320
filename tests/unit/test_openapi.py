"""The OpenAPI documents and the daemons' routes name the same endpoints: a node's daemon
(docs/openapi.yaml) and the core daemon (docs/openapi-core.yaml)."""

from pathlib import Path
from unittest import mock

import pytest
import yaml
from openapi_spec_validator import validate

from zfast.core import routes as core
from zfast.node import routes as node

DOCS = Path(__file__).resolve().parents[2] / "docs"


def load(name: str) -> dict:
    return yaml.safe_load((DOCS / name).read_text())


def documented(name: str) -> set[tuple[str, str]]:
    doc = load(name)
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_every_node_route_is_documented_and_every_documented_path_is_served():
    served = set(node.routes(mock.MagicMock()))  # the table only, no node behind it
    assert documented("openapi.yaml") == served


def test_every_core_route_is_documented_and_every_documented_path_is_served():
    assert documented("openapi-core.yaml") == set(core.routes(mock.MagicMock()))


@pytest.mark.parametrize("name", ["openapi.yaml", "openapi-core.yaml"])
def test_the_documents_are_valid_openapi(name):
    validate(load(name))   # e.g. a comma in a flow mapping's description splits it into keys
