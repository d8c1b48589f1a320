"""What the VM tier needs on the host, installed when missing: qemu, Debian 12's generic kernel
and its headers, busybox (virtme-ng's initramfs) and virtme-ng in the project venv.

The guest kernel is the generic flavour of the 6.1 ABI whose cloud headers the host set-up
(scripts/bootstrap.sh) installed: the cloud flavour has no 9p, which virtme-ng boots the host's
root filesystem over. The meta-packages (linux-image-amd64) are not used: they may move to a
newer ABI than the headers BCC compiles against on the host.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

VIRTME_NG = "virtme-ng==1.42"
APT_TOOLS = ["qemu-system-x86", "busybox-static"]
CLOUD_HEADERS = "/usr/src/linux-headers-*-cloud-{arch}"


class SetupError(Exception):
    """What the set-up could not do, in one line."""


def generic_release(cloud_header_dirs: list[str], arch: str = "amd64") -> str:
    """The generic flavour's release (6.1.0-57-amd64) of the newest cloud headers installed
    (/usr/src/linux-headers-6.1.0-57-cloud-amd64)."""
    found = []
    for d in cloud_header_dirs:
        m = re.fullmatch(rf"linux-headers-(\d+\.\d+\.\d+-\d+)-cloud-{re.escape(arch)}",
                         os.path.basename(d.rstrip("/")))
        if m:
            found.append(m.group(1))
    if not found:
        raise SetupError(f"no linux-headers-*-cloud-{arch} installed (scripts/bootstrap.sh "
                         "installs them): the guest kernel's ABI is taken from them")
    newest = max(found, key=lambda r: [int(x) for x in re.split(r"[.-]", r)])
    return f"{newest}-{arch}"


def kernel_packages(release: str) -> list[str]:
    return [f"linux-image-{release}", f"linux-headers-{release}"]


def missing_packages(packages: list[str]) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package}\n", *packages],
                         capture_output=True, text=True)
    installed = {line.split()[1] for line in out.stdout.splitlines()
                 if len(line.split()) == 2 and line.startswith("ii")}
    return [p for p in packages if p not in installed]


def apt_install(packages: list[str], say) -> None:
    missing = missing_packages(packages)
    if not missing:
        return
    say(f"installing {' '.join(missing)} (apt) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
        res = subprocess.run(["nice", "-n", "19", *argv], capture_output=True, text=True, env=env)
        if res.returncode:
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            raise SetupError(f"{' '.join(argv[:2])} failed ({res.returncode})")


def vng_path() -> Path:
    return Path(sys.prefix) / "bin" / "vng"


def pip_install_virtme(say) -> Path:
    vng = vng_path()
    if vng.exists():
        return vng
    say(f"installing {VIRTME_NG} into {sys.prefix} (pip) ...")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", VIRTME_NG], capture_output=True, text=True)
    if res.returncode or not vng.exists():
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise SetupError(f"pip install {VIRTME_NG} failed ({res.returncode})")
    return vng


def ensure(say, arch: str = "amd64") -> tuple[str, Path, Path]:
    """Install what is missing; (guest kernel release, its vmlinuz, vng)."""
    if os.geteuid() != 0:
        raise SetupError("needs root (apt, network namespaces, taps)")
    release = generic_release(glob.glob(CLOUD_HEADERS.format(arch=arch)), arch)
    apt_install([*APT_TOOLS, *kernel_packages(release)], say)
    vmlinuz = Path(f"/boot/vmlinuz-{release}")
    if not vmlinuz.exists():
        raise SetupError(f"{vmlinuz} missing although linux-image-{release} is installed")
    if not Path(f"/lib/modules/{release}/build").is_dir():
        raise SetupError(f"/lib/modules/{release}/build missing: BCC in the guest needs "
                         f"linux-headers-{release}")
    for tool in ("qemu-system-x86_64", "busybox"):
        if shutil.which(tool) is None:
            raise SetupError(f"{tool} not on PATH after installing {' '.join(APT_TOOLS)}")
    return release, vmlinuz, pip_install_virtme(say)
