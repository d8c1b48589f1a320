"""The configuration reference of docs/configuration.md, made from the schema.

``reference()``: every section and its fields (the block between ``<!-- reference: begin
-->`` and ``<!-- reference: end -->``). ``field_table(section)``: one section's fields with
their kind, default and meaning, those of its sub-sections as ``sub.field`` (the blocks
between ``<!-- fields: SECTION begin -->`` and ``<!-- fields: SECTION end -->``). A test
keeps the doc and these equal (tests/unit/test_config_reference.py); regenerate with
``python -m zfast.config --reference`` and ``--fields SECTION``.
"""

from __future__ import annotations

from typing import Any

from zfast.config.project import Project
from zfast.config.schema import REQUIRED, From, Section, file_keys, sections, settings

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


def field_table(section: str) -> str:
    """One section's fields (Markdown): field, value, default, meaning."""
    lines = ["| field | value | default | meaning |", "| --- | --- | --- | --- |"]
    lines += _rows(sections(Project)[section], "")
    return "\n".join(lines) + "\n"


def _rows(schema: type, prefix: str) -> list[str]:
    rows = []
    for name, setting in settings(schema).items():
        key = prefix + (setting.key or name)
        if isinstance(setting.kind, Section):
            rows += _rows(setting.kind.schema, key + ".")
            continue
        rows.append(f"| `{key}` | {setting.kind.describe()} | {_shown_default(setting)} | "
                    f"{setting.doc} |")
    return rows


def _shown_default(setting: Any) -> str:
    if setting.shown_default is not None:
        return setting.shown_default
    default = setting.default
    if default is REQUIRED:
        return "required"
    if isinstance(default, From):
        raise ValueError(f"a From default needs a shown_default ({setting})")
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f"`{default}`"
    if default == ():
        return "`[]`"
    return str(default)
