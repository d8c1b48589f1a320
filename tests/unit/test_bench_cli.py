"""tools/: the benchmark's command line (the generator and the sink need root:
tests/bpf/test_tools.py)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_help():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--help"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "--quick" in p.stdout and "--plot" in p.stdout
