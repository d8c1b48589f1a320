"""The neighbour keeper's netlink parsing, on dump replies built here (no root)."""

import socket
import struct

import pytest

from zfast.dataplane import neighbours as nb


def neighbour(family: int, ifindex: int, state: int, dst: bytes, lladdr: bytes = b"\2" * 6):
    body = nb._NDMSG.pack(family, ifindex, state, 0, 1)
    body += nb._attr(2, lladdr) + nb._attr(nb.NDA_DST, dst)   # NDA_LLADDR first, as the kernel
    return nb._message(nb.RTM_NEWNEIGH, 2, 7, body)


def test_a_dump_gives_family_ifindex_state_and_destination():
    v4, v6 = socket.inet_aton("10.0.0.2"), socket.inet_pton(socket.AF_INET6, "fd00::2")
    data = (neighbour(socket.AF_INET, 3, nb.NUD_STALE, v4)
            + neighbour(socket.AF_INET6, 4, 0x02, v6)
            + nb._message(nb.NLMSG_DONE, 2, 7, b"\0" * 4))
    entries, done = nb.parse_neighbours(data)
    assert entries == [(socket.AF_INET, 3, nb.NUD_STALE, v4), (socket.AF_INET6, 4, 0x02, v6)]
    assert done


def test_a_dump_that_goes_on_is_not_done():
    entries, done = nb.parse_neighbours(neighbour(socket.AF_INET, 3, 0x40, b"\1\2\3\4"))
    assert len(entries) == 1 and not done


def test_an_error_ack_raises_and_a_zero_one_does_not():
    ack = nb._message(nb.NLMSG_ERROR, 0, 7, struct.pack("=i", 0) + b"\0" * 16)
    assert nb.parse_neighbours(ack) == ([], False)
    nack = nb._message(nb.NLMSG_ERROR, 0, 7, struct.pack("=i", -2) + b"\0" * 16)
    with pytest.raises(FileNotFoundError):
        nb.parse_neighbours(nack)


def test_an_entry_without_a_destination_is_left_out():
    body = nb._NDMSG.pack(socket.AF_INET, 3, nb.NUD_STALE, 0, 1) + nb._attr(2, b"\2" * 6)
    assert nb.parse_neighbours(nb._message(nb.RTM_NEWNEIGH, 2, 7, body)) == ([], False)
