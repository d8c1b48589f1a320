"""A routing daemon for the router tests: backends that say their name, and a router process
started the way the core starts one (``ip netns exec NS python -m zfast.routing.router -c
FILE``). Requests to it: tests/e2e/kit/web.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.e2e.kit.cli import REPO
from zfast.api import ApiError, Client
from zfast.controllers.logger import read as read_events
from zfast.lab.netns import Topology

# A backend: answers every GET with {"name", "host", "path"} (HTTP/1.1, keep-alive).
BACKEND_SERVER = r'''
import json, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = json.dumps({"name": name, "host": self.headers.get("Host"),
                           "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

class Server(ThreadingHTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    def handle_error(self, request, client_address):
        pass

Server((host, port), Handler).serve_forever()
'''


def haproxy_pids(cfg: Path) -> list[int]:
    """Processes running haproxy with this configuration file (master, workers, old ones)."""
    out = []
    needle = str(cfg).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"haproxy" in argv[0] and needle in argv:
            out.append(int(d))
    return out


class RouterProc:
    """One router daemon in namespace ns, from a project file (dict) plus its router section."""

    def __init__(self, topo: Topology, ns: str, state_dir: Path, project: dict, store_path: Path,
                 name: str = "demo-rt-a", http_port: int = 80, https_port: int = 443,
                 binds=("0.0.0.0", "::")):
        self.topo, self.ns, self.state_dir = topo, ns, Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.http_port, self.https_port = http_port, https_port
        data = dict(project)
        data["store"] = {"kind": "sqlite", "path": str(store_path)}
        data["router"] = {"name": name, "state_dir": str(self.state_dir), "binds": list(binds),
                          "http_port": http_port, "https_port": https_port}
        self.file = self.state_dir / "router.yaml"
        self.file.write_text(yaml.safe_dump(data, sort_keys=False))
        self.log_path = self.state_dir / "daemon.log"
        self.proc: subprocess.Popen | None = None

    @property
    def cfg(self) -> Path:
        return self.state_dir / "haproxy" / "haproxy.cfg"

    def start(self, timeout: float = 15.0) -> "RouterProc":
        with open(self.log_path, "ab") as logf:
            self.proc = self.topo.popen(self.ns, [sys.executable, "-m", "zfast.routing.router",
                                                  "-c", str(self.file)],
                                        stdout=logf, stderr=logf,
                                        cwd=str(REPO))
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"router exited at start ({self.proc.returncode}):\n"
                                     + self.log())
            try:
                self.status()
                self.start_seconds = time.monotonic() - t0
                return self
            except ApiError:
                pass
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"router not answering after {timeout} s:\n" + self.log())
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def status(self) -> dict:
        return Client(self.state_dir, timeout=5).get("/status")

    def stats(self) -> dict:
        return Client(self.state_dir, timeout=5).get("/stats")

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_events(self.state_dir) if kind is None or e["kind"] == kind]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in haproxy_pids(self.cfg):   # never leave one behind, even after a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
