"""The OpenAPI document and the daemon's routes name the same endpoints."""

from pathlib import Path
from unittest import mock

import yaml

from zfast.node.routes import routes

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def test_every_route_is_documented_and_every_documented_path_is_served():
    doc = yaml.safe_load(DOC.read_text())
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    served = set(routes(mock.MagicMock()))  # the table only, no node behind it
    assert documented == served
