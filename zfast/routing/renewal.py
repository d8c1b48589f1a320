"""The routing service's certificate controller, run by the core service in a thread.

A round gives every TLS host of ``routing.domains`` a certificate at once (self-signed when
none is stored) and then lets the CertManager (certs.py) issue through ACME and renew
what is due. Rounds come every ``EVERY_S``, and at once after an apply (``configure``:
domains added). The CertManager is for one ``routing.acme``: the round after an apply that
changes it makes a new one. The schedule takes the time as an argument (``clock``), so a
unit test drives it without waiting.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from zfast import config
from zfast.routing.certs import Cert, CertManager

EVERY_S = 1.0


def acme_spec(routing: config.Routing | None) -> dict | None:
    """What a CertManager is made for: routing.acme (None: self-signed only)."""
    acme = routing.acme if routing else None
    return ({"directory": acme.directory, "email": acme.email, "ca_bundle": acme.ca_bundle}
            if acme else None)


def domains_of(routing: config.Routing | None) -> list[tuple[str, str]]:
    return [(d.host, d.tls) for d in routing.domains] if routing else []


class Renewal:
    def __init__(self, store, project: str, log_event: Callable[..., None],
                 clock: Callable[[], float] = time.monotonic,
                 make_manager: Callable[..., CertManager] = CertManager):
        """log_event(kind, **fields): the core's events ("cert", "error");
        make_manager(store, project, acme, log_event=...): a CertManager (a test's fake)."""
        self.store = store
        self.project = project
        self.log_event = log_event
        self.clock = clock
        self.make_manager = make_manager
        self.manager: CertManager | None = None
        self.acme: dict | None = None        # what self.manager was made for
        self.wanted: dict | None = None      # today's routing.acme
        self.domains: list[tuple[str, str]] = []
        self.last_round: float | None = None
        self._wake = threading.Event()       # set: a round is due now (an apply)

    def configure(self, routing: config.Routing | None) -> None:
        """Today's routing section (at start and after each apply): a round at once."""
        self.wanted = acme_spec(routing)
        self.domains = domains_of(routing)
        self._wake.set()

    def _manager(self) -> CertManager:
        """The manager for today's routing.acme (an apply may change it)."""
        spec = self.wanted
        if self.manager is None or self.acme != spec:
            self.manager = self.make_manager(self.store, self.project, spec,
                                             log_event=self.log_event)
            self.acme = spec
        return self.manager

    def due(self, now: float) -> bool:
        return (self._wake.is_set() or self.last_round is None
                or now - self.last_round >= EVERY_S)

    def wait_s(self, now: float) -> float:
        """How long until the next round (unless an apply wakes it sooner)."""
        return 0.0 if self.due(now) else self.last_round + EVERY_S - now

    def round(self, now: float) -> None:
        """Self-signed at once for every host, ACME behind it, renewals when due."""
        self._wake.clear()          # an apply during this round makes another
        self.last_round = now
        try:
            manager = self._manager()
            manager.ensure(self.domains)
            manager.tick()
        except Exception as err:        # tick never raises; ensure on a bad store might
            self.log_event("error", controller="certs", error=str(err))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.due(self.clock()):
                self.round(self.clock())
            self._wake.wait(self.wait_s(self.clock()))

    def start(self, stop: threading.Event) -> None:
        """Certificates for every host before the routers need them, then the rounds."""
        self._manager().ensure(self.domains)
        threading.Thread(target=self.run, args=(stop,), name="zfast-core-certs", daemon=True).start()

    def hosts(self) -> set[str]:
        return {host for host, _ in self.domains}

    def renew(self, host: str) -> Cert:
        """Renew now (CertError when it cannot)."""
        return self.manager.renew(host)

    def certs(self) -> list[dict]:
        return [c.public() for c in self.manager.certs()] if self.manager else []
