"""What the end-to-end tests share, one concern a module:

    cli          the zfast CLI as a subprocess (`zfast()`), its --json outputs
    waiting      wait_for (poll until true), wait_tcp, wait_accepting
    traffic      connections from chosen source ports, UDP answers, long-lived streams
                 and their Pinger, numbered UDP flows
    maps         a node's pinned maps through bpftool: dumps, flow entries, counters
    kernel       a namespace's links: programs attached, MACs, neighbours, processes
    wire         frames on the wire (AF_PACKET): heartbeats, backend traffic, ARP
    oracle       the backend a new flow must reach (Maglev and the flow hash)
    etcd         an etcd server, in a namespace or on loopback
    lab          the standard lab (zfast.lab.topology.build) with a node: lab_env()
    pair         the active/standby pair lab: pair_env(), RoleWatch
    core         a running `zfast core up`: core_service()
    router       a routing daemon (`python -m zfast.routing.router`) and its backends
    web          HTTP(S) requests and certificates from a namespace
    pebble       a throw-away ACME server (pebble and pebble-challtestsrv)
    health_node  `zfast up` with the health controller wired in (tests/e2e/test_health.py)

Imported as tests.e2e.kit.* (pytest.ini puts the repo root on sys.path).
"""
