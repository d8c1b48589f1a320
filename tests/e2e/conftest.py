"""What the end-to-end tests share."""

import pytest


def pytest_itemcollected(item):
    """Every test under tests/e2e is marked `e2e` here, not in each file (called through
    the item's own hook proxy: only for items under this directory)."""
    item.add_marker(pytest.mark.e2e)
