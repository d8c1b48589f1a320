"""An etcd server for the store tests: Debian's etcd (scripts/bootstrap.sh installs it;
installed here if missing), one member, in a namespace of a Topology or in this one."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from zfast.lab.netns import Topology, in_ns


def ensure_etcd() -> str:
    """Debian's etcd (scripts/bootstrap.sh installs it); installed here if missing."""
    path = shutil.which("etcd")
    if path:
        return path
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                        "etcd-server", "etcd-client"], env=env, capture_output=True, text=True)
    path = shutil.which("etcd")
    if not path:
        raise RuntimeError("etcd is not installed and `apt-get install etcd-server` failed "
                           f"(run scripts/bootstrap.sh as root):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return path


class EtcdServer:
    """One etcd member serving clients on 127.0.0.1 of its namespace (`local`, also its
    health checks) and on each of `addresses`: inside namespace `ns` of `topo`, or in this
    process's namespace when topo is None. stop() is a crash (SIGKILL); start() again keeps
    the data dir: a restart, not a reset."""

    def __init__(self, workdir: Path, addresses: list[str] = (), topo: Topology | None = None,
                 ns: str | None = None, port: int = 2379, peer_port: int = 2380):
        self.topo = topo
        self.ns = topo.ns(ns) if topo is not None else None
        self.binary = ensure_etcd()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = self.workdir / "etcd-data"
        self.log = self.workdir / "etcd.log"
        self.port, self.peer_port = port, peer_port
        self.local = self.url("127.0.0.1")
        self.urls = [self.url(a) for a in addresses] or [self.local]   # advertised
        self.proc: subprocess.Popen | None = None

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        if platform.machine() in ("aarch64", "arm64"):
            env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
        listen = ",".join(dict.fromkeys([self.local, *self.urls]))
        argv = [self.binary, "--name", "default", "--data-dir", str(self.data),
                "--listen-client-urls", listen, "--advertise-client-urls", ",".join(self.urls),
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"default={peer}"]
        with open(self.log, "a") as log:
            if self.topo is not None:
                self.proc = self.topo.popen(self.ns, argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)
            else:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not become healthy within {timeout} s:\n{self.tail()}")

    def healthy(self) -> bool:
        try:
            with in_ns(self.ns):
                r = urllib.request.urlopen(self.local + "/health", timeout=1)
            with r:
                return json.load(r).get("health") in ("true", True)
        except (OSError, ValueError):
            return False

    def version(self) -> str:
        with in_ns(self.ns):
            r = urllib.request.urlopen(self.local + "/version", timeout=2)
        with r:
            return json.load(r)["etcdserver"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)    # `ip netns exec` execs: the pid is etcd's
            self.proc.wait(15)
        self.proc = None

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""
