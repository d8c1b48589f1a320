"""The Python side's copies of the C structs' layouts, held to BCC's classes of the compiled
program (both as BCC compiles it and as the program cache loads it: the `lb` fixture).

  - every numpy structured dtype in zfast/ (a view the control plane writes maps through,
    e.g. zfast.reconcile.firewall.FW_KEY) is its C struct field by field: name, offset,
    size; one that no test maps to its C struct fails the first test;
  - every map of the shared fake data plane (tests/fakes) has BCC's key and value layout.
"""

from __future__ import annotations

import ctypes
import importlib
import pkgutil

import numpy as np
import pytest

import zfast
from tests.fakes.cstructs import view_mismatches
from tests.fakes.dataplane import FakeDataplane
from zfast.reconcile import firewall

# Each numpy view of a C struct in zfast/: (module, name) -> (a map that holds the struct,
# "Key" or "Leaf"). A new view belongs here; test_every_struct_view_is_checked says so.
VIEWS = {
    ("zfast.reconcile.firewall", "FW_KEY"): ("fw_rules0", "Key"),
    ("zfast.reconcile.firewall", "FW_RULE"): ("fw_rules0", "Leaf"),
    ("zfast.reconcile.firewall", "FW_PORT"): ("fw_ports", "Leaf"),
}


def struct_views() -> dict[tuple[str, str], np.dtype]:
    """Every module-level structured numpy dtype of the zfast package, by where it is
    bound (one dtype imported elsewhere is found under each of its names)."""
    found = {}
    for info in pkgutil.walk_packages(zfast.__path__, "zfast."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, np.dtype) and value.names:
                found[(info.name, name)] = value
    return found


def view(module: str, name: str) -> np.dtype:
    return getattr(importlib.import_module(module), name)


def test_every_struct_view_is_checked():
    found = struct_views()
    checked = {id(view(*where)) for where in VIEWS}
    unchecked = sorted(f"{m}.{n}" for (m, n), dtype in found.items() if id(dtype) not in checked)
    assert not unchecked, f"numpy views of C structs no test holds to the C struct: {unchecked}"
    assert set(VIEWS) <= set(found), "VIEWS names a dtype zfast/ no longer has"


@pytest.mark.parametrize("where", sorted(VIEWS), ids=lambda w: f"{w[0]}.{w[1]}")
def test_each_struct_view_is_its_c_struct_field_by_field(lb, where):
    table, side = VIEWS[where]
    cls = getattr(lb.dp.table(table), side)
    assert view_mismatches(view(*where), cls) == [], f"{where[0]}.{where[1]} vs {cls.__name__}"


def test_a_moved_field_is_found(lb):
    """The check above, and the product's own at load (firewall.layout_mismatch), see a
    field that moves."""
    leaf = lb.dp.table("fw_rules0").Leaf
    assert firewall.layout_mismatch(firewall.FW_RULE, leaf) is None
    moved = np.dtype([("action", "u1"), ("pad", "u1", 3), ("id", "<u2"), ("more", "<u2")])
    assert "id" in firewall.layout_mismatch(moved, leaf)
    assert any(w.startswith("id:") for w in view_mismatches(moved, leaf))


def layout(t) -> object:
    """A ctypes type's layout: (size, [(field, offset, its layout), ...]) of a struct (BCC's
    __pad_* fields left out), (size, length, element's layout) of an array, the size of a
    scalar."""
    if hasattr(t, "_fields_"):
        return (ctypes.sizeof(t), [(f[0], getattr(t, f[0]).offset, layout(f[1]))
                                   for f in t._fields_ if not f[0].startswith("__pad")])
    if hasattr(t, "_length_"):
        return (ctypes.sizeof(t), t._length_, layout(t._type_))
    return ctypes.sizeof(t)


FAKE = FakeDataplane()


@pytest.mark.parametrize("name", sorted(FAKE.maps))
def test_the_fake_data_planes_maps_have_bccs_layouts(lb, name):
    fake, real = FAKE.table(name), lb.dp.table(name)
    assert layout(fake.Key) == layout(real.Key), f"map {name}: key"
    # a per-CPU map's Leaf is one value per CPU (as many as the machine has): compare one
    assert layout(fake.sLeaf) == layout(getattr(real, "sLeaf", real.Leaf)), f"map {name}: value"
