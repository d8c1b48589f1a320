"""Every test under tests/unit is a unit test: marked `unit` here, not in each file."""

import pytest


def pytest_itemcollected(item):
    # Called through the item's own hook proxy: only for items under this directory.
    item.add_marker(pytest.mark.unit)
