"""Keeps the next hops the data plane caches in its flows honest.

A flow entry caches the FIB's answer for its packets (egress port, MACs)
under a generation number; the data plane uses it while the number equals
zf_config.nh_gen. This watcher bumps that number whenever the kernel reports
a route or neighbour change (netlink), and every REFRESH_S regardless, so a
cached next hop is never older than the change that made it wrong.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

log = logging.getLogger("zfast.dataplane.nexthops")

REFRESH_S = 5.0
# rtnetlink multicast groups (linux/rtnetlink.h)
RTMGRP_NEIGH = 0x4
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_ROUTE = 0x400
RTMGRP_LINK = 0x1


class NextHopWatch:
    def __init__(self, dp):
        self.dp = dp
        self.gen = 0
        self.bumps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nexthops", daemon=True)

    def bump(self) -> None:
        self.gen = (self.gen % 0xFFFF) + 1  # 16 bits in the flow entry; never 0 (= unset)
        self.dp.update_config(nh_gen=self.gen)
        self.bumps += 1

    def start(self) -> None:
        # Go on from the data plane's number: flows cached by a previous daemon under
        # its current generation must not count as fresh.
        self.gen = int(self.dp.config().nh_gen)
        self.bump()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        # A bare rtnetlink socket: what changed does not matter, that it changed does, so
        # nothing is parsed (a netlink library would cost a small daemon ~20 MiB).
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_LINK))
            sock.setblocking(False)
        except OSError as err:  # without events, the periodic bump still bounds staleness
            log.warning("no netlink events (%s); next hops refresh every %.0f s", err, REFRESH_S)
            sock = None
        try:
            while not self._stop.is_set():
                if sock is None:
                    self._stop.wait(REFRESH_S)
                    self.bump()
                    continue
                ready, _, _ = select.select([sock], [], [], REFRESH_S)
                if ready:
                    self._drain(sock)
                self.bump()
        finally:
            if sock is not None:
                sock.close()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        """Read what is queued (a burst of changes is one bump); ENOBUFS (the queue
        overflowed) says the same: something changed."""
        while True:
            try:
                sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
