"""The zfast CLI as the end-to-end tests run it: a subprocess of this interpreter, in a
namespace if asked, from the repo root; and what its --json commands print."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ZFAST = [sys.executable, "-m", "zfast.cli"]


def zfast(*args: str, ns: str | None = None, timeout: float = 120,
          check: bool = False) -> subprocess.CompletedProcess:
    """Run the zfast CLI (this interpreter), in namespace ns if given; check: it must
    exit 0 (an assertion that shows its stderr)."""
    argv = [*ZFAST, *args]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check:
        assert p.returncode == 0, f"zfast {' '.join(args)} exited {p.returncode}: {p.stderr}"
    return p


def stats_json(state_dir: Path) -> dict:
    p = zfast("stats", "--json", "--state-dir", str(state_dir))
    assert p.returncode == 0, f"zfast stats failed: {p.stderr}"
    return json.loads(p.stdout)


def service_stats(stats: dict, name: str) -> dict:
    """{"packets": n, "backends": {address: packets}} of one service."""
    svc = next(s for s in stats["services"] if s["name"] == name)
    return {"packets": svc["packets"],
            "backends": {b["address"]: b["packets"] for b in svc["backends"]}}
