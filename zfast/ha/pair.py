"""The pair inside a node's daemon: heartbeats out and in, the election, the activity
controller, VIP takeover and flow replication, on two threads of their own.

A takeover runs in the order that keeps established connections alive: the
replicated flows are already in the maps (the receiver installs as it goes,
and drains before the role changes), then the node claims the VIPs (lease
renewed, gratuitous ARP / unsolicited NA), then it streams its own new flows
to the returning peer.
"""

from __future__ import annotations

import array
import fcntl
import logging
import socket
import struct
import termios
import threading
import time

from zfast.config import HA
from zfast.controllers.activity import Activity
from zfast.ha.election import ACTIVE, INIT, STANDBY, Election
from zfast.ha.heartbeat import Sender, Verifier, load_key
from zfast.ha.sync import FlowReceiver, FlowSender
from zfast.ha.takeover import VipHolder

log = logging.getLogger("zfast.ha")

ACTIVITY_EVERY_S = 0.1   # the activity controller's period
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux; Python does not name it
ANNOUNCE_AGAIN_S = (0.05, 0.25, 1.0)   # repeat GARP/NA: a single frame can be lost
FROZEN_INIT_S = 1.0      # init period after a freeze: hear the peer before claiming anything


class Pair:
    def __init__(self, node, ha: HA):
        self.node = node
        self.ha = ha
        self.key = load_key(ha.key_file)       # a bad key file stops `zfast up` right here
        self.hb_s = ha.heartbeat_ms / 1000
        self.dead_s = self.hb_s * ha.dead_intervals
        self.lease_s = self.hb_s * 2           # runs out before the peer's dead interval ends
        self.sender = Sender(node.name, self.key)
        self.verifier = Verifier(node.name, self.key)
        self.election = Election(node.name, ha.priority, self.dead_s, time.monotonic())
        self.links = [(ha.bind, ha.peer)] + list(ha.links)
        self.socks: list[socket.socket] = []
        self.activity = Activity(node.links)
        self.holder = VipHolder(node.dp, ha.vips, [i.name for i in node.project.node.interfaces])
        self.flow_sender = FlowSender(node.dp, self.key, (str(ha.peer), ha.sync_port), str(ha.bind))
        self.receiver = FlowReceiver(node.dp, self.key, (str(ha.bind), ha.sync_port), str(ha.peer),
                                     node.table.translate_flow)
        self.peer_link: str | None = None      # where the last heartbeat came from
        self.auth_failures_since_ok = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._announce_at: list[float] = []
        self._announce = threading.Event()
        self.last_loop = time.monotonic()
        # The heartbeat thread and one listener per link all drive the election: one step
        # (decision, lease, event) at a time, so the role, the lease and the log agree.
        self._role_lock = threading.Lock()
        self._role_changed = threading.Event()   # wakes the thread that starts/stops sync
        self._sender_on = False
        self._in_hand: dict[str, bool] = {}   # per link: a heartbeat read, not yet decided on

    # ---- life cycle -------------------------------------------------------------

    def start(self) -> None:
        self.holder.setup()
        self.holder.release()
        for bind, _peer in self.links:
            family = socket.AF_INET6 if bind.version == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((str(bind), self.ha.port))
            except OSError as err:
                raise OSError(f"ha: cannot listen on {bind}:{self.ha.port}: {err.strerror}") from None
            s.settimeout(0.2)
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # when each heartbeat arrived
            self.socks.append(s)
        self.receiver.start()
        self.holder.prepare()  # frames built now, not on the heartbeat thread at takeover
        # Listen first, and count the init period from now: the setup above takes a while
        # (scapy's frames), and an init period that ran out before anything was heard made a
        # returning node active at once, preempting the active peer.
        self._threads = [threading.Thread(target=self._listen, args=(s,), name="ha-listen", daemon=True)
                         for s in self.socks]
        for t in self._threads:
            t.start()
        self.election.started = time.monotonic()
        more = [threading.Thread(target=self._beat, name="ha-beat", daemon=True),
                threading.Thread(target=self._check_activity, name="ha-activity", daemon=True),
                threading.Thread(target=self._announcer, name="ha-announce", daemon=True),
                threading.Thread(target=self._apply_role_to_sender, name="ha-sync-role",
                                 daemon=True)]
        self._threads += more
        for t in more:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self.holder.release()
        self.flow_sender.stop()
        self.receiver.stop()
        for s in self.socks:
            s.close()

    @property
    def role(self) -> str:
        return self.election.role

    # ---- heartbeats out, election, activity ---------------------------------------

    def _beat(self) -> None:
        """The heartbeat thread: only cheap work here, a late heartbeat is a takeover.
        It wakes to send a heartbeat every interval, and also the moment the peer's dead
        interval (or this node's init period) ends: a takeover does not wait for the next
        heartbeat, up to an interval later (a TCP retransmission, ~200 ms after the
        failure, must find the new active)."""
        self.last_loop = time.monotonic()
        next_send = self.last_loop
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self.last_loop > self.dead_s and (
                    self.role != ACTIVE or self.election.peer_alive(self.last_loop)):
                # We were frozen (SIGSTOP, a stalled machine): the peer has taken over by
                # now. Claim nothing until we have heard it again. (An active node whose
                # peer was dead already keeps its role: nobody took over; a peer that
                # started meanwhile and went active yields or wins by rank, as two actives do.)
                def frozen(away=now - self.last_loop, now=now):
                    return self.election.restart_after_freeze(
                        now, max(self.dead_s, FROZEN_INIT_S), f"frozen for {away:.2f} s")
                self._step(frozen)
            self.last_loop = now
            if self._unread():
                # Heartbeats wait unread (this process was starved of CPU): the listeners
                # decide on them first. The peer's silence is judged on empty queues only,
                # else a stalled node takes over from (or, ranking higher, ousts) a live peer.
                self._step(lambda: None, renew=True)
            else:
                self._step(lambda: self.election.tick(now, not self.activity.problems), renew=True)
            if now >= next_send:
                self._send_heartbeats()
                next_send = now + self.hb_s
            self._stop.wait(max(0.0, self._wake_at(next_send) - time.monotonic()))

    def _wake_at(self, next_send: float) -> float:
        e = self.election
        deadline = None
        if e.role == INIT:
            deadline = e.started + e.init_period()
        elif e.role == STANDBY and e.peer_seen is not None:
            deadline = e.peer_seen + self.dead_s
        if deadline is not None and time.monotonic() < deadline < next_send:
            return deadline + 0.001
        return next_send

    def _unread(self) -> bool:
        """Is a heartbeat queued in a socket, or read and not yet given to the election?"""
        if any(self._in_hand.values()):
            return True
        for s in self.socks:
            n = array.array("i", [0])
            try:
                fcntl.ioctl(s.fileno(), termios.FIONREAD, n, True)
            except (OSError, ValueError):
                continue
            if n[0] > 0:
                return True
        return False

    def _check_activity(self) -> None:
        while not self._stop.wait(ACTIVITY_EVERY_S):
            try:
                self.activity.check()
            except Exception as err:  # a broken check must not stop the others
                self.activity.problems = [f"activity check failed: {err}"]

    def _announcer(self) -> None:
        while not self._stop.is_set():
            self._announce.wait(0.2)
            self._announce.clear()
            while self._announce_at and not self._stop.is_set():
                delay = self._announce_at[0] - time.monotonic()
                if delay > 0:
                    if self._announce.wait(min(delay, 0.2)):
                        break  # a new takeover rescheduled
                    continue
                self._announce_at.pop(0)
                if self.role == ACTIVE:
                    self.holder.announce()

    def _send_heartbeats(self) -> None:
        data = self.sender.make(role=self.role, priority=self.ha.priority,
                                healthy=not self.activity.problems,
                                problems=self.activity.problems, sync_port=self.ha.sync_port,
                                active_since=0.0)
        for s, (_bind, peer) in zip(self.socks, self.links):
            try:
                s.sendto(data, (str(peer), self.ha.port))
            except OSError:
                pass  # that link is down; the others may carry it

    def _listen(self, sock: socket.socket) -> None:
        link = sock.getsockname()[0]   # heartbeats are checked for replays link by link
        while not self._stop.is_set():
            self._in_hand[link] = False
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, 64)
            except socket.timeout:
                continue
            except OSError:
                return
            self._in_hand[link] = True
            before = self.verifier.counters.forged
            hb = self.verifier.check(data, link)
            if hb is None:
                if self.verifier.counters.forged > before:
                    self.auth_failures_since_ok += 1
                    if self.auth_failures_since_ok == 20:
                        self.node.events.log("error", error=f"heartbeats from {addr[0]} fail "
                                             "authentication: is ha.key_file the same on both nodes?")
                continue
            self.auth_failures_since_ok = 0
            self.peer_link = addr[0]
            arrived = self._arrival(anc)
            self._step(lambda: self._on_heartbeat(hb, arrived))

    # ---- role changes -------------------------------------------------------------

    def _schedule_announce(self) -> None:
        now = time.monotonic()
        self._announce_at = [now] + [now + d for d in ANNOUNCE_AGAIN_S]
        self._announce.set()

    @staticmethod
    def _arrival(anc) -> float:
        """When the kernel received the datagram, on the monotonic clock. A daemon that was
        frozen reads the heartbeats queued meanwhile all at once: they are not news of now
        (the election in init ignores those from before it started listening)."""
        mono, wall = time.monotonic(), time.time()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("qq", data[:16])
                return min(mono, mono - (wall - (sec + nsec / 1e9)))
        return mono

    def _on_heartbeat(self, hb, arrived: float):
        e = self.election
        if (e.peer is not None and (e.peer.node, e.peer.boot) == (hb.node, hb.boot)
                and hb.seq <= e.peer.seq):
            # The other link's listener checked a newer one and got here first: this one's
            # role and arrival are older news (it must not set the clock of the peer's
            # silence back: the standby would take over from a live peer).
            return None
        peer_was = e.peer.role if e.peer is not None and e.peer_alive(arrived) else None
        t = e.on_heartbeat(hb, arrived)
        if t is None and self.role == ACTIVE and hb.role != ACTIVE and peer_was in (None, ACTIVE):
            # The peer just yielded (two actives), or is heard again after a silence (a
            # broken path, a restart, a key that did not match): it may have announced
            # the VIPs meanwhile, so clients and backends may still send to it.
            self._schedule_announce()
        return t

    def _step(self, decide, renew: bool = False) -> None:
        """One election step and what its transition changes, one thread at a time."""
        with self._role_lock:
            t = decide()
            if t is not None:
                log.warning("role %s -> %s: %s", t.old, t.new, t.reason)
                if t.new == ACTIVE:
                    # The flows are in the maps already (installed as they came); now the
                    # addresses.
                    self.holder.renew(self.lease_s)
                    self._schedule_announce()
                else:
                    self.holder.release()
                self.node.events.log("role", old=t.old, new=t.new, reason=t.reason)
            elif renew and self.role == ACTIVE:
                self.holder.renew(self.lease_s)
        if t is not None:
            self._role_changed.set()

    def _apply_role_to_sender(self) -> None:
        """Replicate while active, on a thread of its own: stopping the sender waits for
        its threads (up to seconds, a connect to a dead peer), and the heartbeat thread
        that changed the role must not wait with it (it did: "frozen for 1.3 s" right after
        a takeover, and the pair flapped)."""
        while not self._stop.is_set():
            if not self._role_changed.wait(0.5):
                continue
            self._role_changed.clear()
            if self.role == ACTIVE and not self._sender_on:
                self.flow_sender.start()
                self._sender_on = True
            elif self.role != ACTIVE and self._sender_on:
                self.flow_sender.stop()
                self._sender_on = False

    # ---- status -------------------------------------------------------------------

    def status(self) -> dict:
        now = time.monotonic()
        peer = self.election.peer
        seen = self.election.peer_seen
        if self.auth_failures_since_ok >= 3:
            state = "auth-failed"
        elif seen is None:
            state = "unknown"
        else:
            state = "alive" if now - seen < self.dead_s else "dead"
        return {
            "address": str(self.ha.peer),
            "state": state,
            "node": peer.node if peer else None,
            "role": peer.role if peer else None,
            "healthy": peer.healthy if peer else None,
            "problems": peer.problems if peer else [],
            "last_heartbeat_ms": round((now - seen) * 1000, 1) if seen else None,
            "via": self.peer_link,
            "heartbeats": vars(self.verifier.counters),
            "replication": {
                "sending": vars(self.flow_sender.stats) | {"lag_ms": round(self.flow_sender.stats.lag_ms(), 1)},
                "receiving": vars(self.receiver.stats),
            },
        }
