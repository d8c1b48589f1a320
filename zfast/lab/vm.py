"""`./run.sh vmtest`: Debian 12's kernel in a VM (virtme-ng over qemu), the packet fixtures
against it and a node on two virtio-net NICs in native XDP mode, with TCP and UDP from
namespaces on the host through the VIP.

    python -m zfast.lab.vm [--accel auto|kvm|tcg] [--tests PATH ...] [--all-loads]

KVM where a guest runs on it (a short boot with a timeout says), else qemu's emulation (TCG);
the output says which and why. zfast.lab.vmsetup installs what is missing, zfast.lab.vmnet
wires the host side, zfast.lab.vmguest runs inside the guest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zfast.lab import vmnet, vmsetup
from zfast.lab.netns import Topology

CACHE = Path("/var/cache/zfast-vm")    # the guests' program cache: kept across boots
PROBE_TIMEOUT_S = 60.0
START = time.monotonic()


def say(msg: str) -> None:
    print(f"[vmtest +{time.monotonic() - START:5.0f} s] {msg}", flush=True)


@dataclass(frozen=True)
class Accel:
    name: str           # "kvm" | "tcg"
    why: str


def vng_argv(vng: Path, vmlinuz: Path, accel: str, command: str, *, cpus: int = 2,
             memory: str = "3G", rwdirs: tuple[Path, ...] = (), qemu_opts: tuple[str, ...] = (),
             cwd: Path | None = None) -> list[str]:
    """The vng command line booting vmlinuz over the host's root filesystem (read-only; rwdirs
    writable at the same paths) to run command; accel kvm or tcg (--disable-kvm)."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel {accel!r}: kvm or tcg")
    argv = [str(vng), "--run", str(vmlinuz), "--cpus", str(cpus), "--memory", memory]
    if accel == "tcg":
        argv.append("--disable-kvm")
    for d in rwdirs:
        argv.append(f"--rwdir={d}")
    if cwd is not None:
        argv += ["--cwd", str(cwd)]
    if qemu_opts:
        argv.append("--qemu-opts=" + " ".join(qemu_opts))
    argv += ["--exec", command]
    return argv


def decide_accel(requested: str, kvm_present: bool, probe: tuple[int | None, float, str] | None
                 ) -> Accel:
    """KVM or TCG. probe: (exit code, or None when it timed out; seconds; the last line it
    printed) of a short KVM boot, None when none was made."""
    if requested == "tcg":
        return Accel("tcg", "--accel tcg")
    if not kvm_present:
        if requested == "kvm":
            raise SystemExit("vmtest: --accel kvm, but /dev/kvm is not there")
        return Accel("tcg", "no /dev/kvm")
    if probe is None:
        return Accel("kvm", "--accel kvm (not probed)")
    rc, seconds, last = probe
    if rc == 0:
        return Accel("kvm", f"a KVM guest booted and ran a command in {seconds:.1f} s")
    why = (f"a KVM guest did not finish booting within {seconds:.0f} s" if rc is None
           else f"the KVM guest failed in {seconds:.1f} s (exit {rc}: {last or 'no output'})")
    if requested == "kvm":
        raise SystemExit(f"vmtest: --accel kvm, but {why}")
    return Accel("tcg", why)


def vng_env() -> dict[str, str]:
    """vng runs virtme-run, from the same bin dir: the venv's must be on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}:{os.environ.get('PATH', '')}"}


def probe_kvm(vng: Path, vmlinuz: Path, timeout: float = PROBE_TIMEOUT_S
              ) -> tuple[int | None, float, str]:
    argv = vng_argv(vng, vmlinuz, "kvm", "true", cpus=1, memory="1G")
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(["nice", "-n", "19", *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=vng_env())
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
        out.seek(0)
        lines = [ln.strip() for ln in out.read().splitlines() if ln.strip()]
    return rc, time.monotonic() - t0, lines[-1] if lines else ""


SUMMARY = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)")


def parse_summary(line: str) -> dict[str, int]:
    """pytest's last line ('== 3 failed, 410 passed, 2 warnings in 9.1s ==') as counts."""
    out = {}
    for n, what in SUMMARY.findall(line):
        what = {"error": "errors", "warning": "warnings"}.get(what, what)
        out[what] = out.get(what, 0) + int(n)
    return out


def fixtures_ok(doc: dict) -> bool:
    counts = parse_summary(doc.get("summary", ""))
    return (doc.get("rc") == 0 and counts.get("passed", 0) > 0
            and not counts.get("failed") and not counts.get("errors"))


def copy_lines(stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def wait_file(path: Path, proc: subprocess.Popen, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.5)
    return False


def run(args) -> int:
    release, vmlinuz, vng = vmsetup.ensure(say)
    say(f"guest kernel: {release} ({vmlinuz})")
    kvm_present = os.path.exists("/dev/kvm")
    probe = None
    if args.accel == "auto" and kvm_present:
        say(f"probing KVM: a short boot, {PROBE_TIMEOUT_S:.0f} s at most ...")
        probe = probe_kvm(vng, vmlinuz)
    accel = decide_accel(args.accel, kvm_present, probe)
    say(f"accelerator: {accel.name.upper()} ({accel.why})"
        + ("; emulation is ~20x slower, a compile takes minutes" if accel.name == "tcg" else ""))

    repo = Path(__file__).resolve().parents[2]
    CACHE.mkdir(mode=0o700, parents=True, exist_ok=True)
    entries = sorted(CACHE.glob("*.zfc"))
    say(f"program cache for the guest: {CACHE} ({len(entries)} entries)")
    xchg = Path(tempfile.mkdtemp(prefix="zfvm-", dir="/run"))
    timeline = {}
    report: list[str] = []     # what the summary repeats: XDP modes, counts
    rc = 1
    with Topology(prefix="zfvm") as topo:
        net = vmnet.build(topo, xchg, queues=args.queues, pktgen=args.pktgen)
        guest_cmd = " ".join([sys.executable, "-m", "zfast.lab.vmguest", "--repo", str(repo),
                              "--xchg", str(xchg), "--cache", str(CACHE),
                              *(["--all-loads"] if args.all_loads else []),
                              *(["--pktgen"] if args.pktgen else []),
                              "--tests", *args.tests])
        argv = vng_argv(vng, vmlinuz, accel.name, guest_cmd, cpus=args.cpus, memory=args.memory,
                        rwdirs=(CACHE, xchg), qemu_opts=tuple(vmnet.nic_opts(args.queues, args.pktgen)),
                        cwd=repo)
        say(f"booting the guest ({args.cpus} vCPUs, {args.memory}, 2 virtio-net NICs on taps "
            f"in {net.wire}) ...")
        t0 = time.monotonic()
        proc = subprocess.Popen(["nice", "-n", "19", "nsenter", f"--net=/run/netns/{net.wire}",
                                 *argv], stdin=subprocess.DEVNULL, start_new_session=True,
                                env=vng_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        # through a pipe of ours: qemu reopens its stdout (/proc/self/fd/1), which would
        # truncate a file the caller redirected it to
        relay = threading.Thread(target=copy_lines, args=(proc.stdout,), daemon=True)
        relay.start()
        try:
            rc = drive(args, net, xchg, proc, timeline, report, t0)
        finally:
            if proc.poll() is None:
                (xchg / "go").touch()
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
        relay.join(10)
        timeline["guest_total_s"] = round(time.monotonic() - t0, 1)
    guest_rc = proc.returncode
    fx = json.loads((xchg / "fixtures.json").read_text()) if (xchg / "fixtures.json").exists() \
        else {"rc": None, "summary": "(the guest wrote no fixtures result)"}
    say("=" * 60)
    say(f"accelerator: {accel.name.upper()} ({accel.why})")
    say(f"guest kernel: {release}")
    say(f"fixtures ({' '.join(args.tests)}): {fx['summary']}")
    for line in report:
        say(line)
    for k, v in timeline.items():
        say(f"time: {k} {v}")
    if not fixtures_ok(fx):
        say("FAIL: the packet fixtures did not pass in the guest")
        rc = 1
    if guest_rc != 0:
        say(f"FAIL: the guest's command exited with {guest_rc}")
        rc = 1
    shutil.rmtree(xchg, ignore_errors=True)
    say("vmtest: " + ("PASSED" if rc == 0 else "FAILED"))
    return rc


def drive(args, net: vmnet.HostNet, xchg: Path, proc, timeline: dict, report: list[str],
          t0: float) -> int:
    """The host's part while the guest runs: wait for its node, send the traffic, check."""
    if wait_file(xchg / "booted.json", proc, args.timeout):
        timeline["boot_s"] = round(time.monotonic() - t0, 1)
        timeline["guest_uptime_at_start_s"] = json.loads(
            (xchg / "booted.json").read_text())["uptime_s"]
    if not wait_file(xchg / "fixtures.json", proc, args.timeout):
        say("the guest ended (or timed out) before the fixtures finished")
        return 1
    timeline["boot_and_fixtures_s"] = round(time.monotonic() - t0, 1)
    fx = json.loads((xchg / "fixtures.json").read_text())
    timeline["fixtures_s"] = fx.get("seconds")
    say(f"fixtures: {fx['summary']} (program cache: {fx.get('cache_entries_before')} entries "
        f"before, {fx.get('compiled')} compiled by this run)")
    report.append(f"fixtures' compiles this run: {fx.get('compiled')}")
    t1 = time.monotonic()
    if not wait_file(xchg / "ready.json", proc, args.timeout):
        say("the guest's node never answered")
        return 1
    ready = json.loads((xchg / "ready.json").read_text())
    if "error" in ready:
        say(f"the guest's node failed: {ready['error']}")
        return 1
    timeline["node_up_s"] = round(time.monotonic() - t1, 1)
    timeline["node_program"] = ready.get("program")
    rc = 0
    modes = []
    for i in ready["interfaces"]:
        modes.append(i["xdp"])
        say(f"guest NIC {i['ifname']} ({i['role']}, driver {i['driver']}): XDP mode {i['xdp']}"
            f" — {i['why']}")
        report.append(f"XDP on {i['ifname']} ({i['role']}, {i['driver']}): {i['xdp']}")
        if i.get("kernel_says"):
            say(f"guest kernel on {i['ifname']}: {i['kernel_says']}")
    if any(m != "native" for m in modes):
        say("FAIL: not native XDP on every virtio-net NIC")
        rc = 1
    t2 = time.monotonic()
    try:
        waited = vmnet.wait_vip(net.client, 120)
    except TimeoutError as err:
        say(f"FAIL: {err}")
        report.append(f"FAIL: {err}")
        return 1
    say(f"the VIP answers (after {waited:.1f} s); sending {args.tcp} TCP connections and "
        f"{args.udp} UDP datagrams from {net.client} ...")
    result = vmnet.drive(net, args.tcp, args.udp)
    timeline["traffic_s"] = round(time.monotonic() - t2, 1)
    before_pktgen = net.received()
    (xchg / "go").touch()
    for be, c in result["received"].items():
        say(f"received at {be}: {c['tcp']} TCP connections, {c['udp']} UDP datagrams")
    report.append(f"traffic through the VIP: sent {result['sent']}, answered "
                  f"{result['answered']}, received " + ", ".join(
                      f"{be} {c['tcp']} TCP + {c['udp']} UDP"
                      for be, c in result["received"].items()))
    say(f"answered at the client: {result['answered']}")
    problems = vmnet.verdict(result)
    for p in problems:
        say(f"FAIL: {p}")
        report.append(f"FAIL: {p}")
    if wait_file(xchg / "node.json", proc, 300 if args.pktgen else 120):
        if args.pktgen:
            problems += pktgen_check(xchg, net, before_pktgen, report)
        node = json.loads((xchg / "node.json").read_text())
        say("zfast stats (guest), services: " + json.dumps(node["stats"].get("services")))
        for i in node["interfaces"]:
            say(f"after the traffic, {i['ifname']}: XDP mode {i['xdp']}")
    return 1 if problems else rc


def pktgen_verdict(sent: int | None, zfast: dict[str, int], received: dict[str, int],
                   backends: list[str]) -> list[str]:
    """What is wrong with a pktgen run: zfast's count of the service must be pktgen's, each
    backend's count zfast's for it."""
    if sent is None:
        return ["pktgen: no count of what it sent"]
    problems = []
    if zfast.get("app") != sent:
        problems.append(f"pktgen: sent {sent}, zfast stats counted {zfast.get('app')}")
    for i, addr in enumerate(backends):
        name = f"be{i + 1}"
        if received.get(name) != zfast.get(addr):
            problems.append(f"pktgen: zfast sent {zfast.get(addr)} to {name}, it received "
                            f"{received.get(name)}")
    return problems


def pktgen_check(xchg: Path, net: vmnet.HostNet, before: list[dict], report: list[str]
                 ) -> list[str]:
    pg = json.loads((xchg / "pktgen.json").read_text()) if (xchg / "pktgen.json").exists() \
        else {"sent": None, "zfast": {}, "output": "(the guest wrote no pktgen result)"}
    received = {f"be{i + 1}": a["udp"] - b["udp"]
                for i, (a, b) in enumerate(zip(net.received(), before))}
    report.append(f"pktgen: {pg['output']}; zfast stats: {pg['zfast']}; received {received}")
    problems = pktgen_verdict(pg["sent"], pg["zfast"], received, vmnet.BACKENDS)
    for p in problems:
        say(f"FAIL: {p}")
        report.append(f"FAIL: {p}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./run.sh vmtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    p.add_argument("--tests", nargs="+", default=["tests/bpf/test_packets.py",
                                                  "tests/bpf/test_layouts.py"],
                   help="what pytest runs in the guest (default: the packet fixtures)")
    p.add_argument("--all-loads", action="store_true",
                   help="the fixtures against BCC's compiled load too (a compile each run)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", default="3G")
    p.add_argument("--queues", type=int, default=1, help="queue pairs of each virtio-net NIC")
    p.add_argument("--pktgen", action="store_true",
                   help="then the guest's pktgen through the VIP, counts against zfast stats")
    p.add_argument("--tcp", type=int, default=50)
    p.add_argument("--udp", type=int, default=200)
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds each guest step may take (emulated compiles are slow)")
    args = p.parse_args(argv)
    try:
        return run(args)
    except vmsetup.SetupError as err:
        print(f"vmtest: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
