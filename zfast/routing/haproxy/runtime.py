"""haproxy's CLI sockets: the workers' runtime API (api.sock) and the master CLI
(master.sock), one command a connection.

What the runtime API changes lives in the running process only; the caller writes the
files first (instance.py), so a reload finds the same state.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Iterable

from zfast.routing.haproxy.errors import HAProxyError

# The CLI takes at most tune.bufsize (16 kB) per command, payload included: add map
# entries in chunks well below it; a larger certificate goes through a reload.
MAP_CHUNK = 8000
CLI_MAX = 15000


class RuntimeAPI:
    """A client of a haproxy CLI socket (stats socket or master CLI): one command a
    connection, the answer read to the end."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = str(path)
        self.timeout = timeout

    def send(self, cmd: str, payload: str | None = None, timeout: float | None = None) -> str:
        """Send one command (with an optional multi-line payload) and return the answer.
        Raises OSError when the socket does not answer."""
        if "\n" in cmd:
            raise ValueError("one command line only")
        if payload is not None:
            lines = [ln for ln in payload.splitlines() if ln.strip()]
            data = f"{cmd} <<\n" + "".join(ln + "\n" for ln in lines) + "\n"
        else:
            data = cmd + "\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout or self.timeout)
            s.connect(self.path)
            s.sendall(data.encode())
            s.shutdown(socket.SHUT_WR)       # the master CLI answers at the end of input
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        return b"".join(chunks).decode(errors="replace")


def send(path: str | os.PathLike, cmd: str, payload: str | None = None, timeout: float = 5.0) -> str:
    """One command to a haproxy CLI socket; see RuntimeAPI.send."""
    return RuntimeAPI(path, timeout).send(cmd, payload)


class WorkerAPI(RuntimeAPI):
    """The runtime API of the workers (level admin): state, counters, and the changes
    update() makes without a reload (maps, certificates)."""

    def command(self, cmd: str, payload: str | None = None, expect: str | None = None,
                empty_ok: bool = False) -> str:
        """Send cmd; HAProxyError unless the answer holds `expect` (or is empty, with empty_ok)."""
        if payload is not None and len(cmd) + len(payload) > CLI_MAX:
            raise HAProxyError(f"{cmd}: payload of {len(payload)} bytes too large for the CLI")
        try:
            out = self.send(cmd, payload)
        except OSError as e:
            raise HAProxyError(f"runtime API ({cmd}): {e}") from None
        text = out.strip()
        if (expect is not None and expect in out) or (empty_ok and not text):
            return out
        raise HAProxyError(f"runtime API refused {cmd!r}: {text[:500]}")

    def answering_pid(self) -> int | None:
        """The pid of the worker that answers on the socket (None: no answer). During a
        reload the old worker shares the socket until its soft stop."""
        try:
            info = self.send("show info", timeout=1.0)
        except OSError:
            return None
        m = re.search(r"^Pid: (\d+)$", info, re.M)
        return int(m.group(1)) if m else None

    def stats(self) -> list[dict]:
        """`show stat`, parsed: one dict a frontend/backend/server (see parse_stat_csv)."""
        try:
            return parse_stat_csv(self.send("show stat"))
        except OSError as e:
            raise HAProxyError(f"runtime API: {e}") from None

    def swap_map(self, path: Path, entries: list[tuple[str, str]]) -> None:
        """Replace a map's entries atomically: a new version, filled, then committed."""
        out = self.command(f"prepare map {path}", expect="New version created:")
        ver = int(re.search(r"New version created: (\d+)", out).group(1))
        chunks, size = [[]], 0
        for k, v in entries:
            line = f"{k} {v}"
            if chunks[-1] and size + len(line) + 1 > MAP_CHUNK:
                chunks.append([])
                size = 0
            chunks[-1].append(line)
            size += len(line) + 1
        for chunk in chunks:
            if chunk:
                self.command(f"add map @{ver} {path}", "\n".join(chunk), empty_ok=True)
        self.command(f"commit map @{ver} {path}", empty_ok=True)

    def add_cert(self, path: Path, host: str, pem: str, crt_list: Path) -> None:
        """A new certificate (its file `path` written), served for `host` through crt_list."""
        self.command(f"new ssl cert {path}", expect="New empty certificate store")
        self.set_cert(path, pem)
        self.command(f"add ssl crt-list {crt_list}", f"{path} {host}", expect="Success!")

    def set_cert(self, path: Path, pem: str) -> None:
        """Replace a loaded certificate: set + commit, aborted when either fails."""
        try:
            self.command(f"set ssl cert {path}", pem, expect="Transaction ")
            self.command(f"commit ssl cert {path}", expect="Success!")
        except HAProxyError:
            try:
                self.send(f"abort ssl cert {path}")
            except OSError:
                pass
            raise

    def del_cert(self, path: Path, crt_list: Path) -> None:
        self.command(f"del ssl crt-list {crt_list} {path}", expect="deleted in crtlist")
        self.command(f"del ssl cert {path}", expect="deleted!")


class MasterCLI(RuntimeAPI):
    """The master CLI: the processes, and the reload."""

    def show_proc(self) -> dict:
        """`show proc`: {"master": pid, "reloads": n, "failed": n, "workers": [pid],
        "old_workers": [pid]}."""
        try:
            text = self.send("show proc")
        except OSError as e:
            raise HAProxyError(f"master CLI: {e}") from None
        return parse_show_proc(text)

    def worker_pid(self) -> int | None:
        """The current worker's pid."""
        try:
            w = self.show_proc()["workers"]
        except HAProxyError:
            return None
        return w[0] if w else None

    def reload(self) -> None:
        """Ask the master to reload; the answer is not waited for (see process.py)."""
        try:
            self.send("reload", timeout=2.0)
        except OSError:
            pass    # the master closes the connection when it re-executes

    def stopping(self, pids: Iterable[int]) -> bool:
        """Are these workers gone or in their soft stop (listeners closed)?"""
        for pid in pids:
            try:
                info = self.send(f"@!{pid} show info", timeout=1.0)
            except OSError:
                return False
            if "Can't find the target PID" in info:
                continue
            if not re.search(r"^Stopping: 1$", info, re.M):
                return False
        return True


def parse_show_proc(text: str) -> dict:
    """The master's `show proc` answer, see MasterCLI.show_proc."""
    out = {"master": None, "reloads": 0, "failed": 0, "workers": [], "old_workers": []}
    section = None
    for ln in text.splitlines():
        if ln.startswith("# workers"):
            section = "workers"
        elif ln.startswith("# old workers"):
            section = "old_workers"
        elif ln.startswith("#"):
            section = None if not ln.startswith("#<PID>") else section
        else:
            f = ln.split()
            if len(f) >= 3 and f[0].isdigit():
                if f[1] == "master":
                    out["master"] = int(f[0])
                    out["reloads"] = int(f[2]) if f[2].isdigit() else 0
                    m = re.search(r"failed: (\d+)", ln)
                    out["failed"] = int(m.group(1)) if m else 0
                elif section and f[1] == "worker":
                    out[section].append(int(f[0]))
    if out["master"] is None:
        raise HAProxyError(f"unexpected show proc answer: {text[:300]!r}")
    return out


def parse_stat_csv(text: str) -> list[dict]:
    """`show stat` CSV -> one dict a frontend/backend/server, with the main counters."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected show stat answer: {text[:200]!r}")
    cols = lines[0][2:].split(",")
    kinds = {"0": "frontend", "1": "backend", "2": "server", "3": "listener"}

    def num(v: str) -> int:
        return int(v) if v.isdigit() else 0

    out = []
    for ln in lines[1:]:
        row = dict(zip(cols, ln.split(",")))
        kind = kinds.get(row.get("type", ""), row.get("type", ""))
        requests = row.get("req_tot", "")
        out.append({
            "proxy": row.get("pxname", ""),
            "name": row.get("svname", ""),
            "type": kind,
            "status": row.get("status", ""),
            "sessions": num(row.get("stot", "")),
            "current_sessions": num(row.get("scur", "")),
            "requests": num(requests) if requests else num(row.get("stot", "")),
            "bytes_in": num(row.get("bin", "")),
            "bytes_out": num(row.get("bout", "")),
            # "* L7OK": a check is running right now, L7OK was the last result
            "check_status": row.get("check_status", "").removeprefix("* "),
            "check_desc": row.get("last_chk", ""),
            "address": row.get("addr", ""),
            "responses_5xx": num(row.get("hrsp_5xx", "")),
            "raw": row,
        })
    return out
