"""A running `zfast core up` for the core-service tests: core_service() starts it in a
namespace of its own with backends and a client on its bridges; Core is a handle on it
(status, instances, events, waiting for a complete pair)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from zfast.api import ApiError, Client
from zfast.lab.netns import Topology


class Core:
    def __init__(self, state: Path, topo, proc: subprocess.Popen, cli: str,
                 err: Path | None = None):
        self.state, self.topo, self.proc, self.cli = state, topo, proc, cli
        self.err = err              # its stderr

    def status(self) -> dict:
        return Client(self.state, timeout=5).get("/status")

    def instances(self) -> dict:
        return {i["name"]: i for i in self.status()["instances"]}

    def events(self, kind: str | None = None) -> list[dict]:
        lines = (self.state / "events.jsonl").read_text().splitlines()
        out = [json.loads(line) for line in lines if line.strip()]
        return [e for e in out if kind is None or e["kind"] == kind]

    def repairs(self, name: str, action: str | None = None) -> list[dict]:
        """The repair events of instance `name` (of one action, if given), oldest first."""
        return [e for e in self.events("repair") if e.get("instance") == name
                and (action is None or e["action"] == action)]

    def story(self, n: int = 10) -> str:
        """For a failure message: the controllers' last events and what the daemons that
        ran in the last two minutes printed last."""
        events = [e for e in self.events() if e["kind"] in ("repair", "scale", "error")][-n:]
        logs = []
        for log in sorted(self.state.glob("*/daemon.log")):
            if time.time() - log.stat().st_mtime < 120:
                tail = log.read_text(errors="replace").splitlines()[-6:]
                logs.append(f"{log.parent.name}/daemon.log:\n  " + "\n  ".join(tail))
        return "\n".join([json.dumps(e) for e in events] + logs)

    def wait_status(self, done, timeout: float, failure: str, during=None, step: float = 0.2) -> dict:
        """Core status until done(status) holds; that status. ``during`` (if given) runs
        between looks (a check that must hold meanwhile)."""
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the core exited ({self.proc.returncode}): " \
                f"{self.err.read_text()[-2000:] if self.err else ''}"
            try:
                last = self.status()
            except ApiError:
                time.sleep(0.2)
                continue
            if done(last):
                return last
            if during:
                during()
            time.sleep(step)
        raise AssertionError(f"{failure} after {timeout} s: {last}\n{self.story()}")

    def wait_pair(self, timeout: float = 60.0, spare: bool = True, stable_s: float = 0.0) -> dict:
        """Until one active and one standby, both healthy (for stable_s at least: failing
        sooner counts as a crash), and a spare parked."""
        def complete(st: dict) -> bool:
            roles = sorted(i["role"] or "-" for i in st["instances"])
            healthy = all(i["healthy"] and i["healthy_since"] is not None
                          and time.time() - i["healthy_since"] >= stable_s
                          for i in st["instances"])
            return roles == ["active", "standby"] and healthy and (not spare or st.get("spare_ready"))
        st = self.wait_status(complete, timeout, "the pair is not complete")
        return {i["name"]: i for i in st["instances"]}

    def by_role(self, role: str) -> dict:
        return next(i for i in self.instances().values() if i["role"] == role)


@contextmanager
def core_service(prefix: str, state: Path, project: dict, backends: tuple[str, ...],
                 client: str, setup=None) -> Iterator[Core]:
    """`zfast core up` of project in a namespace "host" of its own, an echo backend
    (TCP 8080) at each of backends on the private bridge, a client at client (an
    address/len) on the public one; after it, the core must have exited 0 and left no
    instance behind. ``setup(topo, host)``: what the core needs first (an LXD cluster in
    that namespace); what it registers with ``topo.at_close`` runs after the core stopped."""
    assert os.geteuid() == 0, "the core tests need root (namespaces, cgroups, XDP)"
    subprocess.run(["rm", "-rf", str(state)])
    core = project["core"]
    pub, priv, gateway = (core["public"]["bridge"], core["private"]["bridge"],
                          core["private"]["gateway"])
    cfg, err = state.parent / f"{state.name}.yaml", state.parent / f"{state.name}.err"
    with Topology(prefix=prefix) as topo:
        host = topo.add_ns("host")
        state.mkdir(parents=True, exist_ok=True)
        cfg.write_text(yaml.safe_dump(project))
        if setup is not None:
            setup(topo, host)
        proc = start_core(topo, host, cfg, state, err, priv)
        for i, ip in enumerate(backends, 1):
            ns = plug(topo, host, f"be{i}", f"bh{i}", priv, [f"{ip}/24"], gateway)
            topo.popen(ns, [sys.executable, "-m", "zfast.lab.echo", "--name", f"be{i}", "--port", "8080"])
        plug(topo, host, "cli", "ch", pub, [client])
        yield Core(state, topo, proc, topo.ns("cli"), err)
    assert proc.returncode == 0, err.read_text()[-2000:]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"zfc-{project['project']}" not in left, f"instances left behind: {left}"


def stop_core(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_core(topo, host: str, cfg: Path, state: Path, err: Path, private_bridge: str):
    """`zfast core up` inside namespace `host` (nsenter: `ip netns exec` would give it a
    mount namespace in which `ip netns add` of its instances fails); returns once it has
    made its bridges."""
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{host}", sys.executable, "-m", "zfast.cli",
         "core", "up", "-c", str(cfg), "--state-dir", str(state)],
        stdout=subprocess.DEVNULL, stderr=open(err, "wb"))
    topo.at_close(lambda: stop_core(proc))
    end = time.monotonic() + 30
    while subprocess.run(["ip", "-n", host, "link", "show", private_bridge],
                         capture_output=True).returncode != 0:
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < end, "the core made no bridges"
        time.sleep(0.2)
    return proc


def plug(topo, host: str, name: str, hostif: str, bridge: str, addresses: list[str],
         gateway: str | None = None) -> str:
    """A namespace on one of the core's bridges (a backend, a client), its link as
    `ip link add` makes it: TX checksum offload on, GRO off."""
    ns = topo.add_ns(name)
    topo.veth(ns, "eth0", host, hostif, addresses, [])
    topo.attach_to_bridge(host, hostif, bridge)
    if gateway:
        topo.route(ns, "default", gateway)
    return ns
