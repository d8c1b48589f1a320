"""The exception every part of the haproxy package raises."""


class HAProxyError(Exception):
    """Bad input, a configuration haproxy refuses (its own message), or a failed operation."""
