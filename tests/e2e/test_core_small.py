"""A balancer at the bottom of its bounds: 128 MiB and 0.25 CPU.

The smallest instance `core.balancer.scale` allows must start, form the pair and forward
without the scaling controller growing it because of what its own start and idle chores
cost: a controller that grows every fresh instance says the floor is a lie (and on a full
host, a start that needs more than its size is a start that fails).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.kit.core import core_service
from zfast.controllers import scaling
from zfast.lab.probe import Stream, streams_alive

PROJECT = "coresmall"
STATE = Path("/run/zfast/test-core-small")
PUBLIC_VIP, PUBLIC_PORT = "10.234.0.10", 2222
BACKENDS = ("10.235.0.2", "10.235.0.3")
STREAMS = 30
CPU, MEMORY = 0.25, 128 << 20


def _config() -> dict:
    return {
        "project": PROJECT,
        "services": [{"name": "app", "vip": "10.235.0.10",
                      "ports": [{"port": 80, "proto": "tcp", "target_port": 8080}],
                      "backends": [{"address": a} for a in BACKENDS]}],
        "public_ports": [{"port": PUBLIC_PORT, "proto": "tcp", "address": PUBLIC_VIP,
                          "service": "app", "target_port": 8080}],
        "core": {"public": {"bridge": "zspub0", "subnet": "10.234.0.0/24"},
                 "private": {"bridge": "zspriv0", "subnet": "10.235.0.0/24",
                             "gateway": "10.235.0.254"},
                 "balancer": {"cpu": CPU, "memory": "128Mi", "flow_table": 65536,
                              "scale": {"cpu": [CPU, 1], "memory": ["128Mi", "1Gi"],
                                        "flow_table": [65536, 262144], "cooldown_s": 60}}},
    }


@pytest.fixture(scope="module")
def core():
    with core_service("zfcs", STATE, _config(), BACKENDS, "10.234.0.100/24") as c:
        yield c


def test_a_balancer_at_128MiB_and_a_quarter_cpu_forwards_without_growing(core):
    pair = core.wait_pair(90, spare=False)
    assert {(i["cpu"], i["memory"]) for i in pair.values()} == {(CPU, MEMORY)}, pair
    streams = [Stream(core.cli, PUBLIC_VIP, PUBLIC_PORT) for _ in range(STREAMS)]
    assert not streams_alive(streams)
    # Two full decision windows after both answered: the start's tail and the idle
    # chores are in every window the controller has looked at by then.
    time.sleep(2 * scaling.WINDOW + scaling.GROW_SETTLE_S)
    assert not streams_alive(streams, rounds=3), "a stream broke"
    grown = [e for e in core.events("scale") if e["resource"] in ("cpu", "memory")
             and e["new"] > e["old"]]
    assert not grown, f"the controller grew an instance at its start: {grown}\n{core.story()}"
    now = core.instances()
    assert {(i["cpu"], i["memory"]) for i in now.values()} == {(CPU, MEMORY)}, now
    assert all(i["healthy"] and i["restarts"] == 0 for i in now.values()), now
