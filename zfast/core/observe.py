"""What the core service sees of its instances: the repair controller's observations.

Each tick, every instance's process (running, exited, stopped), its answer to
``GET /status`` (0.5 s timeout), its cgroup (memory, throttled periods) and, for a router,
its HAProxy, into one ``InstanceState`` each (zfast/controllers/repair.py decides on them).
"""

from __future__ import annotations

import os
from pathlib import Path

from zfast.api import ApiError, Client
from zfast.controllers.repair import InstanceState, Observations, SpareState
from zfast.core.launcher import Launcher, haproxy_pid
from zfast.core.runtime import Instance, Runtime

API_TIMEOUT_S = 0.5        # a daemon that does not answer its status in this is not well


def stopped(pid: int | None) -> bool:
    """Whether the process is stopped by a signal (state T: SIGSTOP, SIGTSTP). Not a
    traced stop (t: a debugger attached on purpose), and not a busy or starved one."""
    if not pid:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _running(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class Observer:
    """What each instance said last, and since when it answers."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.answered: set[str] = set()   # instances whose daemon has answered since (re)start
        self.statuses: dict[str, dict] = {}  # each daemon's last answer
        self._throttle_seen: dict[str, tuple[int, int]] = {}   # (periods, throttled) last look

    def forget(self, name: str) -> None:
        """The instance is replaced: its successor has said nothing yet."""
        self.answered.discard(name)
        self.statuses.pop(name, None)
        self._throttle_seen.pop(name, None)

    def role(self, name: str) -> str | None:
        return self.statuses.get(name, {}).get("role")

    def observe(self, launcher: Launcher, resizing: bool) -> Observations:
        states = [self._state(name, inst, launcher) for name, inst in list(launcher.instances.items())]
        sp = launcher.spare
        spare = SpareState(sp.spec.name, alive=sp.pid is not None,
                           ready=launcher.spare_ready()) if sp else None
        return Observations(states, spare, resizing)

    def _state(self, name: str, inst: Instance, launcher: Launcher) -> InstanceState:
        state = InstanceState(
            name=name, kind=inst.spec.kind, started=inst.started, restarts=inst.restarts,
            grace_s=launcher.grace[name], links=len(inst.spec.links), cpu=inst.spec.cpu,
            boosted=name in launcher.boosted, throttled=self._throttled_share(name, inst))
        if inst.proc is None or inst.proc.poll() is not None:
            state.alive = False
            state.exit_code = inst.proc.returncode if inst.proc else None
            state.last_words = self.runtime.last_words(inst)
        elif stopped(inst.pid):
            state.stopped = True
        else:
            try:
                state.status = Client(inst.spec.state_dir, timeout=API_TIMEOUT_S).get("/status")
                self.answered.add(name)
                self.statuses[name] = state.status
            except ApiError as err:
                state.error = str(err)
            if state.status is not None:
                use = self.runtime.usage(inst)
                state.memory, state.memory_limit = use["memory"], use["memory_limit"]
        if inst.spec.kind == "router":
            state.haproxy_running = _running(self.runtime.host_pid(inst, haproxy_pid(inst)))
        state.answered = name in self.answered
        state.last_status = self.statuses.get(name)
        return state

    def _throttled_share(self, name: str, inst: Instance) -> float:
        """Share of CFS periods since the last look in which its quota ran out."""
        try:
            periods, throttled = inst.cgroup.throttling()
        except (OSError, ValueError):
            return 0.0
        before = self._throttle_seen.get(name, (periods, throttled))
        self._throttle_seen[name] = (periods, throttled)
        return (throttled - before[1]) / max(periods - before[0], 1)
