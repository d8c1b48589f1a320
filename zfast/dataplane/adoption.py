"""A previous daemon's data plane, as a start or a down finds it pinned (zfast/dataplane/pins.py).

At a start: maps of our layout are adopted (the program is loaded against them, their
flows live on, the allocations in installed.json are taken back); maps of another
layout are set aside, their flows copied into fresh maps when only sizes differ
(same structs), then removed. At a down, or the end of a daemon that takes its data
plane with it: the program detached and the maps removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from zfast.config import Datapath as Sizes
from zfast.dataplane import pins
from zfast.dataplane.loader import DatapathError, Loaded, detach_interface, hooks_for
from zfast.paths import BPFFS


def adoptable(pin: Path, state_dir: Path, sizes: Sizes) -> bool:
    """Are there pinned maps a daemon with these sizes would adopt?"""
    return pins.has_pins(pin) and pins.read_json(state_dir / pins.LAYOUT) == pins.layout(sizes)


@dataclass
class Opened:
    dp: Loaded
    adopted: bool               # on a previous daemon's maps, its flows included
    installed: dict | None      # that daemon's allocations (installed.json), when adopted
    resized: dict | None        # when its maps were of another layout: for the event


def open_dataplane(sizes: Sizes, pin: Path, state_dir: Path,
                   interfaces: Iterable[tuple[str, str]], preloaded: Loaded | None) -> Opened:
    """Load the program against pinned maps: a previous daemon's, when their layout is
    ours, else fresh ones. preloaded: a program loaded ahead (a parked spare's, or the
    prestart's), taken when it has our pin and layout, else detached."""
    want = pins.layout(sizes)
    have = pins.read_json(state_dir / pins.LAYOUT)
    old = None
    adopted = False
    if preloaded is not None and not (preloaded.pin == pin
                                      and pins.layout(preloaded.sizes) == want):
        preloaded.detach_all()
        preloaded = None
    # (a parked spare's program comes with fresh maps, just renamed here: nothing to adopt)
    if preloaded is None and pins.has_pins(pin):
        if have == want:
            adopted = True
        else:
            old = pins.set_aside(pin)
    # the kernel verifies the programs while the maps are filled (they need no program)
    dp = preloaded or Loaded(sizes, pin=pin, hooks=hooks_for(interfaces), background=True)
    resized = None
    if old is not None:
        copied = 0
        if have and have.get("structs") == want["structs"]:
            copied = pins.copy_map(old / "flows", dp.table("flows"))
        pins.remove_pins(old)
        resized = {"flows_copied": copied, "old": have, "new": want}
    installed = pins.read_json(state_dir / pins.INSTALLED) if adopted else None
    pins.write_json(state_dir / pins.LAYOUT, want)
    return Opened(dp, adopted, installed, resized)


def save_installed(state_dir: Path, pin: Path, services: dict, firewall: dict,
                   interfaces: list[str]) -> None:
    """What the next daemon adopts (and what a down detaches and removes)."""
    pins.write_json(state_dir / pins.INSTALLED, {
        "services": services, "firewall": firewall, "interfaces": interfaces,
        "pin_dir": str(pin)})


def remove_dataplane(dp: Loaded, pin: Path, state_dir: Path) -> None:
    """A daemon's own data plane, at its end: nothing is left to adopt."""
    dp.detach_all()
    pins.remove_pins(pin)
    for name in (pins.INSTALLED, pins.LAYOUT):
        (state_dir / name).unlink(missing_ok=True)


def remove_left_behind(state_dir: Path) -> list[str]:
    """What a daemon that is gone left attached and pinned: detached, removed; says what."""
    done = []
    installed = pins.read_json(state_dir / pins.INSTALLED)
    if installed:
        for ifname in installed.get("interfaces", []):
            try:
                detach_interface(ifname)
                done.append(f"detached {ifname}")
            except DatapathError:
                pass  # gone with its namespace
        pin = Path(installed.get("pin_dir", ""))
        if pin.is_dir() and pin.parent == BPFFS:
            pins.remove_pins(pin)
            done.append(f"removed {pin}")
    for name in (pins.INSTALLED, pins.LAYOUT):
        (state_dir / name).unlink(missing_ok=True)
    return done
