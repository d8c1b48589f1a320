"""Where zfast finds its C sources and keeps its runtime state."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Pinned maps live in a bpffs under /run, not /sys/fs/bpf: `ip netns exec` mounts a
# fresh /sys for the namespace, which hides /sys/fs/bpf from a node run that way.
BPFFS = Path("/run/zfast/bpffs")


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
    return BPFFS / node


def is_bpffs(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == str(path) and fields[sep + 1] == "bpf":
                return True
    return False


def ensure_bpffs(path: Path = BPFFS) -> None:
    """Mount a bpffs at path unless one is there (scripts/bootstrap.sh mounts it at set-up,
    in the host's mount namespace, where every node's daemon sees the same one)."""
    if is_bpffs(path):
        return
    # subprocess (~2 ms) is not for every zfast command, all of which import this module
    import subprocess  # noqa: PLC0415

    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise OSError(f"cannot mount bpffs at {path}: {out.stderr.strip()}")
