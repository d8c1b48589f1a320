"""The test suite: unit/, bpf/, e2e/ (each marks its tests in its conftest.py), and what
they share: fixtures/ (packets), fakes/ (a data plane without a kernel)."""
