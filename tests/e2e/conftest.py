"""What the end-to-end tests share: their marker, and the root check of the tests that
build namespaces of their own (the kit's labs check it themselves)."""

import os

import pytest


def pytest_itemcollected(item):
    """Every test under tests/e2e is marked `e2e` here, not in each file (called through
    the item's own hook proxy: only for items under this directory)."""
    item.add_marker(pytest.mark.e2e)


@pytest.fixture
def need_root():
    # Fail, don't skip: a CI that silently skips these would test nothing.
    assert os.geteuid() == 0, "e2e tests need root (network namespaces); run ./run.sh test as root"
