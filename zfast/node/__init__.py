"""A node: one balancer's daemon. Imports nothing, so that `zfast up` can take the node
lock and start loading the data plane (prestart) before the rest is imported.

daemon      Node: the daemon's life, from start to down
prestart    the first step of `zfast up`, before the control plane is imported
checks      what a node checks before it starts or takes a file (NodeError)
revisions   project files as store revisions: the shared part, change lines, history
routes      the node's control API handlers
"""
