"""DNS host names, email addresses and http(s) URLs as the project file takes them.

``host_problem`` is the rule of routing.domains[].host (see zfast/config/routing.py):
RFC 1123 labels, at least two, a ``*.`` wildcard only as the whole leftmost label, no IP
address, no port, ASCII only.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Any

from zfast.config.problems import show

_LABEL_RE = re.compile(r"[a-z0-9-]{1,63}\Z")
_EMAIL_LOCAL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}\Z")


def normal_host(value: str) -> str:
    """A host as the routing service keys it: lowercased, one trailing dot dropped."""
    host = value.lower()
    return host[:-1] if host.endswith(".") else host


def host_problem(value: Any) -> str | None:
    """Why ``value`` is not a host of routing.domains, or None."""
    if not isinstance(value, str) or not value:
        return "is not a host name (like app.example.org or *.example.org)"
    if "://" in value:
        return "is a URL, not a host name (give the name only, like app.example.org)"
    name, colon, port = value.rpartition(":")
    with_port = bool(colon and port.isdigit())
    for candidate in (value, name) if with_port else (value,):
        bare = candidate.rstrip(".")
        bare = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
        try:
            ipaddress.ip_address(bare)
            return "is an IP address, not a host name"
        except ValueError:
            pass
    if with_port and ":" not in name:
        return "has a port: a host is a name only (the routing service serves 80 and 443)"
    host = normal_host(value)
    labels = host.split(".")
    if "*" in host:
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            return ("has a '*' that is not the whole leftmost label "
                    "(a wildcard is *. before a name, like *.example.org)")
        labels = labels[1:]
        if len(labels) < 2:
            return ("is not a host name: a wildcard needs a name of at least two labels "
                    "after '*.' (like *.example.org)")
    for label in labels:
        if not label:
            return "is not a host name: it has an empty label"
        if not _LABEL_RE.match(label):
            if len(label) > 63:
                return "is not a host name: a label is longer than 63 characters"
            return (f"is not a host name: label {show(label)} has a character other than "
                    "a-z, 0-9 and '-'")
        if label[0] == "-" or label[-1] == "-":
            return f"is not a host name: label {show(label)} starts or ends with '-'"
    if len(labels) < 2:
        return "is not a host name: it needs at least two labels (like example.org)"
    if labels[-1].isdigit():
        return f"is not a host name: its last label {show(labels[-1])} is all digits"
    if len(host) > 253:
        return "is not a host name: it is longer than 253 characters"
    return None


def is_email(value: str) -> bool:
    local, at, domain = value.rpartition("@")
    return (bool(at) and _EMAIL_LOCAL_RE.match(local) is not None
            and "*" not in domain and not domain.endswith(".")
            and host_problem(domain) is None)


def is_http_url(value: str) -> bool:
    if any(c.isspace() for c in value):
        return False
    try:
        url = urllib.parse.urlsplit(value)
        url.port  # a bad port raises ValueError
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)
