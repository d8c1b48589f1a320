"""Flow-state replication from the active node to the standby.

The active node's data plane reports every new flow on a ring buffer
(bpf/ha.h). The daemon collects them and streams them to the standby over
TCP in batches at most BATCH_S apart; on every (re)connection it first sends
its whole flow table, so a returning node gets everything. The standby
installs each flow's forward and reply entries in its own maps, with its own
service and backend slots (the two daemons allocate them independently).

Frames: MAGIC | length (4) | HMAC-SHA256 (32) | payload, the tag over the
receiver's per-connection nonce, a frame number and the payload, so a
recorded stream cannot be replayed into another connection.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from zfast.dataplane.loader import NO_BACKEND, Loaded
from zfast.dataplane.mapbatch import read_all
from zfast.dataplane.reasons import defines

log = logging.getLogger("zfast.ha.sync")

MAGIC = b"ZFS1"
NONCE_LEN = 16
BATCH_S = 0.05          # the standby is at most this far behind, plus the wire
MAX_BATCH = 4096        # flows per frame
MAX_PENDING = 1 << 18   # unsent flows kept at most (a slow link drops the newest, counted:
                        # the standby balances them again by Maglev's hash if it takes over)
DIR_FORWARD, DIR_REPLY = defines()["ZF_DIR_FORWARD"], defines()["ZF_DIR_REPLY"]
STALE_GEN = 0xFFFF      # a replicated flow asks the firewall again at its first packet here


@dataclass
class SyncStats:
    connected: bool = False
    sent: int = 0
    dropped: int = 0              # new flows not sent: more than MAX_PENDING waited
    received: int = 0
    installed: int = 0
    dumps: int = 0
    frames_rejected: int = 0
    last_batch: float = 0.0
    oldest_pending: float = 0.0   # when the oldest unsent flow was seen (lag)

    def lag_ms(self) -> float:
        return max(0.0, (time.time() - self.oldest_pending) * 1000) if self.oldest_pending else 0.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def _tag(key: bytes, nonce: bytes, number: int, payload: bytes) -> bytes:
    return hmac.new(key, nonce + struct.pack("!Q", number) + payload, hashlib.sha256).digest()


class FlowSender:
    """Active side: ring buffer -> batches -> the standby."""

    def __init__(self, dp: Loaded, key: bytes, peer: tuple[str, int], bind: str | None = None):
        self.dp = dp
        self.key = key
        self.peer = peer
        self.bind = bind
        self.stats = SyncStats()
        self.event_size = ctypes.sizeof(dp.table("flows").Key) + ctypes.sizeof(dp.table("flows").Leaf)
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ring_open = False

    def start(self) -> None:
        if not self._ring_open:
            self.dp.bpf[b"flow_events"].open_ring_buffer(self._on_event)
            self._ring_open = True
        self._stop.clear()
        self._threads = [threading.Thread(target=self._poll, name="sync-ring", daemon=True),
                         threading.Thread(target=self._run, name="sync-send", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.dp.update_config(sync=0)
        for t in self._threads:
            t.join(timeout=2)
        self.stats.connected = False

    def _on_event(self, ctx, data, size) -> None:
        raw = ctypes.string_at(data, size)
        with self._lock:
            if not self._pending:
                self.stats.oldest_pending = time.time()
            if len(self._pending) < MAX_PENDING:
                self._pending.append(raw)
            else:
                self.stats.dropped += 1

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.dp.bpf.ring_buffer_poll(50)

    def _full_table(self) -> list[bytes]:
        """Every forward entry of the flow table, as flow events (batch reads: a quarter
        million entries in well under a second, not one syscall an entry)."""
        flows = self.dp.table("flows")
        ks, vs = ctypes.sizeof(flows.Key), ctypes.sizeof(flows.Leaf)
        keys, vals, n = read_all(flows.map_fd, ks, vs)
        return [keys[i * ks:(i + 1) * ks] + vals[i * vs:(i + 1) * vs]
                for i, d in enumerate(vals[flows.Leaf.dir.offset::vs]) if d == DIR_FORWARD]

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                with socket.create_connection(self.peer, timeout=2,
                                              source_address=(self.bind, 0) if self.bind else None) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    nonce = _recv_exact(s, NONCE_LEN)
                    self.dp.update_config(sync=1)  # report new flows from now on ...
                    with self._lock:
                        self._pending.clear()
                        self.stats.oldest_pending = 0.0
                    number = 0
                    dump = self._full_table()      # ... and send what exists already
                    self.stats.dumps += 1
                    self.stats.connected = True
                    backoff = 0.05
                    for i in range(0, max(len(dump), 1), MAX_BATCH):
                        number += 1
                        self._send(s, nonce, number, dump[i:i + MAX_BATCH])
                    while not self._stop.is_set():
                        time.sleep(BATCH_S)
                        with self._lock:     # take them all: swapping is O(1)
                            batch, self._pending = self._pending, []
                            self.stats.oldest_pending = 0.0
                        for i in range(0, max(len(batch), 1), MAX_BATCH):
                            number += 1      # an empty frame is the keepalive
                            self._send(s, nonce, number, batch[i:i + MAX_BATCH])
            except OSError as err:
                log.debug("sync to %s: %s", self.peer, err)
            self.stats.connected = False
            self.dp.update_config(sync=0)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _send(self, s: socket.socket, nonce: bytes, number: int, events: list[bytes]) -> None:
        payload = struct.pack("!QI", number, len(events)) + b"".join(events)
        s.sendall(MAGIC + struct.pack("!I", len(payload)) + _tag(self.key, nonce, number, payload)
                  + payload)
        self.stats.sent += len(events)
        self.stats.last_batch = time.time()


class FlowReceiver:
    """Standby side: accepts the peer's stream and installs its flows here."""

    def __init__(self, dp: Loaded, key: bytes, bind: tuple[str, int], peer: str, translate):
        self.dp = dp
        self.key = key
        self.bind = bind
        self.peer = peer
        self.translate = translate  # sets the value's service/backend/fw_port slots; False: unknown
        self.stats = SyncStats()
        self._stop = threading.Event()
        self._install_lock = threading.Lock()
        family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(bind)
        self.sock.listen(4)
        self.sock.settimeout(0.5)
        self.thread = threading.Thread(target=self._accept, name="sync-recv", daemon=True)
        Key, Leaf = dp.table("flows").Key, dp.table("flows").Leaf
        self.key_size, self.value_size = ctypes.sizeof(Key), ctypes.sizeof(Leaf)
        self.Key, self.Leaf = Key, Leaf

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            if addr[0] != self.peer:
                conn.close()  # only the peer replicates to us
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        nonce = secrets.token_bytes(NONCE_LEN)
        expected = 0
        with conn:
            try:
                conn.sendall(nonce)
                self.stats.connected = True
                while not self._stop.is_set():
                    head = _recv_exact(conn, 8 + 32)
                    if head[:4] != MAGIC:
                        raise ConnectionError("bad magic")
                    (length,) = struct.unpack("!I", head[4:8])
                    payload = _recv_exact(conn, length)
                    number, count = struct.unpack("!QI", payload[:12])
                    if (number != expected + 1
                            or not hmac.compare_digest(head[8:40], _tag(self.key, nonce, number, payload))):
                        self.stats.frames_rejected += 1
                        raise ConnectionError("a frame failed authentication")
                    expected = number
                    self.install(payload[12:], count)
                    self.stats.last_batch = time.time()
            except (OSError, ConnectionError, struct.error) as err:
                log.debug("sync from peer: %s", err)
            finally:
                self.stats.connected = False

    def install(self, blob: bytes, count: int) -> int:
        """Install count flow events (forward entry + derived reply entry each)."""
        if not count:
            return 0
        size = self.key_size + self.value_size
        keys, values = [], []
        for i in range(count):
            raw = blob[i * size:(i + 1) * size]
            k = self.Key.from_buffer_copy(raw[:self.key_size])
            v = self.Leaf.from_buffer_copy(raw[self.key_size:])
            if not self.translate(k, v):
                v.service, v.backend, v.fw_port = NO_BACKEND, NO_BACKEND, 0
            v.fw_gen = STALE_GEN
            v.nh_ifindex, v.nh_gen = 0, 0   # the peer's next hop is not ours
            rk, rv = self.Key(), self.Leaf()
            ctypes.memmove(ctypes.byref(rk.src), ctypes.byref(v.addr), 16)
            ctypes.memmove(ctypes.byref(rk.dst), ctypes.byref(k.src), 16)
            rk.sport, rk.dport, rk.proto, rk.family = v.port, k.sport, k.proto, k.family
            ctypes.memmove(ctypes.byref(rv.addr), ctypes.byref(k.dst), 16)
            rv.port, rv.dir, rv.service, rv.backend = k.dport, DIR_REPLY, v.service, v.backend
            keys += [bytes(rk), bytes(k)]   # reply first, as the data plane does
            values += [bytes(rv), bytes(v)]
        with self._install_lock:
            self.dp.update_batch("flows", np.frombuffer(b"".join(keys), dtype=np.uint8)
                                 .reshape(len(keys), self.key_size).copy(),
                                 np.frombuffer(b"".join(values), dtype=np.uint8)
                                 .reshape(len(values), self.value_size).copy())
        self.stats.received += count
        self.stats.installed += count
        return count
