"""Field kinds: what one value of the project file may be, and what it reads as.

A scalar kind's ``parse`` turns a value of the file into what the dataclasses hold (an int,
an address, a network) or raises ``Bad`` with the words that follow the value in the
problem line; ``read`` files that problem and gives ``failed`` instead. ``describe`` is the
kind in the reference (docs/configuration.md). Mappings and lists of items are
zfast/config/schema.py's.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Union

from zfast.config.hostnames import host_problem, normal_host
from zfast.config.problems import Problems
from zfast.core.cgroups import parse_size  # the one size syntax: the cgroup limits'

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN + r"\Z")
_IFNAMSIZ = 16  # Linux: names are at most 15 bytes plus the NUL
BPF_MAP_LIMIT = 2**31 - 1  # keep sizes well inside max_entries (a u32)


class Bad(Exception):
    """A value a kind refuses; the text is why, as the problem line puts it after the value."""


class Kind(ABC):
    failed: Any = None   # what a bad value (or a missing required one) reads as

    @abstractmethod
    def read(self, problems: Problems, path: str, value: Any, **context: Any) -> Any:
        """The value as the dataclasses hold it; ``failed`` after filing why not.
        ``context``: what a section's reader needs from outside it (schema.Section)."""

    @abstractmethod
    def describe(self) -> str:
        """The kind in the reference's words."""


class Scalar(Kind):
    """A kind of one value, judged whole: ``parse`` converts it or raises Bad."""

    def read(self, problems, path, value, **context):
        try:
            return self.parse(value)
        except Bad as bad:
            problems.add(path, value, str(bad))
            return self.failed

    @abstractmethod
    def parse(self, value: Any) -> Any:
        """The value converted, or Bad."""


class Text(Scalar):
    def parse(self, value):
        if not isinstance(value, str) or not value:
            raise Bad("is not a non-empty string")
        return value

    def describe(self):
        return "string"


class Name(Scalar):
    def parse(self, value):
        if not is_name(value):
            raise Bad(f"is not a name ({NAME_PATTERN})")
        return value

    def describe(self):
        return "name (letters, digits, `_ . -`)"


class Integer(Scalar):
    def __init__(self, low: int = 0, high: int = BPF_MAP_LIMIT):
        self.low, self.high = low, high

    def parse(self, value):
        if not is_int(value):  # YAML's true/false are not numbers, whatever Python says
            raise Bad("is not an integer")
        if not self.low <= value <= self.high:
            raise Bad(f"is out of range ({self.low}-{self.high})")
        return value

    def describe(self):
        return f"integer {self.low}-{self.high}"


class Number(Scalar):
    """An integer or a decimal number, read as a float."""

    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def parse(self, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Bad("is not a number")
        if not self.low <= value <= self.high:
            raise Bad(f"is out of range ({self.low:g}-{self.high:g})")
        return float(value)

    def describe(self):
        return f"number {self.low:g}-{self.high:g}"


class Port(Scalar):
    def parse(self, value):
        if not is_int(value) or not 1 <= value <= 65535:
            raise Bad("is not a port (1-65535)")
        return value

    def describe(self):
        return "port 1-65535"


class Choice(Scalar):
    def __init__(self, choices: tuple[str, ...]):
        self.choices = choices

    def parse(self, value):
        if value not in self.choices:
            raise Bad(f"is not one of {', '.join(self.choices)}")
        return value

    def describe(self):
        return "one of " + ", ".join(f"`{c}`" for c in self.choices)


class Flag(Scalar):
    def parse(self, value):
        if not isinstance(value, bool):
            raise Bad("is not true or false")
        return value

    def describe(self):
        return "true or false"


class Refined(Scalar):
    """A kind with one more rule: ``test`` of the parsed value, else Bad(``why``)."""

    def __init__(self, kind: Scalar, test: Callable[[Any], bool],
                 why: str | Callable[[Any], str], described: str):
        self.kind, self.test, self.why, self.described = kind, test, why, described

    def parse(self, value):
        parsed = self.kind.parse(value)
        if not self.test(parsed):
            raise Bad(self.why(parsed) if callable(self.why) else self.why)
        return parsed

    def describe(self):
        return f"{self.kind.describe()}, {self.described}"


class Checked(Scalar):
    """A value judged by a parser of its own module (ValueError or TypeError says why);
    kept as given."""

    def __init__(self, check: Callable[[Any], Any], described: str):
        self.check, self.described = check, described

    def parse(self, value):
        try:
            self.check(value)
        except (ValueError, TypeError) as err:
            raise Bad(str(err)) from None
        return value

    def describe(self):
        return self.described


class Address(Scalar):
    """A usable unicast address (of a VIP, a backend, a peer, ...), of one family if given."""

    def __init__(self, what: str, version: int | None = None):
        self.what, self.version = what, version

    def parse(self, value):
        family = f"an IPv{self.version} address" if self.version else "an IP address"
        try:
            # A string only: ip_address() would also take an int, which YAML gives for 123.
            address = ipaddress.ip_address(value) if isinstance(value, str) else None
        except ValueError:
            address = None
        if address is None or (self.version and address.version != self.version):
            raise Bad(f"is not {family}")
        unusable = unusable_reason(address)
        if unusable:
            raise Bad(f"is {unusable}, not a usable {self.what} address")
        return address

    def describe(self):
        return f"IPv{self.version} address" if self.version else "IP address"


class Cidr(Scalar):
    """A network without host bits, as firewall lists give them."""

    def parse(self, value):
        if not isinstance(value, str):
            raise Bad("is not a CIDR (like 198.51.100.0/24)")
        try:
            return plain_v4_network(value) or ipaddress.ip_network(value, strict=True)
        except ValueError as err:
            raise Bad(_network_problem(value, err, "a CIDR (like 198.51.100.0/24 or "
                                                  "2001:db8::/32)")) from None

    def describe(self):
        return "CIDR"


class Subnet(Scalar):
    """A network of one family without host bits, at most ``max_prefix`` long."""

    def __init__(self, version: int, example: str, max_prefix: int | None = None):
        self.version, self.example, self.max_prefix = version, example, max_prefix

    def parse(self, value):
        what = f"an IPv{self.version} subnet (like {self.example})"
        if not isinstance(value, str):
            raise Bad(f"is not {what}")
        network_class = ipaddress.IPv4Network if self.version == 4 else ipaddress.IPv6Network
        try:
            network = network_class(value, strict=True)
        except ValueError as err:
            raise Bad(_network_problem(value, err, what)) from None
        if self.max_prefix is not None and network.prefixlen > self.max_prefix:
            raise Bad(f"is too small: it needs room for addresses (a /{self.max_prefix} "
                      "or larger)")
        return network

    def describe(self):
        limit = f", /{self.max_prefix} or larger" if self.max_prefix is not None else ""
        return f"IPv{self.version} subnet{limit}"


class Size(Scalar):
    """Bytes: an integer, or a number with Ki, Mi, Gi, K, M or G (as the cgroup limits)."""

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def parse(self, value):
        try:
            size = parse_size(value) if is_int(value) or isinstance(value, str) else None
        except ValueError:
            size = None
        if size is None:
            raise Bad("is not a size (bytes, or a number with Ki, Mi, Gi, K, M or G)")
        if not self.low <= size <= self.high:
            raise Bad(f"is out of range ({show_size(self.low)}-{show_size(self.high)})")
        return size

    def describe(self):
        return f"size {show_size(self.low)}-{show_size(self.high)} (bytes, or with Ki, Mi, Gi)"


class Host(Scalar):
    """A host of routing.domains (zfast/config/hostnames.py), as the router keys it."""

    def parse(self, value):
        why = host_problem(value)
        if why:
            raise Bad(why)
        return normal_host(value)

    def describe(self):
        return "DNS name, or `*.` and a DNS name"


class ReadableFile(Scalar):
    """A path to a readable file, checked where the file is read (best absolute)."""

    def parse(self, value):
        path = Text().parse(value)
        file = Path(path)
        if not file.exists():
            raise Bad("does not exist")
        if not file.is_file():
            raise Bad("is not a file")
        if not os.access(file, os.R_OK):
            raise Bad("is not readable")
        return path

    def describe(self):
        return "path of a readable file"


class MinMax(Kind):
    """``[min, max]``, each of ``item``, min not above max."""

    def __init__(self, item: Kind):
        self.item = item

    def read(self, problems, path, value, **context):
        if not isinstance(value, list) or len(value) != 2:
            problems.add(path, value, "is not a [min, max] pair")
            return None
        low, high = (self.item.read(problems, f"{path}[{i}]", v) for i, v in enumerate(value))
        if low is None or high is None:
            return None
        if low > high:
            problems.add(path, value, "has its min above its max")
            return None
        return low, high

    def describe(self):
        return f"[min, max] of {self.item.describe()}"


# ---- the tests kinds are made of ----------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_name(value: Any) -> bool:
    return isinstance(value, str) and _NAME_RE.match(value) is not None


def is_interface_name(name: str) -> bool:
    """What Linux accepts as a device name (dev_valid_name)."""
    return (0 < len(name.encode()) < _IFNAMSIZ and name not in (".", "..")
            and not any(c in "/:" or c.isspace() for c in name))


INTERFACE_NAME = Refined(Text(), is_interface_name,
                         "is not an interface name (1-15 characters, no '/', ':' or spaces)",
                         "1-15 characters, no '/', ':' or spaces")


def unusable_reason(address: IPAddress) -> str | None:
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "the unspecified address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if getattr(address, "scope_id", None):
        return "scoped to a link"
    return None


def _network_problem(value: str, err: ValueError, what: str) -> str:
    try:
        loose = ipaddress.ip_network(value, strict=False)
    except ValueError:
        loose = None
    if loose is not None and "host bits set" in str(err):
        return f"has host bits set (the network is {loose})"
    return f"is not {what}"


_PLAIN_V4_CIDR = re.compile(r"((?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3})/(0|[1-9][0-9]?)\Z")


def plain_v4_network(value: str) -> IPNetwork | None:
    """The network of a plain "a.b.c.d/n" without host bits, parsed by the C library
    rather than ipaddress's string parser (100,000 firewall rules: most of parse()'s
    time); None for anything else, which ip_network() then judges and explains."""
    m = _PLAIN_V4_CIDR.match(value)
    if m is None:
        return None
    try:
        number = int.from_bytes(socket.inet_aton(m.group(1)), "big")  # refuses an octet > 255
    except OSError:
        return None
    prefix = int(m.group(2))
    if prefix > 32 or number & ((1 << (32 - prefix)) - 1):
        return None
    return ipaddress.IPv4Network((number, prefix))


def show_size(size: int) -> str:
    """Bytes the way the file gives them: 256Mi, 1Gi, else the number."""
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
