"""The standard lab (zfast.lab.topology.build: a client, the balancer, backends with echo
servers) and a node in it, as most end-to-end tests use it."""

from __future__ import annotations

import ipaddress
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tests.e2e.kit.cli import REPO, zfast
from tests.e2e.kit.traffic import PortPool
from tests.e2e.kit.waiting import wait_accepting
from zfast.api import Client
from zfast.lab import topology
from zfast.lab.netns import Topology
from zfast.paths import pin_dir

NEED_ROOT = "e2e tests need root (network namespaces, XDP); run them as root: ./run.sh test"


@dataclass
class Env:
    lab: topology.Lab
    api: Client | None          # the running node's API (None while no node runs)
    ports: PortPool
    names: dict[str, str]       # backend address -> backend name

    @property
    def state_dir(self) -> Path:
        return self.lab.state_dir


@contextmanager
def lab_env(prefix: str, weights=(1, 1, 2), start_node: bool = True,
            offloads: bool = True) -> Iterator[Env]:
    """The standard lab with echo servers (and a node), torn down whatever happens.
    Links as Linux makes them; offloads=False: see zfast.lab.topology.build."""
    # Fail, never skip: a run without root must not look like a green one.
    assert os.geteuid() == 0, NEED_ROOT
    with Topology(prefix=prefix) as topo:
        lab_ = topology.build(topo, len(weights), list(weights), offloads=offloads)
        try:
            lab_.start_servers()
            wait_servers(lab_)
            api = lab_.start_node() if start_node else None
            yield Env(lab_, api, PortPool(), backend_names(lab_))
        finally:
            try:
                lab_.stop_node()
            finally:
                if pin_dir(lab_.node_name).exists():   # a node that did not stop cleanly
                    zfast("down", "--state-dir", str(lab_.state_dir))
                shutil.rmtree(lab_.state_dir, ignore_errors=True)


def wait_servers(lab_: topology.Lab, timeout: float = 20.0) -> None:
    """Until every backend's echo server accepts (tried from the balancer's namespace)."""
    wait_accepting(lab_.topo.ns(lab_.lb), lab_.backend4, timeout=timeout)


def backend_names(lab_: topology.Lab) -> dict[str, str]:
    """Backend address (v4 and v6) -> the name its echo server answers with."""
    names = {}
    for i in range(len(lab_.backends)):
        a4, a6 = topology.backend_addrs(i)
        names[a4] = names[str(ipaddress.ip_address(a6))] = f"be{i + 1}"
    return names


def start_node(lab_: topology.Lab, project: dict, timeout: float = 120.0) -> Client:
    """`zfast up` of this project file in the lab's balancer namespace (Lab.start_node
    writes the lab's own file; this one takes any, e.g. with a `store:` section)."""
    lab_.write_config(project)
    lab_.node_proc, client = topology.start_zfast(lab_.topo, lab_.lb, lab_.config_path,
                                                  lab_.state_dir, timeout, cwd=REPO)
    return client
