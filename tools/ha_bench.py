#!/usr/bin/env python3
"""Failover benchmark: zfast's pair against keepalived + conntrackd, in the same topology.

One command builds the pair lab of zfast/lab/topology.py (build_pair) once per method and round

    client ns ── pubsw ──┬── lb-a pub0 ── lb-a priv0 ──┬── privsw ── 3 backends (echo servers)
    10.0.0.100           └── lb-b pub0 ── lb-b priv0 ──┘   10.1.0.2-4, gateway 10.1.0.1
                             lb-a sync0 10.203.0.1 ═══ lb-b sync0 10.203.0.2

and runs on the two balancers (--methods)
  * zfast: `zfast up` on both (XDP data plane, heartbeats every --heartbeat-ms, flow
    replication over the sync link), one row per --heartbeat-ms;
  * kc, keepalived + conntrackd: Linux forwarding with an nftables DNAT of the VIP to the
    backends (`numgen random mod 3`, or --spread jhash), keepalived (VRRPv3, a sync group of
    one instance on pub0 holding 10.0.0.10 / fd00::10 and one on priv0 holding the backends'
    gateway 10.1.0.1 / fd01::1) and conntrackd in FT-FW mode over the sync link, driven by
    keepalived's notify script (conntrack-tools' primary-backup.sh), one row per --advert-int;
  * kc-guard: the same, and nftables drops new TCP packets without SYN (connections that
    conntrack would pick up in mid-stream before `conntrackd -c` has restored them);
  * kc-direct: the same with conntrackd's DisableExternalCache On (states go into the
    standby's kernel table as they arrive: nothing to commit at the takeover);
  * nosync: keepalived alone, without conntrackd: what the state synchronisation is worth.
No masquerading: the backends answer through the gateway address, which moves with the VIP.
Configuration templates: tools/ha_bench/ (keepalived.conf.in, conntrackd.conf.in, notify.sh.in).

Then: --streams long-lived TCP connections through the VIP (zfast.lab.probe.Stream), each pinged
from its own thread every --interval s (random phase), and --udp-flows UDP flows (one source
port each, a datagram every --interval s); the active balancer is killed the same way for
every method (SIGSTOP + SIGKILL of every process in its namespace, then its links down in
one `ip -batch`); and the tool reports the streams that broke (reset, wrong echo, or no
answer for --after s), the surviving streams silent for 200 ms or more (a packet lost and
sent again: Linux's minimum RTO is 200 ms), each surviving stream's longest silence (median
and max over the streams), the takeover time (kill -> the standby owns the VIP: zfast's role
turns active on its API, polled every 5 ms / the VIP appears on keepalived's interface,
netlink), when the client's ARP entry for the VIP and a backend's for the gateway moved to
the standby (the same measure for every method), role changes before the kill (false
failovers) and after the takeover, and the UDP flows that changed backend or died.

    tools/ha_bench.py                         # 3 rounds, every method (~7 min)
    tools/ha_bench.py --rounds 5 --json out.json --markdown out.md
    tools/ha_bench.py --report out.json       # the table again, from the JSON

Needs root, keepalived, conntrackd and conntrack (Debian packages of the same names), and
the zfast data plane (BCC).  Every daemon runs inside the lab's namespaces with its files
in a temporary directory (--keep-logs DIR keeps them).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zfast.lab import topology  # noqa: E402
from zfast.lab.netns import Topology, in_ns  # noqa: E402
from zfast.lab.probe import Stream, tcp_hello  # noqa: E402

TEMPLATES = TOOLS / "ha_bench"
KEEPALIVED_MIN_ADVERT = 0.01      # keepalived 2.2: VRRPv3 adverts from 0.01 s (centiseconds)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fill(template: str, **values) -> str:
    return string.Template((TEMPLATES / template).read_text()).safe_substitute(values)


# ---- the traffic ----------------------------------------------------------------------

@dataclass
class StreamRun:
    stream: Stream
    last_ok: float = 0.0          # monotonic time of the last good echo
    max_gap: float = 0.0          # longest silence since the mark
    ok_after_kill: int = 0
    error: str | None = None
    error_at: float | None = None


@dataclass
class UdpRun:
    sock: socket.socket
    port: int
    sent_at: list[float] = field(default_factory=list)     # by sequence number
    answered_by: dict[int, str] = field(default_factory=dict)  # sequence number -> backend
    last_ok: float = 0.0
    max_gap: float = 0.0


class Traffic:
    """Long-lived TCP streams and UDP flows through the VIP, each on its own thread."""

    def __init__(self, ns: str, n_streams: int, n_udp: int, interval: float):
        self.ns = ns
        self.interval = interval
        self.stop = threading.Event()
        self.kill_at: float | None = None
        self.links_down_at: float | None = None
        self.streams: list[StreamRun] = []
        deadline = time.monotonic() + 20
        while len(self.streams) < n_streams:
            try:
                self.streams.append(StreamRun(Stream(ns, topology.VIP4, topology.TCP_PORT, timeout=15)))
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.udp: list[UdpRun] = []
        for _ in range(n_udp):
            with in_ns(ns):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", 0))
            s.connect((topology.VIP4, topology.UDP_PORT))
            self.udp.append(UdpRun(s, s.getsockname()[1]))
        self.threads = ([threading.Thread(target=self._tcp, args=(r,), daemon=True) for r in self.streams]
                        + [threading.Thread(target=self._udp, args=(u,), daemon=True) for u in self.udp])

    def start(self) -> None:
        now = time.monotonic()
        for r in self.streams:
            r.last_ok = now
        for u in self.udp:
            u.last_ok = now
        for t in self.threads:
            t.start()

    def mark(self) -> None:
        """Forget the silences so far: only those from now on (around the kill) count."""
        for r in self.streams:
            r.max_gap = 0.0
        for u in self.udp:
            u.max_gap = 0.0

    def _tcp(self, r: StreamRun) -> None:
        # a random phase each: streams pinging in step would all lose a packet or none
        self.stop.wait(random.uniform(0, self.interval))
        while not self.stop.is_set():
            ok = r.stream.ping()
            now = time.monotonic()
            if not ok:
                if not self.stop.is_set():
                    r.error, r.error_at = r.stream.error, now
                return
            r.max_gap = max(r.max_gap, now - r.last_ok)
            r.last_ok = now
            if self.kill_at is not None:
                r.ok_after_kill += 1
            self.stop.wait(self.interval)

    def _udp(self, u: UdpRun) -> None:
        self.stop.wait(random.uniform(0, self.interval))
        while not self.stop.is_set():
            sent_at = time.monotonic()
            seq = len(u.sent_at)
            u.sent_at.append(sent_at)
            try:
                u.sock.send(str(seq).encode())
            except OSError:
                pass
            deadline = sent_at + self.interval
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                u.sock.settimeout(left)
                try:
                    data = u.sock.recv(2048)
                except (socket.timeout, OSError):
                    break
                now = time.monotonic()
                backend, _, n = data.decode(errors="replace").partition(" ")
                try:
                    u.answered_by[int(n)] = backend
                except ValueError:
                    continue
                u.max_gap = max(u.max_gap, now - u.last_ok)
                u.last_ok = now
            rest = deadline - time.monotonic()
            if rest > 0:
                self.stop.wait(rest)

    def snapshot(self, now: float) -> dict:
        """Broken streams and silences as they stand at `now` (the end of the window)."""
        broken, gaps, errors = [], [], []
        for r in self.streams:
            silent = now - r.last_ok
            if r.error is not None or r.ok_after_kill == 0:
                broken.append(r)
                errors.append(r.error or f"no answer for {silent:.1f} s after the kill")
            else:
                gaps.append(max(r.max_gap, silent) * 1000)
        udp = None
        if self.udp:
            # datagrams sent from 1 s before the kill to 1 s before the end: the answered ones,
            # and which backend answered the last one before the kill and the last one at all
            lost = sent = moved = dead = 0
            for u in self.udp:
                sent_at, answered = list(u.sent_at), list(u.answered_by.items())  # atomic copies
                seqs = [i for i, t in enumerate(sent_at) if self.kill_at - 1 <= t <= now - 1]
                got = {i for i, _ in answered}
                sent += len(seqs)
                lost += sum(1 for i in seqs if i not in got)
                before = [b for i, b in answered if sent_at[i] < self.kill_at]
                after = [b for i, b in answered if sent_at[i] > now - 1]
                if not after:
                    dead += 1
                elif before and after[-1] != before[-1]:
                    moved += 1
            udp = {"flows": len(self.udp), "sent_around_kill": sent,
                   "lost_around_kill": lost, "moved_backend": moved, "no_answer": dead,
                   "gap_ms_max": round(max(u.max_gap for u in self.udp) * 1000, 1),
                   "gap_ms_median": round(statistics.median(u.max_gap for u in self.udp) * 1000, 1)}
        backends = {}
        for r in self.streams:
            backends[r.stream.backend] = backends.get(r.stream.backend, 0) + 1
        return {"streams": len(self.streams), "broken": len(broken),
                "errors": sorted(set(errors))[:5], "gaps_ms": sorted(round(g, 1) for g in gaps),
                "gap_ms_median": round(statistics.median(gaps), 1) if gaps else None,
                "gap_ms_max": round(max(gaps), 1) if gaps else None,
                "stream_backends": dict(sorted(backends.items())), "udp": udp}

    def close(self) -> None:
        self.stop.set()
        for r in self.streams:
            try:
                r.stream.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            r.stream.close()
        for u in self.udp:
            u.sock.close()
        for t in self.threads:
            t.join(timeout=2)


# ---- watching the takeover --------------------------------------------------------------

class Watch:
    """`ip -n NS monitor OBJECT`: the monotonic time of the first line that matches."""

    def __init__(self, ns: str, obj: str, pattern: str):
        self.pattern = re.compile(pattern)
        self.at: float | None = None
        self.proc = subprocess.Popen(["ip", "-n", ns, "monitor", obj], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.at is None and not line.startswith("Deleted") and self.pattern.search(line):
                self.at = time.monotonic()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class RoleWatch:
    """zfast: the monotonic time at which node i's role reads `role` (API polled every 5 ms)."""

    def __init__(self, P: topology.PairLab, i: int, role: str = "active"):
        self.at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(P, i, role), daemon=True)
        self.thread.start()

    def _poll(self, P, i, role) -> None:
        while not self.stop.is_set():
            if P.role(i) == role:
                self.at = time.monotonic()
                return
            self.stop.wait(0.005)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)


def kill_balancer(topo: Topology, ns: str, traffic: Traffic | None = None) -> tuple[float, float, list[int]]:
    """The balancer dies: SIGSTOP + SIGKILL every process in its namespace, then its links go down.
    Returns (monotonic, wall-clock) time of the first signal and the pids killed."""
    def pids() -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    def dead(pid: int) -> bool:          # gone, or a zombie its parent has not reaped
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
        except OSError:
            return True

    def send(sig, victims):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    victims = pids()
    t_mono, t_wall = time.monotonic(), time.time()
    if traffic is not None:
        traffic.kill_at = t_mono
    # All stopped first, then killed: keepalived's children get SIGTERM when their parent
    # dies (PR_SET_PDEATHSIG) and would shut down cleanly, sending VRRP priority 0 (an
    # immediate handover): a crashed machine sends nothing.
    send(signal.SIGSTOP, victims)
    send(signal.SIGKILL, victims)
    # the links in one command, at once: the kernel (and XDP) forward until they are down
    subprocess.run(["ip", "-n", ns, "-force", "-batch", "-"], input="".join(
        f"link set {ifname} down\n" for ifname in ("pub0", "priv0", "sync0")),
        text=True, capture_output=True)
    if traffic is not None:
        traffic.links_down_at = time.monotonic()
    for _ in range(5):          # anything forked meanwhile (a child respawned by its parent)
        rest = [pid for pid in pids() if not dead(pid)]
        if not rest:
            break
        send(signal.SIGKILL, rest)
        time.sleep(0.01)
    return t_mono, t_wall, victims


def ms(at: float | None, since: float) -> float | None:
    return None if at is None else round((at - since) * 1000, 1)


# ---- the methods ------------------------------------------------------------------------

class ZfastPair:
    def __init__(self, topo: Topology, P: topology.PairLab, heartbeat_ms: int):
        self.topo, self.P = topo, P
        self.label = "zfast (XDP, flow replication)"
        self.interval = f"heartbeat {heartbeat_ms} ms, dead after 3"

    def start(self) -> None:
        self.P.start_node(0)
        self.P.wait_role(0, "active", timeout=30)
        self.P.start_node(1)
        self.P.wait_role(1, "standby", timeout=30)

    def standby_state(self) -> dict:
        st = self.P.api(1).get("/status")
        return {"replicated_flows_installed": st["peer"]["replication"]["receiving"]["installed"]}

    def watch_takeover(self):
        return RoleWatch(self.P, 1, "active")

    def after_kill(self, kill_wall: float) -> dict:
        for node in self.P.nodes[:1]:
            if node.proc is not None:
                node.proc.wait()
                node.proc = None
        return {}

    def health(self) -> dict:
        return {"roles": [self.P.role(0), self.P.role(1)]}

    def ready(self) -> bool:
        return self.P.role(0) == "active" and self.P.role(1) == "standby"

    def role_changes(self) -> list[tuple[float, int, str]]:
        """(wall-clock time, node, new role) of every role change in the nodes' event logs."""
        from zfast import events
        out = []
        for i, node in enumerate(self.P.nodes):
            for e in events.read(node.state_dir):
                if e.get("kind") == "role":
                    out.append((events.parse_time(e["time"]), i, e.get("new")))
        return sorted(out)

    def close(self) -> None:
        pass


class KeepalivedPair:
    """keepalived (VRRPv3) + nftables DNAT (+ conntrackd FT-FW) on the pair lab's balancers."""

    def __init__(self, topo: Topology, P: topology.PairLab, method: "Method", spread: str, workdir: Path):
        self.topo, self.P, self.spread = topo, P, spread
        self.advert, self.sync, self.guard, self.direct = method.advert, method.sync, method.guard, method.direct
        self.workdir = workdir
        self.label = method.label
        advert = self.advert
        self.interval = f"advert_int {advert:g} s (VRRPv3)"
        self.dirs = [workdir / letter for letter in "ab"]
        self.procs: list[subprocess.Popen] = []

    def nft_rules(self) -> str:
        b4 = [topology.backend_addrs(i)[0] for i in range(len(self.P.backends))]
        b6 = [topology.backend_addrs(i)[1] for i in range(len(self.P.backends))]
        n = len(b4)

        def pick(fam: str, proto: str) -> str:
            if self.spread == "random":
                return f"numgen random mod {n}"
            # the same seed on both nodes (without one, each rule draws a random seed): a
            # connection then maps to the same backend on either balancer, state or not
            return f"jhash {fam} saddr . {proto} sport mod {n} seed 0x5a17"

        def m(addrs):
            return "{ " + ", ".join(f"{i} : {a}" for i, a in enumerate(addrs)) + " }"

        # guard: a TCP packet that would start a connection without a SYN (conntrack picking
        # up a connection in mid-stream: nf_conntrack_tcp_loose) is dropped before the NAT
        # chain can send it to a backend of its own choosing; TCP sends it again later.
        guard = ["  chain guard {",
                 "    type filter hook prerouting priority mangle; policy accept;",
                 "    ct state new tcp flags & (fin|syn|rst|ack) != syn drop",
                 "  }"] if self.guard else []
        return "\n".join([
            "table ip zfha {", *guard,
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip daddr {topology.VIP4} tcp dport {topology.TCP_PORT} dnat to {pick('ip', 'tcp')} map {m(b4)} : {topology.TARGET_TCP}",
            f"    ip daddr {topology.VIP4} udp dport {topology.UDP_PORT} dnat to {pick('ip', 'udp')} map {m(b4)} : {topology.TARGET_UDP}",
            "  }",
            "}",
            "table ip6 zfha6 {", *guard,
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip6 daddr {topology.VIP6} tcp dport {topology.TCP_PORT} dnat to {pick('ip6', 'tcp')} map {m(b6)} : {topology.TARGET_TCP}",
            f"    ip6 daddr {topology.VIP6} udp dport {topology.UDP_PORT} dnat to {pick('ip6', 'udp')} map {m(b6)} : {topology.TARGET_UDP}",
            "  }",
            "}",
            ""])

    def _conntrackd(self, i: int, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.topo.run(self.P.nodes[i].ns, ["conntrackd", "-C", str(self.dirs[i] / "conntrackd.conf"),
                                                 *args], capture_output=True, text=True, check=check)

    def start(self) -> None:
        rules = self.nft_rules()
        for i, (node, d) in enumerate(zip(self.P.nodes, self.dirs)):
            d.mkdir(parents=True, exist_ok=True)
            (d / "lb.nft").write_text(rules)
            p = self.topo.run(node.ns, ["nft", "-f", str(d / "lb.nft")], capture_output=True, text=True)
            if p.returncode:
                raise RuntimeError(f"nft -f in {node.ns}: {p.stderr.strip()}")
            (d / "conntrackd.conf").write_text(fill(
                "conntrackd.conf.in", sync_addr=node.sync4, peer_sync_addr=node.peer4, dir=d,
                disable_external_cache="On" if self.direct else "Off"))
            notify = d / "notify.sh"
            notify.write_text(fill("notify.sh.in", conntrackd_conf=d / "conntrackd.conf",
                                   log=d / "notify.log", sync=int(self.sync)))
            notify.chmod(0o755)
            (d / "keepalived.conf").write_text(fill(
                "keepalived.conf.in", node=node.name, notify=notify,
                state="MASTER" if i == 0 else "BACKUP", priority=node.priority,
                advert_int=f"{self.advert:g}"))
            (d / "notify.log").touch()
        if self.sync:
            for i, (node, d) in enumerate(zip(self.P.nodes, self.dirs)):
                self.procs.append(self.topo.popen(node.ns, ["conntrackd", "-C", str(d / "conntrackd.conf")],
                                                  stdout=open(d / "conntrackd.out", "w"),
                                                  stderr=subprocess.STDOUT))
            deadline = time.monotonic() + 10
            for i in range(2):
                while self._conntrackd(i, "-s").returncode != 0:
                    if self.procs[i].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"conntrackd did not start: {(self.dirs[i] / 'conntrackd.out').read_text()}")
                    time.sleep(0.1)
        for i, (node, d) in enumerate(zip(self.P.nodes, self.dirs)):
            self.procs.append(self.topo.popen(node.ns, [
                "keepalived", "--vrrp", "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
                "-f", str(d / "keepalived.conf"), "-p", str(d / "keepalived.pid"),
                "-r", str(d / "vrrp.pid"), "-c", str(d / "checkers.pid")],
                stdout=open(d / "keepalived.out", "w"), stderr=subprocess.STDOUT))
            want = "primary done" if i == 0 else "backup done"
            deadline = time.monotonic() + 20
            while want not in (d / "notify.log").read_text():
                if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"keepalived on {node.name} did not become "
                                       f"{'master' if i == 0 else 'backup'}: "
                                       f"{(d / 'keepalived.out').read_text()[-2000:]}")
                time.sleep(0.05)
        if not self._has_vip(0):
            raise RuntimeError("keepalived master does not hold the VIP")

    def ready(self) -> bool:
        return self._has_vip(0) and not self._has_vip(1)

    def _has_vip(self, i: int) -> bool:
        out = self.topo.run(self.P.nodes[i].ns, ["ip", "-4", "addr", "show", "dev", "pub0"],
                            capture_output=True, text=True).stdout
        return f"inet {topology.VIP4}/" in out

    def transitions(self, i: int) -> list[tuple[float, str]]:
        out = []
        for line in (self.dirs[i] / "notify.log").read_text().splitlines():
            stamp, _, what = line.partition(" ")
            try:
                out.append((float(stamp), what))
            except ValueError:
                pass
        return out

    def standby_state(self) -> dict:
        if not self.sync:
            return {}
        ext = self._conntrackd(1, "-e").stdout

        def kernel(i):
            out = self.topo.run(self.P.nodes[i].ns, ["conntrack", "-L"], capture_output=True, text=True).stdout
            return sum(1 for line in out.splitlines() if f"dst={topology.VIP4}" in line)
        return {"external_cache_entries": sum(1 for line in ext.splitlines() if line.strip()),
                "standby_kernel_entries": kernel(1), "active_kernel_entries": kernel(0)}

    def watch_takeover(self):
        return Watch(self.P.nodes[1].ns, "address", rf"inet {re.escape(topology.VIP4)}/")

    def after_kill(self, kill_wall: float) -> dict:
        # the standby's notify script: when it started and when conntrackd -c returned
        deadline, steps = time.time() + 5, []
        while time.time() < deadline:
            steps = [(t, w) for t, w in self.transitions(1) if t >= kill_wall]
            if any(w == "primary done" for _, w in steps):
                break
            time.sleep(0.05)
        out = {}
        for t, w in steps:
            key = {"primary start": "notify_primary_ms", "committed": "conntrackd_commit_done_ms",
                   "primary done": "notify_done_ms"}.get(w)
            if key and key not in out:
                out[key] = round((t - kill_wall) * 1000, 1)
        failed = [w for _, w in steps if "failed" in w]
        if failed:
            out["notify_failures"] = failed
        return out

    def health(self) -> dict:
        """How many notify steps each node logged (2 each at start: more are flaps)."""
        return {"notify_steps": [len(self.transitions(0)), len(self.transitions(1))]}

    def role_changes(self) -> list[tuple[float, int, str]]:
        """(wall-clock time, node, new role) of every transition the notify script logged."""
        names = {"primary": "active", "backup": "standby", "fault": "fault"}
        out = []
        for i in range(2):
            for t, what in self.transitions(i):
                if what.endswith(" start"):
                    out.append((t, i, names.get(what.split()[0], what)))
        return sorted(out)

    def close(self) -> None:
        for p in self.procs:
            Topology._stop(p)


# ---- one round of one method ------------------------------------------------------------

@dataclass
class Method:
    key: str
    kind: str                 # zfast | keepalived
    label: str = ""
    advert: float = 0.0       # keepalived's advert_int, s
    heartbeat_ms: int = 50    # zfast's heartbeat
    sync: bool = True         # conntrackd
    guard: bool = False       # nftables drops TCP packets that would start a connection without SYN
    direct: bool = False      # conntrackd DisableExternalCache On


VARIANTS = {
    # key: (label, sync, guard, direct)
    "kc": ("keepalived + conntrackd (primary-backup.sh)", True, False, False),
    "kc-guard": ("keepalived + conntrackd, non-SYN new TCP dropped", True, True, False),
    "kc-direct": ("keepalived + conntrackd, DisableExternalCache", True, False, True),
    "nosync": ("keepalived alone (no state sync)", False, False, False),
}


def run_one(method: Method, args, keep_dir: Path | None, tag: str) -> dict:
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="zfha-"))
    result: dict = {"method": method.key}
    with Topology("zfha") as topo:
        P = topology.build_pair(topo, 3, heartbeat_ms=method.heartbeat_ms, name="hab")
        P.start_servers()
        if method.kind == "zfast":
            pair = ZfastPair(topo, P, method.heartbeat_ms)
        else:
            pair = KeepalivedPair(topo, P, method, args.spread, workdir)
        result["label"], result["interval"] = pair.label, pair.interval
        result["spread"] = args.spread if method.kind == "keepalived" else None
        traffic = watches = None
        try:
            pair.start()
            deadline = time.monotonic() + 20
            while True:
                try:
                    with in_ns(P.client):
                        tcp_hello(topology.VIP4, topology.TCP_PORT, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            try:
                with in_ns(P.client):
                    tcp_hello(topology.VIP6, topology.TCP_PORT, timeout=2)
                result["ipv6_vip_ok"] = True
            except OSError as err:
                result["ipv6_vip_ok"] = f"{type(err).__name__}: {err}"
            traffic = Traffic(P.client, args.streams, args.udp_flows, args.interval)
            traffic.start()
            t_traffic_wall = time.time()
            time.sleep(args.settle)
            deadline = time.monotonic() + 10
            while not pair.ready():       # node a active, b standby: what the kill tests
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pair is not active/standby before the kill: {pair.health()}")
                time.sleep(0.05)
            result["health_before_kill"] = pair.health()
            result["standby_state_before_kill"] = pair.standby_state()
            mac_b_pub = topo.mac(P.nodes[1].ns, "pub0")
            mac_b_priv = topo.mac(P.nodes[1].ns, "priv0")
            watches = {
                "takeover": pair.watch_takeover(),
                "client_arp": Watch(P.client, "neigh",
                                    rf"^{re.escape(topology.VIP4)} .*lladdr {re.escape(mac_b_pub)}"),
                "backend_arp": Watch(P.backends[0], "neigh",
                                     rf"^{re.escape(topology.GATEWAY4)} .*lladdr {re.escape(mac_b_priv)}"),
            }
            time.sleep(0.2)
            traffic.mark()
            t_kill, t_kill_wall, victims = kill_balancer(topo, P.nodes[0].ns, traffic)
            result["killed_processes"] = len(victims)
            result["links_down_ms"] = ms(traffic.links_down_at, t_kill)
            result.update(pair.after_kill(t_kill_wall))
            end = t_kill + args.after
            while time.monotonic() < end:
                time.sleep(0.05)
            result.update(traffic.snapshot(time.monotonic()))
            result["takeover_ms"] = ms(watches["takeover"].at, t_kill)
            # role changes while the traffic ran: before the kill there should be none (a standby
            # that takes over by itself is a false failover); after it, one (node b -> active)
            changes = [(round((t - t_kill_wall) * 1000, 1), "ab"[i], role)
                       for t, i, role in pair.role_changes() if t >= t_traffic_wall]
            result["role_changes_before_kill"] = [c for c in changes if c[0] < 0]
            result["false_takeover"] = any((node == "b" and role == "active") or (node == "a" and role != "active")
                                           for _, node, role in result["role_changes_before_kill"])
            after = [c for c in changes if c[0] >= 0]
            first = next((n for n, c in enumerate(after) if c[1:] == ("b", "active")), None)
            result["flaps_after_takeover"] = after[first + 1:] if first is not None else after
            result["client_arp_ms"] = ms(watches["client_arp"].at, t_kill)
            result["backend_arp_ms"] = ms(watches["backend_arp"].at, t_kill)
            result["health_after"] = pair.health()
        finally:
            if traffic is not None:
                traffic.close()
            for w in (watches or {}).values():
                w.close()
            pair.close()
            try:
                if keep_dir is not None and method.kind == "keepalived":
                    shutil.copytree(workdir, keep_dir / f"{tag}-{method.key}", dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.ctl", "*.lock"))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.monotonic() - t_start, 1)
    return result


# ---- report -----------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.0f}" if abs(v) >= 10 or v.is_integer() else f"{v:.1f}"
    return f"{v}{unit}"


def summarize(methods: list[Method], rounds: list[list[dict]]) -> list[dict]:
    rows = []
    for m in methods:
        rs = [r for rnd in rounds for r in rnd if r["method"] == m.key]
        if not rs:
            continue
        ok = [r for r in rs if "error" not in r]
        row = {"method": m.key, "label": rs[0].get("label", m.label),
               "interval": rs[0].get("interval", ""), "rounds": len(rs), "failed_rounds": len(rs) - len(ok)}
        if ok:
            row.update({
                "streams": ok[0]["streams"],
                "broken": [r["broken"] for r in ok],
                "broken_median": med([r["broken"] for r in ok]),
                "gap_ms_median": med([r["gap_ms_median"] for r in ok]),
                # a silence of 200 ms or more is a lost packet that TCP sent again (RTO >= 200 ms)
                "retransmitted": [sum(1 for g in r["gaps_ms"] if g >= 200) for r in ok],
                "gap_ms_max": med([r["gap_ms_max"] for r in ok]),
                "gap_ms_max_worst": max((r["gap_ms_max"] for r in ok if r["gap_ms_max"] is not None), default=None),
                # rounds where the standby had taken over before the kill have no takeover time
                "takeover_ms": med([r["takeover_ms"] for r in ok if not r.get("false_takeover")]),
                "takeover_ms_all": [r["takeover_ms"] for r in ok],
                "client_arp_ms": med([r["client_arp_ms"] for r in ok]),
                "backend_arp_ms": med([r["backend_arp_ms"] for r in ok]),
                "commit_done_ms": med([r.get("conntrackd_commit_done_ms") for r in ok]),
                "flaps": [len(r.get("flaps_after_takeover", [])) for r in ok],
                "changes_before": [len(r.get("role_changes_before_kill", [])) for r in ok],
                "false_takeovers": sum(bool(r.get("false_takeover")) for r in ok),
            })
            udp = [r["udp"] for r in ok if r.get("udp")]
            if udp:
                row["udp_flows"] = udp[0]["flows"]
                row["udp_moved"] = [u["moved_backend"] + u["no_answer"] for u in udp]
                row["udp_lost_median"] = med([u["lost_around_kill"] for u in udp])
                row["udp_gap_ms_max"] = med([u["gap_ms_max"] for u in udp])
        rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [
        f"{args.streams} TCP streams pinged every {args.interval * 1000:.0f} ms"
        + (f", {args.udp_flows} UDP flows (a datagram every {args.interval * 1000:.0f} ms)" if args.udp_flows else "")
        + f"; {args.rounds} round(s), medians over the rounds (per-round values in brackets); "
        f"window {args.after:g} s after the kill; DNAT spread for keepalived: {args.spread}",
        "",
        "| method | heartbeat / advert | broken TCP (of N) | surviving streams silent >= 200 ms "
        "| gap median (ms) | gap max (ms) "
        "| takeover (ms) | client ARP moved (ms) | backend ARP moved (ms) "
        "| role changes before kill / after takeover (all rounds) "
        + ("| UDP flows moved or dead | UDP datagrams lost " if args.udp_flows else "") + "|",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.udp_flows else ""),
    ]
    for r in rows:
        if "broken" not in r:
            lines.append(f"| {r['label']} | {r['interval']} | all {r['rounds']} round(s) failed | | | | | | | |"
                         + (" | |" if args.udp_flows else ""))
            continue
        broken = f"{fmt(r['broken_median'])} of {r['streams']} [{', '.join(map(str, r['broken']))}]"
        take = f"{fmt(r['takeover_ms'])} [{', '.join(fmt(t) for t in r['takeover_ms_all'])}]"
        cells = [r["label"], r["interval"], broken,
                 f"{fmt(med(r['retransmitted']))} [{', '.join(map(str, r['retransmitted']))}]",
                 fmt(r["gap_ms_median"]),
                 f"{fmt(r['gap_ms_max'])} (worst {fmt(r['gap_ms_max_worst'])})", take,
                 fmt(r["client_arp_ms"]), fmt(r["backend_arp_ms"]),
                 f"{sum(r['changes_before'])} / {sum(r['flaps'])}"
                 + (f" ({r['false_takeovers']} round(s) with a takeover before the kill)"
                    if r["false_takeovers"] else "")]
        if args.udp_flows:
            cells += [f"{fmt(med(r.get('udp_moved', [])))} of {r.get('udp_flows', '-')} "
                      f"[{', '.join(map(str, r.get('udp_moved', [])))}]", fmt(r.get("udp_lost_median"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------

def machine() -> dict:
    def out(cmd):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            return (p.stdout + p.stderr).strip()
        except OSError:
            return ""
    git = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # uncommitted changes to what runs (zfast/, bpf/): the hash of the diff names them
    diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "zfast", "bpf"],
                          capture_output=True).stdout
    dirty = f"+diff:{hashlib.sha256(diff).hexdigest()[:12]}" if diff else ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "kernel": platform.release(), "nproc": os.cpu_count(),
            "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name")), "?"),
            "keepalived": out(["keepalived", "--version"]).splitlines()[0] if shutil.which("keepalived") else None,
            "conntrackd": out(["conntrackd", "-v"]).splitlines()[0] if shutil.which("conntrackd") else None,
            "git": git + dirty}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=50, help="long-lived TCP streams (default 50)")
    ap.add_argument("--udp-flows", type=int, default=10, help="UDP flows, 0 for none (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every method; medians reported (default 3)")
    ap.add_argument("--interval", type=float, default=0.05, help="ping period per stream / flow, s (default 0.05)")
    ap.add_argument("--settle", type=float, default=2.0, help="traffic before the kill, s (default 2)")
    ap.add_argument("--after", type=float, default=8.0,
                    help="window after the kill, s: a stream silent all that time counts as broken (default 8)")
    ap.add_argument("--heartbeat-ms", default="50,10",
                    help="zfast's heartbeat, ms, comma separated: one row each (default 50 = zfast's "
                         "default, and 10 = its smallest)")
    ap.add_argument("--advert-int", default=f"{KEEPALIVED_MIN_ADVERT:g},0.05",
                    help="keepalived advert intervals, s, comma separated: one row each "
                         f"(default {KEEPALIVED_MIN_ADVERT:g} = keepalived's smallest, and 0.05)")
    ap.add_argument("--spread", choices=["random", "jhash"], default="random",
                    help="how nftables picks a backend for a new connection (default random: numgen)")
    ap.add_argument("--methods", default="zfast,kc,kc-guard,kc-direct,nosync",
                    help="comma separated, of: zfast; kc = keepalived + conntrackd as conntrack-tools "
                         "ships it (primary-backup.sh), one row per --advert-int; kc-guard = the same "
                         "with new TCP packets without SYN dropped; kc-direct = the same with "
                         "DisableExternalCache On; nosync = keepalived alone (the last three at the "
                         "smallest --advert-int) (default all)")
    ap.add_argument("--json", metavar="FILE", help="also write every round's results as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep the keepalived/conntrackd files of every round")
    ap.add_argument("--report", metavar="FILE.json", help="run nothing: print the table of an earlier --json")
    return ap


def methods_from(args) -> list[Method]:
    adverts = [float(a) for a in args.advert_int.split(",") if a.strip()]
    for a in adverts:
        if a < KEEPALIVED_MIN_ADVERT:
            raise SystemExit(f"--advert-int {a:g}: keepalived takes 0.01 s at least (VRRPv3)")
    heartbeats = [int(h) for h in args.heartbeat_ms.split(",") if h.strip()]
    for h in heartbeats:
        if not 10 <= h <= 10_000:
            raise SystemExit(f"--heartbeat-ms {h}: zfast takes 10..10000")
    only = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(only) - {"zfast", *VARIANTS}
    if unknown:
        raise SystemExit(f"--methods: unknown {', '.join(sorted(unknown))}")
    out = []
    for key in only:
        if key == "zfast":
            out += [Method(f"zfast@{hb}ms", "zfast", "zfast (XDP, flow replication)", heartbeat_ms=hb)
                    for hb in heartbeats]
            continue
        label, sync, guard, direct = VARIANTS[key]
        for a in (adverts if key == "kc" else [min(adverts)]):
            out.append(Method(f"{key}@{a:g}", "keepalived", label, advert=a, sync=sync,
                              guard=guard, direct=direct))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        old = argparse.Namespace(**saved["args"])
        print(markdown(summarize(methods_from(old), saved["rounds"]), old))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, XDP, nftables)")
    methods = methods_from(args)
    missing = [b for b in ("keepalived", "conntrackd", "conntrack", "nft", "ip")
               if any(m.kind == "keepalived" for m in methods) and not shutil.which(b)]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install keepalived conntrackd conntrack nftables")
    keep_dir = Path(args.keep_logs) if args.keep_logs else None
    if keep_dir:
        keep_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    log(f"{len(methods)} methods x {args.rounds} rounds; {info['keepalived']}; {info['conntrackd']}")
    rounds: list[list[dict]] = []
    for rnd in range(args.rounds):
        # the methods take turns, in a rotating order: a noisy stretch hits each alike
        order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        this = []
        for m in order:
            log(f"round {rnd + 1}/{args.rounds}: {m.key}")
            try:
                r = run_one(m, args, keep_dir, f"r{rnd + 1}")
            except Exception as err:   # report it and go on with the others
                r = {"method": m.key, "error": f"{type(err).__name__}: {err}"}
                log(f"  FAILED: {r['error']}")
            else:
                log(f"  links down at {r['links_down_ms']} ms; broken {r['broken']}/{r['streams']}, gap median {r['gap_ms_median']} ms "
                    f"max {r['gap_ms_max']} ms, takeover {r['takeover_ms']} ms, client ARP "
                    f"{r['client_arp_ms']} ms, udp {r['udp']}, standby state {r['standby_state_before_kill']}"
                    + (f", commit done {r.get('conntrackd_commit_done_ms')} ms" if m.sync and m.kind == "keepalived" else "")
                    + (f", role changes before the kill: {r['role_changes_before_kill']}" if r["role_changes_before_kill"] else "")
                    + (f", after the takeover: {r['flaps_after_takeover']}" if r["flaps_after_takeover"] else "")
                    + (f"; errors {r['errors']}" if r["errors"] else ""))
            this.append(r)
        rounds.append(this)
    rows = summarize(methods, rounds)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "summary": rows,
                                               "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
