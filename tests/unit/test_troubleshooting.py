"""docs/troubleshooting.md explains every reason the data plane can count."""

from pathlib import Path

from zfast.dataplane.reasons import reasons

DOC = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def test_every_reason_is_explained_and_only_those():
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in DOC.read_text().splitlines()
            if line.startswith("| `")}
    assert set(rows) == {r.name for r in reasons()}
    for r in reasons():
        assert rows[r.name] == r.action, r.name
