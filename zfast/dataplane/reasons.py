"""The data plane's verdict reasons, read from the one place that defines them.

``bpf/zfast_shared.h`` lists every reason once, in ``ZF_REASONS`` as
``X(NAME, ACTION, "description")``; the C enum is generated from it and so is
this list, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from zfast.paths import bpf_dir

_REASON_RE = re.compile(r'X\((\w+),\s*(\w+),\s*"([^"]*)"\)')


@dataclass(frozen=True)
class Reason:
    index: int    # value of the C enum
    name: str     # e.g. "drop_malformed"
    action: str   # redirect | pass | drop
    description: str


@lru_cache(maxsize=None)
def reasons() -> tuple[Reason, ...]:
    text = (bpf_dir() / "zfast_shared.h").read_text()
    block = text[text.index("#define ZF_REASONS(X)"):]
    block = block[:block.index("\n\n")]
    found = _REASON_RE.findall(block)
    if not found:
        raise RuntimeError("no reasons found in zfast_shared.h")
    return tuple(Reason(i, name.lower(), action.lower(), desc)
                 for i, (name, action, desc) in enumerate(found))


def by_name(name: str) -> Reason:
    for reason in reasons():
        if reason.name == name:
            return reason
    raise KeyError(name)


_DEFINE_RE = re.compile(r"^#define\s+(ZF_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.M)


@lru_cache(maxsize=None)
def defines() -> dict[str, int]:
    """Every numeric ``#define ZF_NAME value`` of zfast_shared.h (its size defaults
    included): constants the Python side needs are read from here, never copied."""
    text = (bpf_dir() / "zfast_shared.h").read_text()
    return {name: int(value, 0) for name, value in _DEFINE_RE.findall(text)}
