"""The LXD instance image, built on this machine from Debian's packages, and what LXD needs
installed.

No image server is reachable (and none is needed): the image is a ``mmdebstrap`` rootfs of
Debian's packages from the host's own sources, with tini as init, cached under
``IMAGE_CACHE`` by a hash of everything that goes into it (a new key builds a new image).
zfast itself is not in the image: the LXD runtime bind-mounts this checkout and its venv
into every instance, so a change to zfast needs no new image; a change to what zfast needs
from Debian does (the package list is in the key). `zfast core up` with
``core.runtime.kind: lxd`` builds (or finds) it and imports it; zfast.lab.lxd does too.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

APT_PACKAGES = ("lxd", "mmdebstrap")
# What a balancer or a router needs inside: Python and BCC's module for the daemon (its
# program comes from the program cache: no kernel headers, no compile inside), iproute2 for
# links, addresses and the XDP attach, tini as init (reaps the daemon's children, passes
# signals on). The venv (bind-mounted with the checkout) is over /usr/bin/python3 with the
# system site-packages, and takes these from Debian's: python3-yaml, python3-acme (which
# brings josepy, requests and cryptography), as the bootstrap installs them on the host.
# libbpfcc (BCC's syscall library, needed for a cache hit too) pulls LLVM: most of the
# image's 400 MB. HAProxy for routers (issue 18): Debian's 2.6, with its `haproxy` user
# (the router drops to it); mmdebstrap's policy-rc.d keeps its postinst from starting the
# service in the chroot, and it needs no systemd (libsystemd0 only).
IMAGE_PACKAGES = ("python3", "python3-bpfcc", "python3-yaml", "python3-acme", "iproute2", "tini",
                  "haproxy")
IMAGE_SUITE = "bookworm"
IMAGE_VERSION = 2                     # bump when the build below changes
IMAGE_CACHE = Path("/var/cache/zfast/lxd-image")
IMAGE_KEEP_S = 7 * 24 * 3600           # a build unused this long is removed by the next build
DEB_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
LOCK = Path("/run/lock/zfast-bootstrap.lock")   # the bootstrap's: apt never runs twice at once

# PID 1 of an instance: tini reaps orphans (a router's HAProxy workers, the daemon's
# helpers) and ends the container when LXD sends it SIGPWR (a clean `stop`).
INIT = "#!/bin/sh\nexec /usr/bin/tini -s -g -- /bin/sleep infinity\n"


def say(msg: str) -> None:
    print(f"zfast lxd: {msg}", file=sys.stderr, flush=True)


# ---- installation -------------------------------------------------------------------------

def _lock():
    path = LOCK if LOCK.parent.is_dir() else Path("/tmp/zfast-bootstrap.lock")
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def missing_packages(pkgs=APT_PACKAGES) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Package}\n", *pkgs],
                         capture_output=True, text=True)
    have = {line.split()[1] for line in out.stdout.splitlines()
            if len(line.split()) == 2 and line.startswith("ii")}
    return [p for p in pkgs if p not in have]


def install(pkgs=APT_PACKAGES) -> list[str]:
    """Debian's packages installed when missing (under the bootstrap's lock); what it installed."""
    if not missing_packages(pkgs):
        return []
    with _lock():
        missing = missing_packages(pkgs)
        if not missing:
            return []
        say(f"installing apt packages: {' '.join(missing)} ...")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-q"],
                     ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]):
            out = subprocess.run(argv, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(argv[:2])} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        return missing


# ---- the image ----------------------------------------------------------------------------

@dataclass
class Image:
    alias: str
    metadata: Path          # meta.tar.gz (metadata.yaml)
    rootfs: Path            # rootfs.tar
    key: str                # the hash of its inputs


def image_key(packages=IMAGE_PACKAGES, suite=IMAGE_SUITE) -> str:
    """A hash of what goes into the image: the packages, the suite, the host's Debian
    sources (a snapshot date is in them), the init script and this build's version."""
    h = hashlib.sha256()
    sources = DEB_SOURCES.read_bytes() if DEB_SOURCES.exists() else b""
    for part in (str(IMAGE_VERSION), suite, " ".join(sorted(packages)), INIT, platform.machine()):
        h.update(part.encode() + b"\0")
    h.update(sources)
    return h.hexdigest()[:16]


def _lxd_arch() -> str:
    return {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(), platform.machine())


def build_image(cache: Path = IMAGE_CACHE, packages=IMAGE_PACKAGES, suite=IMAGE_SUITE) -> Image:
    """The image's two files, built with mmdebstrap from the host's Debian sources when
    the cache has none for these inputs (builds unused for ``IMAGE_KEEP_S`` are removed)."""
    key = image_key(packages, suite)
    out = cache / key
    img = Image(f"zfast-{key}", out / "meta.tar.gz", out / "rootfs.tar", key)
    if img.metadata.exists() and img.rootfs.exists():
        _used(out)
        return img
    install(("mmdebstrap",))
    cache.mkdir(parents=True, exist_ok=True)
    with _lock():       # two builds at once: one builds, the other finds it
        if img.metadata.exists() and img.rootfs.exists():
            _used(out)
            return img
        prune_images(cache, keep=key)
        tmp = cache / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        say(f"building the instance image {img.alias} (mmdebstrap {suite}: {' '.join(packages)}) ...")
        hook = (f"printf '%s' {_sh_quote(INIT)} > \"$1/sbin/init\" && chmod 755 \"$1/sbin/init\""
                " && rm -rf \"$1\"/usr/share/doc/* \"$1\"/usr/share/man/* \"$1\"/usr/share/locale/*"
                " \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
        argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
                "--include=" + ",".join(packages), "--customize-hook=" + hook,
                "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                "--aptopt=APT::Install-Recommends \"false\"",
                suite, str(tmp / "rootfs.tar"), "-"]
        sources = DEB_SOURCES.read_bytes() if DEB_SOURCES.exists() else b""
        run = subprocess.run(argv, input=sources, capture_output=True)
        if run.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"mmdebstrap failed: {run.stderr.decode(errors='replace')[-3000:]}")
        meta = yaml.safe_dump({"architecture": _lxd_arch(), "creation_date": int(time.time()),
                               "properties": {"description": f"zfast instance ({suite}, {key})",
                                              "os": "debian", "release": suite}})
        with tarfile.open(tmp / "meta.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("metadata.yaml")
            info.size, info.mtime = len(meta), int(time.time())
            tar.addfile(info, io.BytesIO(meta.encode()))
        os.replace(tmp, out)
    return img


def _used(build: Path) -> None:
    """A build's directory's mtime is when it was last used (prune_images reads it)."""
    try:
        os.utime(build)
    except OSError:
        pass


def prune_images(cache: Path, keep: str, now: float | None = None) -> list[Path]:
    """Builds not used for ``IMAGE_KEEP_S`` (and unfinished ones) removed; ``keep`` stays.
    Not every other build: two checkouts of different image versions (a branch, main)
    building in turn would each remove the other's and rebuild it every run."""
    now = time.time() if now is None else now
    removed = []
    for old in cache.iterdir():
        if old.name == keep:
            continue
        try:
            stale = old.name.startswith(".") or now - old.stat().st_mtime > IMAGE_KEEP_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"
