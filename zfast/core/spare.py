"""A parked spare daemon: compiled ahead, waiting for the instance it will become.

BCC compiles the data plane in 3 s on an idle core and 6 s under a 0.5-CPU quota: longer than
the whole budget for replacing a failed balancer. So the core service keeps one spare
instance (namespace, links without addresses, cgroup) whose daemon runs `zfast up --park`:
it compiles the program for the project's sizes with its maps pinned in a spare directory,
writes ``parked`` in its state dir, and waits. To replace a failed instance the repair
controller gives the spare that instance's addresses and writes its project file; the daemon
renames the pinned maps to the node's own pin dir (bpffs supports rename), and starts as
that node without compiling.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from zfast import config
from zfast.dataplane import pins
from zfast.dataplane.loader import Loaded
from zfast.paths import pin_dir

PARKED = "parked"          # written in the state dir once the program is loaded
POLL_S = 0.02


def park(template_file: Path, config_file: Path) -> tuple[Loaded | None, config.Project | None]:
    """Compile for the template's sizes, wait for config_file, hand the program over.

    Returns (program or None when it does not fit the final file, the final file), or
    (None, None) when told to stop (SIGTERM) while parked.
    """
    template = config.load(template_file)
    state_dir = Path(template.node.state_dir)
    spare_pin = pin_dir(template.node.name)
    pins.remove_pins(spare_pin)            # a leftover of a spare that died
    dp = Loaded(template.datapath, pin=spare_pin)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    (state_dir / PARKED).write_text(str(os.getpid()))
    try:
        while not Path(config_file).exists():
            if stop.wait(POLL_S):
                pins.remove_pins(spare_pin)
                return None, None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        (state_dir / PARKED).unlink(missing_ok=True)
    project = config.load(config_file)
    target = pin_dir(project.node.name)
    if pins.layout(project.datapath) != pins.layout(template.datapath) or pins.has_pins(target):
        pins.remove_pins(spare_pin)        # sizes changed meanwhile: compile anew
        return None, project
    pins.remove_pins(target)               # an empty directory of a removed node
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(spare_pin, target)
    dp.pin = target
    return dp, project
