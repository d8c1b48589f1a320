"""The active/standby pair: heartbeats, election, address takeover, flow replication.

heartbeat.py  authenticated, replay-protected heartbeat messages (HMAC-SHA256)
election.py   who is active: a state machine driven by heartbeats and a clock
takeover.py   claiming and releasing the VIPs (data-plane lease, GARP, unsolicited NA)
sync.py       streaming new flows to the standby and installing them there
pair.py       the loop that ties them together inside a node's daemon

The activity controller, which tells the pair whether this node's data plane is healthy,
is zfast/controllers/activity.py.
"""
