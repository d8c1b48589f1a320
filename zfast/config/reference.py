"""The configuration reference of docs/configuration.md, made from the schema.

``reference()``: every section and its fields (the block between ``<!-- reference: begin
-->`` and ``<!-- reference: end -->``). A test keeps the doc and it equal
(tests/unit/test_config_reference.py); regenerate with ``python -m zfast.config
--reference``.
"""

from __future__ import annotations

from zfast.config.project import Project
from zfast.config.schema import file_keys, sections

# Every mapping the validator reads and the fields it knows, by section path ("[]": each
# item of a list).
FIELDS: dict[str, tuple[str, ...]] = {path: file_keys(schema)
                                      for path, schema in sections(Project).items()}


def reference() -> str:
    """The configuration reference (Markdown), from FIELDS."""
    lines = ["| section | fields |", "| --- | --- |"]
    for section, fields in FIELDS.items():
        lines.append(f"| `{section or '(top level)'}` | {', '.join(f'`{f}`' for f in fields)} |")
    return "\n".join(lines) + "\n"

