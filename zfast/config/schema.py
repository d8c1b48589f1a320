"""Each field of the project file declared once, on the dataclass that holds it.

A section's dataclass is its schema: ``setting()`` gives a field its kind (zfast/config/
kinds.py, or a mapping or list from here), its default in the file (also the dataclass
default), its key in the file when that is not the field's name, and its line of the
reference. From these come the known keys of every mapping (unknown ones are refused),
what a missing key reads as, ``FIELDS`` and docs/configuration.md's reference
(zfast/config/reference.py).

A section's reader (``Section(..., read=...)``) reads its fields through a ``Reader`` in
the order it files their problems, and adds the checks across fields; a section without
one is read field by field in declaration order (``build``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from zfast.config.kinds import Bad, Kind, Scalar
from zfast.config.problems import Problems

_SETTING = "zfast.config"   # the metadata key of a field's Setting


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()   # the default of a field the file must give
_DECLARED = object()     # Reader.read's default: the one the setting declares


@dataclass(frozen=True)
class From:
    """A default computed from a field of the same mapping read before it (None while
    that one is bad or missing)."""
    field: str
    compute: Callable[[Any], Any] = lambda value: value


@dataclass(frozen=True)
class Setting:
    kind: Kind
    default: Any = REQUIRED
    key: str | None = None             # the key in the file, when not the field's name
    doc: str = ""                      # the reference's meaning column
    shown_default: str | None = None   # the reference's default, when the value says it badly


def setting(kind: Kind, default: Any = REQUIRED, *, key: str | None = None, doc: str = "",
            shown_default: str | None = None) -> Any:
    """A dataclass field read from the project file (see the module docstring)."""
    metadata = {_SETTING: Setting(kind, default, key, doc, shown_default)}
    if default is REQUIRED or isinstance(default, From):
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@lru_cache(maxsize=None)   # asked for each mapping read: a file may have thousands
def settings(schema: type) -> Mapping[str, Setting]:
    """A section's settings by field name, in declaration order; then ``FILE_ONLY``'s, the
    keys a section checks but does not keep (its users read them from ``Project.raw``)."""
    out = {f.name: f.metadata[_SETTING] for f in dataclasses.fields(schema)
           if _SETTING in f.metadata}
    out.update(getattr(schema, "FILE_ONLY", {}))
    return MappingProxyType(out)


@lru_cache(maxsize=None)
def file_keys(schema: type) -> tuple[str, ...]:
    """The keys of the section's mapping in the file, in declaration order."""
    return tuple(s.key or name for name, s in settings(schema).items())


@lru_cache(maxsize=None)
def _kept(schema: type) -> tuple[str, ...]:
    """The fields the section's dataclass keeps (not FILE_ONLY's)."""
    return tuple(f.name for f in dataclasses.fields(schema) if _SETTING in f.metadata)


class ListOf(Kind):
    """A list, each item of ``item``; ``empty``: why an empty list is refused."""
    failed = ()

    def __init__(self, item: Kind, empty: str | None = None):
        self.item, self.empty = item, empty

    def checked(self, problems: Problems, path: str, value: Any) -> list:
        """The list to read the items of; [] after filing why there is none."""
        if not isinstance(value, list):
            problems.add(path, value, "is not a list")
            return []
        if not value and self.empty:
            problems.add(path, value, self.empty)
        return value

    def read(self, problems, path, value, **context):
        return tuple(self.item.read(problems, f"{path}[{i}]", item, **context)
                     for i, item in enumerate(self.checked(problems, path, value)))

    def describe(self):
        return f"list of {self.item.describe()}"


class Section(Kind):
    """A mapping of the fields of ``schema``, read by ``read(problems, path, value,
    **context)`` (default: ``build``)."""

    def __init__(self, schema: type, read: Callable[..., Any] | None = None):
        self.schema, self.reader = schema, read

    def read(self, problems, path, value, **context):
        if self.reader is None:
            return build(problems, path, value, self.schema)
        return self.reader(problems, path, value, **context)

    def describe(self):
        return "mapping"


class Opaque(Scalar):
    """A mapping only checked for being one; the section's users read and check it."""

    def parse(self, value):
        if not isinstance(value, dict):
            raise Bad("is not a mapping")
        return value

    def describe(self):
        return "mapping"


class Reader:
    """One mapping of the file: reads its fields by their settings, files problems under
    its path.

    ``read`` gives a field's value, its default when absent, or the kind's ``failed``
    (None, or () for a list) after filing a problem. Nothing is filed twice: if the mapping
    itself is bad, its fields are not read (each reads as its default, a required one as
    failed, unfiled).
    """

    def __init__(self, problems: Problems, path: str, value: Any, schema: type):
        self.problems = problems
        self.path = path
        self.schema = schema
        self.settings = settings(schema)
        self.ok = isinstance(value, dict)
        self.data = value if self.ok else {}
        self.values: dict[str, Any] = {}   # what each field read as, for From defaults
        if not self.ok:
            problems.add(path, value, "is not a mapping")
        known = file_keys(schema)
        for key in self.data:
            if key not in known:
                problems.say(self.path_of(key),
                             f"unknown field (known: {', '.join(sorted(known))})")

    def path_of(self, key: Any) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def key(self, name: str) -> str:
        return self.settings[name].key or name

    def present(self, name: str) -> bool:
        return self.key(name) in self.data

    def raw(self, name: str) -> Any:
        """The field as the file gives it (it must be present)."""
        return self.data[self.key(name)]

    def read(self, name: str, default: Any = _DECLARED, **context: Any) -> Any:
        """The field's value; ``default`` overrides the declared one; ``context`` goes
        to a section's reader."""
        setting, key = self.settings[name], self.key(name)
        if key in self.data:
            value = setting.kind.read(self.problems, self.path_of(key), self.data[key],
                                      **context)
        else:
            value = self._absent(name, setting, setting.default if default is _DECLARED
                                 else default)
        self.values[name] = value
        return value

    def _absent(self, name: str, setting: Setting, default: Any) -> Any:
        if default is REQUIRED:
            if self.ok:
                self.problems.say(self.path_of(self.key(name)), "is required")
            return setting.kind.failed
        if isinstance(default, From):
            source = self.values.get(default.field)
            return None if source is None else default.compute(source)
        return default

    def items(self, name: str) -> list:
        """A list field's items as the file gives them (after its own checks); the
        default's when absent."""
        setting = self.settings[name]
        if not self.present(name):
            return list(self._absent(name, setting, setting.default) or ())
        return setting.kind.checked(self.problems, self.path_of(self.key(name)), self.raw(name))

    def each(self, name: str, **context: Any) -> Iterator[tuple[str, Any, Any]]:
        """(path, item as given, item read) of a list field, each item read as the loop
        gets to it: checks made in the loop file their problems in the item's turn."""
        item_kind, list_path = self.settings[name].kind.item, self.path_of(self.key(name))
        for i, item in enumerate(self.items(name)):
            path = f"{list_path}[{i}]"
            yield path, item, item_kind.read(self.problems, path, item, **context)

    def read_all(self) -> dict[str, Any]:
        """Every field the section's dataclass keeps, read in declaration order."""
        return {name: self.read(name) for name in _kept(self.schema)}


def build(problems: Problems, path: str, value: Any, schema: type) -> Any:
    """A section without checks across its fields: each read in declaration order."""
    return schema(**Reader(problems, path, value, schema).read_all())


def sections(root: type, path: str = "") -> dict[str, type]:
    """Every mapping of the file by its path ("[]": each item of a list), from ``root``'s
    settings down: the reference's rows, the unknown-field test's cases."""
    out = {path: root}
    for name, setting in settings(root).items():
        key = setting.key or name
        below = f"{path}.{key}" if path else key
        kind = setting.kind
        if isinstance(kind, ListOf):
            kind, below = kind.item, below + "[]"
        if isinstance(kind, Section):
            out.update(sections(kind.schema, below))
    return out
