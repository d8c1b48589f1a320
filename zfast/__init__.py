"""zfast: an eBPF/XDP project balancer with a Python control plane."""

__version__ = "0.1.0"
