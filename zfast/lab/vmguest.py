"""What the VM tier runs inside the guest (zfast.lab.vm boots it): the packet fixtures against
the guest's kernel, then a node on the two virtio-net NICs in native XDP mode, while the host
sends traffic through the VIP. The host and the guest meet in a shared directory (xchg):

    fixtures.json   the guest: the fixtures' exit code and pytest summary
    ready.json      the guest: the node answers; kernel, NICs and their XDP modes
    go              the host: traffic done, read the stats
    node.json       the guest: `zfast stats` and status after the traffic

The program cache (--cache) is a host directory too: the compile happens once per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from zfast.api import ApiError, Client
from zfast.dataplane.loader import attached_prog
from zfast.lab import vmnet
from zfast.lab.topology import TARGET_TCP, TARGET_UDP, TCP_PORT, UDP_PORT, VIP4

START = time.monotonic()
FIXTURES = ["tests/bpf/test_packets.py", "tests/bpf/test_layouts.py"]
NODE_STATE = Path("/tmp/zfvm-node")


def say(msg: str) -> None:
    print(f"[guest +{time.monotonic() - START:5.0f} s] {msg}", flush=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


class Ticker:
    """A line every `every` seconds while a long step runs, so that a slow compile under
    emulation is seen to be alive."""

    def __init__(self, what: str, every: float = 30.0):
        self.what, self.every = what, every
        self.done = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.done.wait(self.every):
            say(f"  ... {self.what} ({time.monotonic() - self.t0:.0f} s)")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()


def prepare(pktgen: bool) -> dict[str, str]:
    """bpffs, forwarding, the NICs by their MACs: {"pub": ifname, "priv": ifname[, "gen":
    pktgen's]}."""
    for where in ("/sys/fs/bpf", "/run/zfast/bpffs"):
        if sh("mountpoint", "-q", where, check=False).returncode:
            os.makedirs(where, exist_ok=True)
            sh("mount", "-t", "bpf", "bpf", where)
    sh("modprobe", "virtio_net", check=False)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
    links = json.loads(sh("ip", "-j", "link", "show").stdout)
    by_mac = {link.get("address"): link["ifname"] for link in links}
    nics = {}
    for role, (_tap, mac) in vmnet.taps(pktgen).items():
        if mac not in by_mac:
            raise RuntimeError(f"no NIC with MAC {mac} in the guest (links: {sorted(by_mac)})")
        nics[role] = by_mac[mac]
    addrs = {"pub": [f"{vmnet.GUEST_PUB}/24", f"{VIP4}/32"], "priv": [f"{vmnet.GUEST_PRIV}/24"],
             "gen": []}
    if "gen" in nics:
        # the guest's addresses are answered for on their own NIC only: else the client's ARP
        # for the VIP may be answered from pktgen's NIC, which has no XDP (the kernel's RST)
        sh("sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1")
    for role, ifname in nics.items():
        for a in addrs[role]:
            sh("ip", "addr", "replace", a, "dev", ifname)
        sh("ip", "link", "set", ifname, "up")
    return nics


def driver(ifname: str) -> str:
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{ifname}/device/driver"))
    except OSError:
        return "?"


def fixtures(repo: Path, cache: Path, xchg: Path, tests: list[str], all_loads: bool) -> int:
    env = {**os.environ, "ZFAST_TEST_PROGRAM_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    if not all_loads:
        env["ZFAST_TEST_LOADS"] = "cached"
    before = {p.name for p in cache.glob("*.zfc")}
    cached = bool(before)
    say(f"packet fixtures: pytest {' '.join(tests)} ("
        + ("program cache has entries" if cached else "program cache empty: the first load compiles")
        + ")")
    t0 = time.monotonic()
    with Ticker("fixtures running"):
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *tests, "-q", "-ra",
                                 "-p", "no:cacheprovider"], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    summary = next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
    new = sorted({p.name for p in cache.glob("*.zfc")} - before)
    write_json(xchg / "fixtures.json", {"rc": rc, "summary": summary, "seconds":
                                        round(time.monotonic() - t0, 1), "tests": tests,
                                        "cache_entries_before": len(before),
                                        "compiled": len(new)})
    say(f"packet fixtures: exit {rc}, {time.monotonic() - t0:.0f} s")
    return rc


def project(nics: dict[str, str]) -> dict:
    backends = [{"address": a, "weight": 1} for a in vmnet.BACKENDS]
    return {
        "project": "vmtest",
        "node": {"name": "vm", "state_dir": str(NODE_STATE),
                 "interfaces": [{"name": nics["pub"], "role": "public"},
                                {"name": nics["priv"], "role": "private"}],
                 "mode": "native"},
        "datapath": {"flow_table": 65536, "max_services": 8, "max_backends": 64},
        "services": [{"name": "app", "vip": VIP4,
                      "ports": [{"port": TCP_PORT, "proto": "tcp", "target_port": TARGET_TCP},
                                {"port": UDP_PORT, "proto": "udp", "target_port": TARGET_UDP}],
                      "backends": backends}],
    }


def node(nics: dict[str, str], xchg: Path, go_timeout: float, repo: Path) -> int:
    NODE_STATE.mkdir(parents=True, exist_ok=True)
    cfg = NODE_STATE / "project.yaml"
    cfg.write_text(yaml.safe_dump(project(nics), sort_keys=False))
    say(f"node: zfast up on {nics['pub']} (public) and {nics['priv']} (private), mode native")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "zfast.cli", "up", "-c", str(cfg)])
    client = Client(NODE_STATE)
    status = None
    with Ticker("zfast up: loading (a program cache miss compiles)"):
        while proc.poll() is None:
            try:
                status = client.get("/status")
                break
            except ApiError:
                time.sleep(0.5)
    if status is None:
        say(f"node: zfast up exited with {proc.returncode} before it answered")
        write_json(xchg / "ready.json", {"error": f"zfast up exited with {proc.returncode}"})
        return 1
    up_s = time.monotonic() - t0
    interfaces = []
    dmesg = sh("dmesg", check=False).stdout.splitlines()
    for role in ("pub", "priv"):
        ifname = nics[role]
        prog = attached_prog(ifname)
        locked = [ln.strip() for ln in dmesg if f" {ifname}: XDP request" in ln]
        interfaces.append({"role": role, "ifname": ifname, "driver": driver(ifname),
                           "kernel_says": locked[-1] if locked else "",
                           "xdp": prog[1] if prog else None,
                           "why": next((i["why"] for i in status["interfaces"]
                                        if i["name"] == ifname), "")})
    ready = {"kernel": os.uname().release, "up_s": round(up_s, 1),
             "program": status.get("program"), "interfaces": interfaces}
    write_json(xchg / "ready.json", ready)
    for i in interfaces:
        say(f"node: {i['ifname']} ({i['role']}, {i['driver']}): XDP mode {i['xdp']}")
    say(f"node: answering after {up_s:.0f} s (program cache: "
        f"{(status.get('program') or {}).get('cache')}); waiting for the host's traffic")
    deadline = time.monotonic() + go_timeout
    while not (xchg / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    rc = 0
    if "gen" in nics:
        rc = pktgen(client, nics, xchg, repo)
    try:
        stats = client.get("/stats")
    except ApiError as err:
        stats, rc = {"error": str(err)}, 1
    write_json(xchg / "node.json", {"stats": stats, "interfaces": [
        {"ifname": i["ifname"], "xdp": (attached_prog(i["ifname"]) or (0, None))[1]}
        for i in interfaces]})
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    return rc


def service_packets(stats: dict) -> dict[str, int]:
    """{"app": packets, "10.1.0.2": packets, ...} of zfast stats' services and backends."""
    out = {}
    for svc in stats.get("services", []):
        out[svc["name"]] = svc["packets"]
        for be in svc.get("backends", []):
            out[be["address"]] = be["packets"]
    return out


def pktgen(client: Client, nics: dict[str, str], xchg: Path, repo: Path,
           rate: int = 2000, seconds: float = 5.0, flows: int = 64) -> int:
    """The guest kernel's pktgen (tools/trafficgen.py --pktgen) from the third NIC to the public
    NIC's MAC, UDP to the VIP from 64 source ports: what it sent and what zfast counted."""
    before = service_packets(client.get("/stats"))
    say(f"pktgen: {rate} pps for {seconds:.0f} s from {nics['gen']} to the VIP ({flows} flows)")
    res = sh(sys.executable, str(repo / "tools" / "trafficgen.py"), "--pktgen",
             "--dev", nics["gen"], "--dst-mac", vmnet.PUB_MAC, "--src", vmnet.PKTGEN_SRC,
             "--dst", VIP4, "--dport", str(UDP_PORT), "--sport", "20000", "--flows", str(flows),
             "--rate", str(rate), "--duration", str(seconds), "--size", "64", check=False)
    out = (res.stdout + res.stderr).strip()
    say(f"pktgen: {out}")
    sent = None
    for word in out.split("sent ")[1:2]:
        sent = int(word.split()[0])
    time.sleep(2)               # the last frames through the guest and the backends' flush
    after = service_packets(client.get("/stats"))
    doc = {"rc": res.returncode, "output": out, "sent": sent,
           "zfast": {k: after.get(k, 0) - before.get(k, 0) for k in after}}
    write_json(xchg / "pktgen.json", doc)
    say(f"pktgen: zfast stats counted {doc['zfast']}")
    return 1 if res.returncode or sent is None else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zfast.lab.vmguest")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--xchg", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--tests", nargs="+", default=FIXTURES)
    p.add_argument("--all-loads", action="store_true")
    p.add_argument("--go-timeout", type=float, default=600.0)
    p.add_argument("--pktgen", action="store_true", help="after the host's traffic, pktgen's")
    args = p.parse_args(argv)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    write_json(args.xchg / "booted.json", {"uptime_s": uptime})
    say(f"kernel {os.uname().release}, {os.cpu_count()} vCPUs, up {uptime:.1f} s")
    os.environ["ZFAST_CACHE_DIR"] = str(args.cache)
    nics = prepare(args.pktgen)
    rc = fixtures(args.repo, args.cache, args.xchg, args.tests, args.all_loads)
    rc_node = node(nics, args.xchg, args.go_timeout, args.repo)
    return rc or rc_node


if __name__ == "__main__":
    sys.exit(main())
