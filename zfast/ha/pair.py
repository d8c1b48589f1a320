"""The pair inside a node's daemon: heartbeats out and in, the election, the activity
controller, VIP takeover and flow replication, on two threads of their own.

A takeover runs in the order that keeps established connections alive: the
replicated flows are already in the maps (the receiver installs as it goes,
and drains before the role changes), then the node claims the VIPs (lease
renewed, gratuitous ARP / unsolicited NA), then it streams its own new flows
to the returning peer.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from zfast.config import HA
from zfast.ha.activity import Activity
from zfast.ha.election import ACTIVE, INIT, STANDBY, Election
from zfast.ha.heartbeat import Sender, Verifier, load_key
from zfast.ha.sync import FlowReceiver, FlowSender
from zfast.ha.takeover import VipHolder

log = logging.getLogger("zfast.ha")

ACTIVITY_EVERY_S = 0.1   # the activity controller's period
ANNOUNCE_AGAIN_S = (0.05, 0.25, 1.0)   # repeat GARP/NA: a single frame can be lost


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
        self.activity = Activity(node.dp, [i.name for i in node.project.node.interfaces])
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
            self.socks.append(s)
        self.receiver.start()
        self.holder.prepare()  # frames built now, not on the heartbeat thread at takeover
        self._threads = [threading.Thread(target=self._beat, name="ha-beat", daemon=True),
                         threading.Thread(target=self._check_activity, name="ha-activity", daemon=True),
                         threading.Thread(target=self._announcer, name="ha-announce", daemon=True)]
        self._threads += [threading.Thread(target=self._listen, args=(s,), name="ha-listen", daemon=True)
                          for s in self.socks]
        for t in self._threads:
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
        """The heartbeat thread: only cheap work here, a late heartbeat is a takeover."""
        self.last_loop = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self.last_loop > self.dead_s:
                # We were frozen (SIGSTOP, a stalled machine): the peer has taken over by
                # now. Claim nothing until we have heard it again.
                self._change(self.election._become(INIT, f"frozen for {now - self.last_loop:.2f} s"))
                self.election.started = now
            self.last_loop = now
            self._change(self.election.tick(now, not self.activity.problems))
            if self.role == ACTIVE:
                self.holder.renew(self.lease_s)
            self._send_heartbeats()
            self._stop.wait(self.hb_s)

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
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            before = self.verifier.counters.forged
            hb = self.verifier.check(data)
            if hb is None:
                if self.verifier.counters.forged > before:
                    self.auth_failures_since_ok += 1
                    if self.auth_failures_since_ok == 20:
                        self.node.events.log("error", error=f"heartbeats from {addr[0]} fail "
                                             "authentication: is ha.key_file the same on both nodes?")
                continue
            self.auth_failures_since_ok = 0
            self.peer_link = addr[0]
            self._change(self.election.on_heartbeat(hb, time.monotonic()))

    # ---- role changes -------------------------------------------------------------

    def _change(self, t) -> None:
        if t is None:
            return
        log.warning("role %s -> %s: %s", t.old, t.new, t.reason)
        if t.new == ACTIVE:
            # The flows are in the maps already (installed as they came); now the addresses.
            self.holder.renew(self.lease_s)
            now = time.monotonic()
            self._announce_at = [now] + [now + d for d in ANNOUNCE_AGAIN_S]
            self._announce.set()
            self.flow_sender.start()
        else:
            self.holder.release()
            self.flow_sender.stop()
        self.node.events.log("role", old=t.old, new=t.new, reason=t.reason)

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
