"""Issue 17's structural rules, held: no class over 400 lines in zfast/, and no constant
shared with C written twice (a copied ZF_* value beside its name)."""

import ast
import re
from pathlib import Path

from zfast.config import Datapath
from zfast.dataplane.reasons import defines
from zfast.reconcile.maglev import DEFAULT_SIZE

REPO = Path(__file__).resolve().parents[2]
MAX_CLASS_LINES = 400
# `NAME = 4096  # ZF_MAX_BACKENDS`: a value copied from the header, its name beside it
COPIED = re.compile(r"^\s*[A-Za-z_][\w.]*\s*=\s*(0x[0-9a-fA-F]+|\d[\d_]*)\b.*\bZF_[A-Z_]+")


def test_no_class_in_zfast_is_over_400_lines():
    big = []
    for path in sorted((REPO / "zfast").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} {lines}")
    assert not big, big


def test_no_zf_value_is_copied_into_python():
    copies = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
              for root in ("zfast", "tests", "tools")
              for path in sorted((REPO / root).rglob("*.py"))
              for n, line in enumerate(path.read_text().splitlines(), 1)
              if COPIED.match(line)]
    assert not copies, copies


def test_the_size_defaults_are_the_headers():
    c = defines()
    d = Datapath()
    assert (d.maglev_size, d.flow_table, d.max_services, d.max_backends, d.max_ifindex,
            d.max_public_ports, d.max_rules, d.rate_table) == (
        c["ZF_RING_SIZE"], c["ZF_FLOW_TABLE"], c["ZF_MAX_SERVICES"], c["ZF_MAX_BACKENDS"],
        c["ZF_MAX_IFINDEX"], c["ZF_MAX_PUBLIC_PORTS"], c["ZF_MAX_RULES"], c["ZF_RATE_TABLE"])
    assert DEFAULT_SIZE == c["ZF_RING_SIZE"]
