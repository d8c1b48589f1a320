"""How long `zfast up` takes to forward, and what it holds resident, cold and repeat.

    python tools/starttime.py [--repeats 3] [--json]

In the standard lab (zfast/lab/topology.py), each start is timed from the exec of `zfast up` to
the first UDP datagram through the VIP answered by a backend (the client sends one every
millisecond from before the exec; the answer comes after the backend got the datagram, so
the time is an upper bound). Then the resident memory of the daemon and its child
processes is summed (RSS, so shared pages count once per process: an upper bound too).
Runs, in one lab and one run: no cache (`ZFAST_CACHE_DIR=off`, the start before the
cache), cold (an empty cache: compiles and writes the entry) and repeat starts (hits).
Needs root. tests/e2e/test_fast_start.py holds the product to its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from zfast.api import ApiError, Client  # noqa: E402
from zfast.lab import topology as zlab  # noqa: E402
from zfast.lab.netns import Topology, in_ns  # noqa: E402

SEND_EVERY_S = 0.001


class FirstAnswer:
    """A UDP client in the lab's client namespace: one datagram to the VIP every
    millisecond, until an answer comes back; .at is the monotonic time of that answer."""

    def __init__(self, client_ns: str, vip: str = zlab.VIP4, port: int = zlab.UDP_PORT):
        with in_ns(client_ns):
            self.sock = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET,
                                      socket.SOCK_DGRAM)
        self.sock.settimeout(SEND_EVERY_S)
        self.target = (vip, port)
        self.at: float | None = None
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sock.sendto(b"start %d" % self.sent, self.target)
                self.sent += 1
                self.sock.recvfrom(2048)
            except OSError:        # timeout (nothing forwards yet) or ICMP from the kernel
                continue
            self.at = time.monotonic()
            return

    def __enter__(self) -> "FirstAnswer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def wait(self, deadline: float) -> float | None:
        self._thread.join(max(deadline - time.monotonic(), 0))
        return self.at


def tree_memory_mib(pid: int) -> dict:
    """Resident memory of pid and its descendants, in MiB: "rss" sums each process's RSS
    (a page two of them share counts twice), "pss" their proportional sets (a shared page
    is split between the processes that map it), and how many processes."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    total = {"rss": 0, "pss": 0, "processes": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in rollup:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                total[name.lower()] += int(rest.split()[0])
        total["processes"] += 1
    return {"rss_mib": total["rss"] / 1024, "pss_mib": total["pss"] / 1024,
            "processes": total["processes"]}


def one_start(the_lab: zlab.Lab, cache: str, settle_s: float = 3.0,
              timeout: float = 120.0) -> dict:
    """Start the lab's node with ZFAST_CACHE_DIR=cache, time it, measure it, stop it."""
    the_lab.write_config(the_lab.project())
    env = {**os.environ, "ZFAST_CACHE_DIR": cache}
    deadline = time.monotonic() + timeout
    with FirstAnswer(the_lab.topo.ns(the_lab.client)) as probe:
        t0 = time.monotonic()
        proc = the_lab.topo.popen(the_lab.lb, [sys.executable, "-m", "zfast.cli", "up", "-c",
                                               str(the_lab.config_path)], env=env, cwd=REPO)
        try:
            at = probe.wait(deadline)
            if at is None:
                raise RuntimeError(f"no datagram through the VIP within {timeout:.0f} s "
                                   f"(zfast up: {proc.poll()})")
            client = Client(the_lab.state_dir)
            while True:
                try:
                    status = client.get("/status")
                    break
                except ApiError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"zfast up exited with {proc.returncode}") from None
                    time.sleep(0.05)
            api_s = time.monotonic() - t0
            time.sleep(settle_s)        # a daemon settled in: its sweeper child started
            memory = tree_memory_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"cache": (status.get("program") or {}).get("cache"),
            "first_datagram_s": at - t0, "api_s": api_s, **memory, "sent": probe.sent}


def measure(the_lab: zlab.Lab, repeats: int = 3, settle_s: float = 3.0) -> list[dict]:
    """No cache, cold, then `repeats` hits, in one lab: rows as one_start gives them."""
    with tempfile.TemporaryDirectory(prefix="zfast-starttime-") as tmp:
        rows = [one_start(the_lab, "off", settle_s)]
        rows[0]["run"] = "no cache"
        for i in range(repeats + 1):
            row = one_start(the_lab, tmp, settle_s)
            row["run"] = "cold" if i == 0 else f"repeat {i}"
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with Topology(prefix="zfst") as topo:
        the_lab = zlab.build(topo, 3)
        the_lab.start_servers()
        time.sleep(0.5)
        rows = measure(the_lab, args.repeats)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'start':<10}{'cache':<7}{'first datagram s':>17}{'API s':>8}{'RSS MiB':>9}"
          f"{'PSS MiB':>9}{'procs':>6}")
    for r in rows:
        print(f"{r['run']:<10}{r['cache']:<7}{r['first_datagram_s']:>17.3f}{r['api_s']:>8.2f}"
              f"{r['rss_mib']:>9.0f}{r['pss_mib']:>9.0f}{r['processes']:>6}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
