"""Project files as store revisions: the part the nodes share, what changed between two
files (each revision's change lines), a stored revision read back as this node's
project, and the history `zfast history` shows.
"""

from __future__ import annotations

import json

import yaml

from zfast import config
from zfast.store import Store

# Sections that are each node's own: the store shares everything else between nodes.
# datapath too: its sizes are compiled into each node's program, and the two nodes of a
# pair differ in them while the core service resizes one after the other.
LOCAL_SECTIONS = ("node", "ha", "store", "datapath")
LIST_DETAIL = 20  # longer lists (e.g. 100k firewall CIDRs) are summed up in one line


def dump_yaml(raw: dict) -> str:
    # libyaml's emitter when there is one: the pure-Python one takes seconds on a file
    # with 100,000 firewall rules (and `zfast apply` of those must stay under 5 s)
    return yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper))


def shared_part(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in LOCAL_SECTIONS}


def local_part(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k in LOCAL_SECTIONS}


def shared_of(text: str) -> dict:
    """The shared part of a stored revision's file."""
    return shared_part(yaml.safe_load(text) or {})


def node_project(shared: dict, local: dict, source: str) -> config.Project:
    """A revision's shared part with this node's own sections, checked whole
    (raises config.ConfigError)."""
    raw = dict(shared)
    raw.update(local)
    return config.parse(raw, source=source)


def config_diff(old: object, new: object, path: str = "") -> list[str]:
    """What changed between two project files, one line per changed field."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"- {sub}")
            elif key not in old:
                out.append(f"+ {sub}: {json.dumps(new[key], default=str)[:80]}")
            else:
                out += config_diff(old[key], new[key], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and old != new and (
            len(old) > LIST_DETAIL or len(new) > LIST_DETAIL):
        try:
            added, removed = len(set(map(str, new)) - set(map(str, old))), \
                len(set(map(str, old)) - set(map(str, new)))
        except TypeError:
            added = removed = -1
        return [f"~ {path}: {len(old)} -> {len(new)} items ({added} added, {removed} removed)"]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_diff(a, b, f"{path}[{i}]")
        return out
    if old != new:
        return [f"~ {path}: {json.dumps(old, default=str)[:40]} -> {json.dumps(new, default=str)[:40]}"]
    return []


def history(store: Store, project: str, applied: int) -> list[dict]:
    """The project's revisions, as the store lists them; applied: the one the maps hold."""
    return [{"rev": r.rev, "who": r.who, "time": r.time, "source": r.source,
             "changes": r.changes, "applied": r.rev == applied}
            for r in store.history(project)]
