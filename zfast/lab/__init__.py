"""Throw-away labs in network namespaces: for `zfast demo`, the end-to-end tests and the
benchmarks. Nothing here runs in production.

topology    the standard lab (a client, one balancer, backends) and the pair lab
netns       namespaces, veths and bridges, made and torn down
probe       TCP streams and UDP probes that notice a broken connection
echo        the echo servers the backends run
demo        `zfast demo`
lxd         an LXD daemon of its own (LXD_DIR, preseed) and the instance image (mmdebstrap)
"""
