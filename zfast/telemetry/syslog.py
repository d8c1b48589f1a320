"""Events to syslog, RFC 5424, over UDP (RFC 5426) or a unix datagram socket (/dev/log).

    <PRI>1 TIMESTAMP HOSTNAME zfast PROCID KIND [zfast@32473 node="lb-a" field="value" ...] BOM{json}

PRI is facility (daemon, 3) * 8 + a severity chosen from the kind (error: 3, backend down
and role changes: 5/notice or 4/warning, the rest: 6/info). MSGID is the event's kind,
the structured data element carries the node and every field (strings as they are, other
values as JSON; ``"``, ``\\`` and ``]`` escaped), and MSG is the whole event as JSON
(UTF-8, starting with the BOM as RFC 5424 wants). 32473 is the private enterprise number
RFC 5612 sets aside for documentation; SD-IDs with "@" are free for anyone to define.

Sending never blocks the node: ``send()`` puts the event on a bounded queue that a
background thread drains; a full queue drops its oldest event (counted in ``dropped``),
a socket error drops the event being sent (``errors``) and the thread carries on.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

APP_NAME = "zfast"
SD_ID = "zfast@32473"
FACILITY_DAEMON = 3
BOM = "\ufeff"
MAX_BYTES = 8192       # a datagram above this is shortened (long fields first)
QUEUE_SIZE = 10000
BUSY_WAIT_S = 1.0      # how long one event waits for a receiver that is behind

SEVERITY = {"emerg": 0, "alert": 1, "crit": 2, "error": 3, "warning": 4, "notice": 5,
            "info": 6, "debug": 7}


def severity(event: dict) -> int:
    kind = event.get("kind")
    if kind == "error" or event.get("error"):
        return SEVERITY["error"]
    if kind == "backend" and any(str(event.get(k, "")).lower() in ("down", "unhealthy", "false")
                                 for k in ("state", "health", "healthy", "new", "to", "status")):
        return SEVERITY["warning"]
    if kind in ("role", "failover", "repair", "scale", "firewall"):
        return SEVERITY["notice"]
    return SEVERITY["info"]


@dataclass(frozen=True)
class Target:
    kind: str          # "udp" | "unix"
    host: str = ""
    port: int = 514
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        return f"udp://[{self.host}]:{self.port}" if ":" in self.host else f"udp://{self.host}:{self.port}"


def parse_target(text: str) -> Target:
    """"udp://host[:port]" (port 514 by default; [v6] in brackets) or "unix:///dev/log";
    ValueError says why not."""
    parts = urlsplit(str(text))
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: give unix:///absolute/path (e.g. unix:///dev/log)")
        return Target("unix", path=path)
    if parts.scheme == "udp":
        try:
            port = parts.port or 514
        except ValueError:
            raise ValueError(f"{text!r}: bad port") from None
        if not parts.hostname:
            raise ValueError(f"{text!r}: give udp://host:port (e.g. udp://127.0.0.1:514)")
        return Target("udp", host=parts.hostname, port=port)
    raise ValueError(f"{text!r}: give udp://host:port or unix:///path (tcp is not supported)")


# ---------------------------------------------------------------- RFC 5424

def _printable(text: str, limit: int, nil: str = "-") -> str:
    out = "".join(c for c in str(text) if 33 <= ord(c) <= 126)[:limit]
    return out or nil


def _param_name(name: str) -> str:
    out = "".join(c for c in str(name) if 33 <= ord(c) <= 126 and c not in '= ]"')[:32]
    return out or "_"


def _param_value(value: object, limit: int | None = None) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_event(event: dict, hostname: str | None = None, procid: int | None = None,
                 facility: int = FACILITY_DAEMON, max_bytes: int = MAX_BYTES) -> bytes:
    """One event as an RFC 5424 message (bytes, at most max_bytes)."""
    pri = facility * 8 + severity(event)
    ts = str(event.get("time") or "-")
    host = _printable(hostname if hostname is not None else socket.gethostname(), 255)
    proc = _printable(procid if procid is not None else os.getpid(), 128)
    msgid = _printable(event.get("kind", "-"), 32)
    fields = {k: v for k, v in event.items() if k not in ("time", "kind")}
    head = f"<{pri}>1 {ts} {host} {APP_NAME} {proc} {msgid} "

    def build(limit: int | None) -> bytes:
        params = " ".join(f'{_param_name(k)}="{_param_value(v, limit)}"' for k, v in fields.items())
        sd = f"[{SD_ID} {params}]" if params else f"[{SD_ID}]"
        body = event if limit is None else {
            k: (v if len(json.dumps(v, default=str)) <= limit else
                json.dumps(v, default=str)[:limit] + "...") for k, v in event.items()}
        if limit is not None:
            body = {**body, "truncated": True}
        msg = json.dumps(body, default=str, separators=(",", ":"), ensure_ascii=False)
        return (head + sd + " " + BOM + msg).encode("utf-8", "replace")

    data = build(None)
    for limit in (1024, 256, 64):
        if len(data) <= max_bytes:
            return data
        data = build(limit)
    return data[:max_bytes]


@dataclass
class Message:
    """A parsed RFC 5424 message (what a receiver sees)."""

    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd_id: str | None
    params: dict[str, str]
    msg: str

    @property
    def facility(self) -> int:
        return self.pri >> 3

    @property
    def severity(self) -> int:
        return self.pri & 7


def parse_message(data: bytes | str) -> Message:
    """Parse one RFC 5424 message with one (or no) SD element; ValueError on anything off.
    For the tests and for whoever wants to read zfast's syslog back."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    if not text.startswith("<"):
        raise ValueError("no PRI")
    close = text.index(">")
    pri = int(text[1:close])
    if not 0 <= pri <= 191 or close > 4:
        raise ValueError(f"bad PRI {text[:close + 1]!r}")
    rest = text[close + 1:]
    version, ts, host, app, proc, msgid, rest = rest.split(" ", 6)
    for name, value, limit in (("HOSTNAME", host, 255), ("APP-NAME", app, 48),
                               ("PROCID", proc, 128), ("MSGID", msgid, 32)):
        if not value or len(value) > limit or any(not 33 <= ord(c) <= 126 for c in value):
            raise ValueError(f"bad {name} {value!r}")
    sd_id, params = None, {}
    if rest.startswith("-"):
        rest = rest[1:]
    elif rest.startswith("["):
        i = 1
        while i < len(rest) and rest[i] not in " ]":
            i += 1
        sd_id = rest[1:i]
        while rest[i] == " ":
            i += 1
            eq = rest.index("=", i)
            name = rest[i:eq]
            if rest[eq + 1] != '"':
                raise ValueError(f"param {name!r}: value not quoted")
            j, value = eq + 2, []
            while rest[j] != '"':
                if rest[j] == "\\" and rest[j + 1] in '"\\]':
                    value.append(rest[j + 1])
                    j += 2
                else:
                    if rest[j] == "]":
                        raise ValueError(f"param {name!r}: unescaped ]")
                    value.append(rest[j])
                    j += 1
            params[name] = "".join(value)
            i = j + 1
        if rest[i] != "]":
            raise ValueError("SD element not closed")
        rest = rest[i + 1:]
    else:
        raise ValueError("no STRUCTURED-DATA")
    if rest and not rest.startswith(" "):
        raise ValueError("no space before MSG")
    msg = rest[1:]
    if msg.startswith(BOM):
        msg = msg[1:]
    return Message(pri, int(version), ts, host, app, proc, msgid, sd_id, params, msg)


# ---------------------------------------------------------------- the forwarder

class SyslogForwarder:
    """Sends events to one syslog target from a background thread. send() never blocks
    and never raises; counters: sent, dropped (queue full: the oldest goes), errors
    (the socket refused: that event goes)."""

    def __init__(self, target: str | Target, hostname: str | None = None,
                 facility: int = FACILITY_DAEMON, queue_size: int = QUEUE_SIZE,
                 max_bytes: int = MAX_BYTES):
        self.target = parse_target(target) if isinstance(target, str) else target
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.facility = facility
        self.max_bytes = max_bytes
        self.procid = os.getpid()
        self._queue: collections.deque = collections.deque(maxlen=queue_size)
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self.sent = self.dropped = self.errors = 0
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        self._addr = None
        self._thread = threading.Thread(target=self._run, name="syslog", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1          # deque(maxlen) lets the oldest go
            self._queue.append(event)
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for up to timeout), then stop."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def status(self) -> dict:
        return {"target": str(self.target), "queued": len(self._queue), "sent": self.sent,
                "dropped": self.dropped, "errors": self.errors, "last_error": self.last_error}

    # ---- the thread

    def _connect(self) -> None:
        t = self.target
        if t.kind == "unix":
            # connected: then poll() says when the receiver's queue has room again
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                s.connect(t.path)
            except OSError:
                s.close()
                raise
            self._sock, self._addr = s, None
            return
        else:
            info = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(info[0], socket.SOCK_DGRAM)
            self._addr = info[4]
        s.setblocking(False)
        self._sock = s

    def _send_one(self, event: dict) -> None:
        data = format_event(event, self.hostname, self.procid, self.facility, self.max_bytes)
        deadline = time.monotonic() + BUSY_WAIT_S
        fresh = False
        while True:
            try:
                if self._sock is None:
                    self._connect()
                if self._addr is None:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, self._addr)
                self.sent += 1
                return
            except OSError as err:
                self.last_error = f"{type(err).__name__}: {err}"
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    # the receiver is behind (a unix socket queues 10 datagrams: its
                    # net.unix.max_dgram_qlen): wait for room, on this thread, not the node's
                    left = deadline - time.monotonic()
                    if left > 0 and select.select([], [self._sock], [], left)[1]:
                        time.sleep(0.001)     # never a spin, whatever poll says
                        continue
                    self.errors += 1
                    return
                # a restarted syslogd (new socket), a changed address: try once afresh
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if fresh or err.errno == errno.EMSGSIZE:
                    self.errors += 1
                    return
                fresh = True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing and not self._queue:
                    return
                event = self._queue.popleft()
                self._busy = True
            try:
                self._send_one(event)
            except Exception as err:      # a bad event must not stop the forwarder
                self.errors += 1
                self.last_error = f"{type(err).__name__}: {err}"
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
