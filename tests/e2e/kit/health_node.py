"""The node of tests/e2e/test_health.py: `zfast up -c FILE` with the health controller wired
in as zfast.controllers.health documents for zfast.node.daemon.Node (a no-op shim once Node
wires it itself). Run as `python -m tests.e2e.kit.health_node FILE` from the repo root."""

from __future__ import annotations

import logging
import sys

from zfast import config
from zfast.controllers import health
from zfast.node.daemon import Node


class HealthNode(Node):
    shim = False

    def start(self):
        changes = super().start()
        if getattr(self, "health", None) is None:      # Node does not wire it (yet)
            self.shim = True
            self.health = health.for_node(self)
            self.health.start()
        return changes

    def stop(self):
        if self.shim and self.health is not None:
            self.health.stop()
            self.health = None
        super().stop()

    def _install(self, project, rev):
        changes = super()._install(project, rev)
        if self.shim and self.health is not None:
            self.health.refresh()
        return changes

    def status(self):
        st = super().status()
        if self.shim and self.health is not None:
            st["controllers"]["health"] = self.health.status()
        return st


def main(config_path: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    node = HealthNode(config.load(config_path), source=f"test_health -c {config_path}")
    node.start()
    print(f"health node {node.name} up ({'test shim' if node.shim else 'Node wires the controller'})",
          file=sys.stderr, flush=True)
    node.run()


if __name__ == "__main__":
    main(sys.argv[1])
