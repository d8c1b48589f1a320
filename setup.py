"""Packaging for zfast: `pip install -e '.[test]'` (scripts/bootstrap.sh does it)."""
import re
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# Single source of truth for the version: zfast/__init__.py.
VERSION = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']',
                    (HERE / "zfast" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="zfast",
    version=VERSION,
    description="eBPF/XDP L4 load balancer with a Python control plane",
    packages=find_packages(include=["zfast", "zfast.*"]),
    python_requires=">=3.11",
    # BCC (module `bcc`) is not on PyPI: it comes from Debian's python3-bpfcc,
    # seen through a venv made with --system-site-packages.
    install_requires=["click", "scapy", "numpy", "pyyaml",
                      "prometheus_client",  # /metrics: the official exposition format
                      "matplotlib"],        # zfast report and bench --plot
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["zfast=zfast.cli:main"]},
    # The BPF C sources are compiled at run time by BCC, so they ship as data.
    data_files=[("share/zfast/bpf", sorted(glob("bpf/*.c") + glob("bpf/*.h")))],
)
