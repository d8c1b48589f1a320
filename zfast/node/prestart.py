"""The first step of `zfast up`, taken before the control plane is imported.

A start spends ~0.5 s in the kernel (making the maps, verifying the programs) and ~0.3 s
importing the control plane (netlink, numpy, the controllers); one after the other they
are most of the time to the first datagram forwarded. So `zfast up` takes the node's lock
and, on a fresh start, begins loading the data plane in a thread of its own as soon as the
project file is read; Node.start takes the result (zfast/node/daemon.py) and fills the maps
while the kernel verifies the programs (loader.Loaded, background).

Only a fresh start is begun early: with pinned maps of a previous daemon there (a restart
that adopts the flows, or maps to be set aside), the node decides what to do with them,
after its store is open, as before.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from zfast import config
from zfast.dataplane import loader, pins
from zfast.dataplane.background import Background
from zfast.paths import pin_dir


class AlreadyRunning(Exception):
    """Another daemon holds the node's lock."""


def take_node_lock(state_dir: Path, name: str):
    """The node's lock file, held (flock) and naming this process; raises AlreadyRunning."""
    state_dir.mkdir(parents=True, exist_ok=True)
    f = open(state_dir / "node.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise AlreadyRunning(f"node {name} is already running (state dir {state_dir})") from None
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Prestart:
    """The node's lock, and the data plane of a fresh start loading in a thread."""

    def __init__(self, project: config.Project):
        node = project.node
        self.lock_file = take_node_lock(Path(node.state_dir), node.name)
        self.pin = pin_dir(node.name)
        self._taken = False
        self._load = None
        if pins.has_pins(self.pin):
            return                      # the node adopts or sets aside what is there
        # the start's own checks first: a start that fails them (a crash loop's) costs
        # no maps and no verifier
        try:
            for itf in node.interfaces:
                loader.ifindex(itf.name)
        except loader.DatapathError:
            return                      # the node says which interface is missing
        if project.ha is not None:
            # a solo node imports the key's module later, with the daemon, while the
            # kernel works: only a pair's start pays for it before
            from zfast.ha.heartbeat import KeyError_, load_key  # noqa: PLC0415
            try:
                load_key(project.ha.key_file)
            except KeyError_:
                return                  # the node says what is wrong with the key
        hooks = loader.hooks_for((itf.name, itf.mode or node.mode) for itf in node.interfaces)
        self._load = Background(lambda: loader.Loaded(project.datapath, pin=self.pin,
                                                        hooks=hooks, background=True),
                                name="prestart")

    @property
    def loading(self) -> bool:
        """Whether it began loading the data plane (the start's own checks passed)."""
        return self._load is not None

    def take(self):
        """The loaded data plane (None if none was begun); raises what its load raised.
        The caller owns it from here (and its pins)."""
        if self._load is None:
            return None
        self._taken = True
        loaded, err = self._load.wait()
        if err is not None:
            raise err
        return loaded

    def discard(self) -> None:
        """After a start that failed: maps it made and the node did not take go again."""
        if self._load is not None and not self._taken:
            loaded, _ = self._load.wait()
            if loaded is not None:
                pins.remove_pins(self.pin)
        self.lock_file.close()
