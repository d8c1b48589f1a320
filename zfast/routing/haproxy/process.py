"""The haproxy master process of one workdir: started in master-worker mode, reloaded
hitlessly through the master CLI (the master passes the listening sockets to the new
worker: no connection is refused; old workers finish what they hold), stopped with every
worker, old ones too."""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

from zfast.routing.haproxy.errors import HAProxyError
from zfast.routing.haproxy.files import Workdir, write_atomic
from zfast.routing.haproxy.runtime import MasterCLI, WorkerAPI

log = logging.getLogger("zfast.routing.haproxy")


class MasterProcess:
    """One haproxy master and its workers, on the files of `workdir`. Not thread-safe:
    HAProxy calls it under its lock."""

    def __init__(self, workdir: Workdir, api: WorkerAPI, master: MasterCLI, ports: set[int],
                 haproxy_bin: str = "haproxy", netns: str | None = None, start_timeout: float = 10.0):
        self.workdir = workdir
        self.api = api
        self.master = master
        self.ports = ports                      # serving once all of these listen
        self.haproxy_bin = haproxy_bin
        self.netns = netns
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def binary(self) -> str:
        path = shutil.which(self.haproxy_bin)
        if not path:
            raise HAProxyError(f"haproxy binary {self.haproxy_bin!r} not found")
        return path

    def check_config(self) -> None:
        """`haproxy -c` on the written files; HAProxyError with haproxy's message if refused."""
        try:
            p = subprocess.run([self.binary(), "-c", "-f", str(self.workdir.cfg)],
                               capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise HAProxyError("haproxy -c did not finish in 30 s") from None
        if p.returncode != 0:
            raise HAProxyError(f"haproxy refused the configuration: {alerts(p.stdout + p.stderr)}")

    # ---- start, stop

    def start(self) -> None:
        """Start haproxy on the written files and wait until the runtime API answers and the
        ports listen; stopped again (and HAProxyError with its message) when it does not."""
        w = self.workdir
        self._kill_stale()
        w.pidfile.unlink(missing_ok=True)
        write_atomic(w.state_file, "1\n")   # no server states from an earlier run (format 1)
        argv = [self.binary(), "-W", "-S", f"{w.master_sock},mode,600",
                "-f", str(w.cfg), "-p", str(w.pidfile)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        logf = open(w.logfile, "ab")
        try:
            log_start = logf.tell()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, start_new_session=True)
        finally:
            logf.close()
        try:
            self._wait_started(log_start)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, log_start: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise HAProxyError(f"haproxy exited at start (code {self.proc.returncode}): "
                                   f"{alerts(self.log_since(log_start))}")
            # The master CLI starts answering a little after the worker's API does.
            wpid = self.api.answering_pid()
            if wpid and wpid == self.master.worker_pid() and self.ports <= listening_ports(self.proc.pid):
                return
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy not serving after {self.start_timeout}s: "
                                   f"{alerts(self.log_since(log_start))}")
            time.sleep(0.02)

    def _kill_stale(self) -> None:
        """A haproxy left running on this workdir by an earlier daemon holds the ports: stop it."""
        try:
            pid = int(self.workdir.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if not any(b"haproxy" in a for a in cmdline[:1]) or str(self.workdir.cfg).encode() not in cmdline:
            return
        log.warning("stopping a stale haproxy (pid %d) of %s", pid, self.workdir.path)
        terminate_group(pid, None, 5.0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pid(self) -> int | None:
        """The master's pid (None when not running)."""
        return self.proc.pid if self.alive() else None

    def exit_status(self) -> int | None:
        """The master's exit status once it died (None while it runs, or once stopped)."""
        return self.proc.returncode if self.proc is not None else None

    def stop(self, drain: float = 0.0, timeout: float = 5.0) -> None:
        """Stop haproxy (master and workers, old ones too). Idempotent. With drain > 0,
        a soft stop first: no new connections, those running get up to `drain` seconds."""
        p, self.proc = self.proc, None
        if p is None:
            return
        if drain > 0 and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGUSR1)
                p.wait(drain)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        terminate_group(p.pid, p, timeout)

    # ---- reload

    def reload(self) -> float:
        """Hitless reload from the (checked) files; returns the seconds it took, once the
        new worker alone answers the runtime API."""
        self._save_server_state()
        t0 = time.monotonic()
        before = self.master.show_proc()
        log_start = self.workdir.logfile.stat().st_size
        self.master.reload()
        deadline = t0 + self.start_timeout
        while True:
            if not self.alive():
                raise HAProxyError(f"haproxy exited during reload: {alerts(self.log_since(log_start))}")
            try:
                now = self.master.show_proc()
            except HAProxyError:
                now = None          # master re-executing
            if now is not None:
                if now["failed"] > before["failed"]:
                    raise HAProxyError(f"reload failed, the old worker keeps serving: "
                                       f"{alerts(self.log_since(log_start))}")
                new = [w for w in now["workers"] if w not in before["workers"]]
                # The old worker shares the API socket until its soft stop: wait for it,
                # so that runtime commands from now on reach the new worker only.
                if (new and self.master.stopping(before["workers"])
                        and self.api.answering_pid() == new[0]):
                    break
            if time.monotonic() > deadline:
                raise HAProxyError(f"no new worker after {self.start_timeout}s: "
                                   f"{alerts(self.log_since(log_start))}")
            time.sleep(0.01)
        return time.monotonic() - t0

    def _save_server_state(self) -> None:
        try:
            write_atomic(self.workdir.state_file, self.api.send("show servers state"))
        except OSError as e:
            log.warning("could not save server state before reload: %s", e)

    def log_since(self, offset: int) -> str:
        """haproxy's log (its stderr) from byte `offset` on."""
        try:
            with open(self.workdir.logfile, "rb") as f:
                f.seek(offset)
                return f.read(200_000).decode(errors="replace")
        except OSError:
            return ""


def alerts(text: str, limit: int = 2000) -> str:
    """haproxy's own error lines ([ALERT], without the pid prefix), else its last lines."""
    lines = [re.sub(r"^\[ALERT\]\s+\(\d+\) : ", "", ln.strip())
             for ln in text.splitlines() if "[ALERT]" in ln]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines()[-10:] if ln.strip()]
    out = "; ".join(lines) or "(no message)"
    return out[-limit:]


def fit_maxconn(wanted: int) -> int:
    """haproxy needs about two descriptors a connection and refuses to start when it
    cannot raise its limit that far: stay under the hard limit it may raise to."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return wanted
    fit = max(100, (hard - 200) // 2)
    if fit < wanted:
        log.info("maxconn %d lowered to %d (open files hard limit %d)", wanted, fit, hard)
    return min(wanted, fit)


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process pid."""
    ports = set()
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f, None)
                for ln in f:
                    parts = ln.split()
                    if len(parts) > 3 and parts[3] == "0A":
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def group_alive(pgid: int) -> bool:
    """Is a process of group pgid still running? Zombies (exited, not yet reaped by a
    parent that is not us) do not count."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()     # state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def terminate_group(pid: int, proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the master (it stops every worker, old ones too), SIGKILL the process group
    after `timeout`; wait until no process of the group is left."""
    if proc is None or proc.poll() is None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not group_alive(pid) and (proc is None or proc.returncode is not None):
            return
        time.sleep(0.02)
    log.warning("haproxy (pid %d) still running %.0f s after SIGTERM: SIGKILL", pid, timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
