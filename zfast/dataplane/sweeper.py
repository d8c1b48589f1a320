"""The daemon's side of the idle-flow sweeps: a sweeper process of its own
(`python -m zfast.dataplane.flowage`, which says why not in the daemon), started at the
first sweep, kept for the next ones, and started again if it died.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from zfast.dataplane.flowage import layout_of
from zfast.dataplane.loader import Loaded


class FlowSweeper:
    def __init__(self, dp: Loaded, pin: Path):
        self.dp = dp
        self.pin = pin            # the maps' pin dir: the process opens the flow map there
        self._proc: subprocess.Popen | None = None

    def sweep(self) -> dict:
        """One sweep: {"entries", "aged", "deleted"}, or {"error": why}."""
        try:
            p = self._proc
            if p is None or p.poll() is not None:
                p = self._proc = subprocess.Popen(
                    [sys.executable, "-m", "zfast.dataplane.flowage",
                     json.dumps(layout_of(self.dp.table("flows"))), str(self.pin / "flows")],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            p.stdin.write("sweep\n")
            p.stdin.flush()
            return json.loads(p.stdout.readline() or '{"error": "the sweeper exited"}')
        except (OSError, ValueError) as err:
            return {"error": str(err)}

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
