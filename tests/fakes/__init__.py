"""A data plane without a kernel, for unit tests (in the spirit of Cilium's NewFakeLBMaps
and faucet's fakeoftable): the maps bpf/maps.h declares, with the structs of
bpf/zfast_shared.h as ctypes classes read from the header itself (never a copy), behind
the interface zfast.dataplane.loader.Loaded gives the control plane.

    cstructs    the header's structs and maps.h's map declarations
    maps        FakeMap: one map, BCC's table interface over bytes
    dataplane   FakeDataplane: every map, and Loaded's methods over them

tests/unit/test_fake_dataplane.py holds the fake to the product's numpy views and
conventions; tests/bpf/test_layouts.py holds it to BCC's classes of a real compile.
"""
