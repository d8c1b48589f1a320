"""Where zfast finds its C sources and keeps its runtime state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BPFFS = Path("/sys/fs/bpf")


def bpf_dir() -> Path:
    """The directory of bpf/zfast.c: $ZFAST_BPF_DIR, the checkout, or the installed copy."""
    candidates = []
    if os.environ.get("ZFAST_BPF_DIR"):
        candidates.append(Path(os.environ["ZFAST_BPF_DIR"]))
    candidates.append(Path(__file__).resolve().parent.parent / "bpf")
    candidates.append(Path(sys.prefix) / "share" / "zfast" / "bpf")
    for path in candidates:
        if (path / "zfast.c").is_file():
            return path
    raise FileNotFoundError("bpf/zfast.c not found (set ZFAST_BPF_DIR)")


def default_state_dir(node: str) -> Path:
    return Path("/run/zfast") / node


def pin_dir(node: str) -> Path:
    """bpffs directory of a node's maps: they outlive the daemon."""
    return BPFFS / "zfast" / node
