"""The data plane from Python: compiling and loading the C programs, their maps and
what is shared with the C side.

loader      compile (or take from the cache) and attach the programs; Loaded owns the maps
progcache   the compiled-program cache, one entry per source, options and kernel
reasons     every #define ZF_* and the drop reasons, read from bpf/zfast_shared.h
pins        where the node's maps are pinned in bpffs, and the files written beside them
adoption    a previous daemon's pinned maps at a start (adopted, or set aside) and a down
progrun     BPF_PROG_RUN: run a program on a frame (tests, the benchmark, `zfast fw test`)
mapbatch    batched map reads and writes
flowage     ageing idle flows out of the flow table
sweeper     the daemon's side of the sweeps: the sweeper process, kept between sweeps
nexthops    next-hop MACs for the backends, from the kernel's neighbour table
flowhash    the flow hash the C side uses, for choosing a backend from Python
egress      can a port take XDP frames, and what the kernel dropped sending there
egresswatch every redirect target checked again when links change or frames are lost
links       the node's links as the kernel has them (the activity controller's source)
bcctables   BCC's map classes, with what zfast needs beyond them
bpflib      the bpf(2) calls BCC does not give us
background  a kernel call in a thread of its own
"""
