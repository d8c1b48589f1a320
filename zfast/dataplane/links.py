"""The node's links as the kernel has them: the ports a redirect may go to."""

from __future__ import annotations

import socket

from zfast.dataplane.loader import Loaded


def refresh_tx_ports(dp: Loaded) -> None:
    """Every interface there is now may be a redirect target (one that appears later too)."""
    dp.set_tx_ports([idx for idx, _ in socket.if_nameindex()])
