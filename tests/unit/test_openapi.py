"""The OpenAPI documents and the daemons' routes name the same endpoints: a node's daemon
(docs/openapi.yaml) and the core daemon (docs/openapi-core.yaml)."""

from pathlib import Path
from unittest import mock

import pytest
import yaml
from openapi_spec_validator import validate

from zfast.core.service import CoreService
from zfast.node.routes import routes

DOCS = Path(__file__).resolve().parents[2] / "docs"


def load(name: str) -> dict:
    return yaml.safe_load((DOCS / name).read_text())


def documented(name: str) -> set[tuple[str, str]]:
    doc = load(name)
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def core_routes() -> set[tuple[str, str]]:
    """The table CoreService.up hands to its Server. It has no routes() of its own, so up
    runs against a mock service, with the store and the server mocked: nothing is made."""
    with mock.patch("zfast.core.service.Server") as server, mock.patch("zfast.store.open_store"):
        CoreService.up(mock.MagicMock())
    (_, routes), _ = server.call_args
    return set(routes)


def test_every_node_route_is_documented_and_every_documented_path_is_served():
    served = set(routes(mock.MagicMock()))  # the table only, no node behind it
    assert documented("openapi.yaml") == served


def test_every_core_route_is_documented_and_every_documented_path_is_served():
    assert documented("openapi-core.yaml") == core_routes()


@pytest.mark.parametrize("name", ["openapi.yaml", "openapi-core.yaml"])
def test_the_documents_are_valid_openapi(name):
    validate(load(name))   # e.g. a comma in a flow mapping's description splits it into keys
