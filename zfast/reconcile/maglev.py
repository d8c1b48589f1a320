"""Maglev consistent hashing: the lookup table that picks a backend for a flow.

The data plane hashes a flow's 5-tuple to a slot of a prime-sized table and sends the flow to
the backend stored there. This module builds that table (Eisenbud et al., "Maglev", NSDI 2016):

* Every backend has its own order of preference over all slots, a permutation
  ``slot(j) = (offset + j * skip) mod size`` whose ``offset`` and ``skip`` come from a stable
  hash (blake2b) of the backend's key. ``size`` is prime, so every skip walks every slot.
* Backends take turns; on its turn a backend claims the first slot in its own order that is
  still free. When all slots are claimed the table is done.

Because each backend's preferences do not depend on the others, removing one backend mostly
hands its own slots to the others and leaves the rest where they were (minimal disruption).

Weights: the turns are dealt in weighted fair order. Backend ``i``'s ``k``-th turn comes at
virtual time ``k / weight_i``; turns are taken in order of that time. Every turn claims exactly
one slot, so each backend ends with ``size * weight / total_weight`` slots, give or take one.
Equal times are ordered by key, so the table depends on the set of backends, not on the order
they are listed in.

Determinism: the table depends only on the keys, weights and size (no ``hash()``, no random
state), so the two nodes of an HA pair build identical tables.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from zfast.dataplane.reasons import defines

# numpy (~65 ms) is imported by the functions that build and measure tables (PLC0415
# marks them), not here: the project file's checks, which every zfast command runs,
# import this module for is_prime and next_prime only.
if TYPE_CHECKING:
    import numpy as np

DEFAULT_SIZE = defines()["ZF_RING_SIZE"]   # the C side's default, bpf/zfast_shared.h

# Personalisation of the key hash: changing it would move every backend in every table.
_HASH_PERSON = b"zfast-maglev-v1"


def is_prime(n: int) -> bool:
    """True if n is a prime number (trial division; fine for table sizes)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for divisor in range(3, math.isqrt(n) + 1, 2):
        if n % divisor == 0:
            return False
    return True


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    candidate = max(n, 2)
    while not is_prime(candidate):
        candidate += 1
    return candidate


def build_table(backends: Sequence[tuple[str, int]], size: int = DEFAULT_SIZE) -> np.ndarray:
    """The Maglev table for ``backends``, a sequence of ``(key, weight)``.

    Returns a uint32 array of ``size`` entries, each the index in ``backends`` of the backend
    that owns that slot. Backends of weight 0 own no slot.

    Raises ValueError if ``size`` is not prime, a key is listed twice, a weight is not an
    integer in 0..2**32-1, no backend has a positive weight, or there are more backends with
    a positive weight than slots.
    """
    import numpy as np  # noqa: PLC0415 -- see the top
    if not isinstance(size, int) or isinstance(size, bool) or not is_prime(size):
        raise ValueError(f"table size {size!r} is not a prime number")
    for key, weight in backends:
        if not isinstance(key, str):
            raise ValueError(f"backend key {key!r} is not a string")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight < 2**32:
            raise ValueError(f"backend {key!r}: weight {weight!r} is not an integer >= 0")
    keys = [key for key, _ in backends]
    if len(set(keys)) != len(keys):
        raise ValueError("a backend key is listed twice")

    # Work in key order over the backends that take part, then map back to caller indexes.
    members = sorted((i for i, (_, weight) in enumerate(backends) if weight > 0),
                     key=lambda i: keys[i])
    if not members:
        raise ValueError("no backend with a positive weight")
    if len(members) > size:
        raise ValueError(f"{len(members)} backends do not fit in a table of {size} slots")

    weights = np.array([backends[i][1] for i in members], dtype=np.int64)
    offsets, skips = zip(*(_permutation(keys[i], size) for i in members))
    turns = _turn_order(weights, size)
    owners = _fill(turns, list(offsets), list(skips), size)
    return np.asarray(members, dtype=np.uint32)[owners]


def table_shares(table: np.ndarray, n: int) -> np.ndarray:
    """The fraction of ``table`` owned by each of backends 0..n-1."""
    import numpy as np  # noqa: PLC0415 -- see the top
    return np.bincount(table, minlength=n)[:n] / len(table)


def _permutation(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference order, from a stable hash of its key."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16, person=_HASH_PERSON).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def _turn_order(weights: np.ndarray, size: int) -> np.ndarray:
    """Which backend takes each of the ``size`` turns, in weighted fair order."""
    import numpy as np  # noqa: PLC0415 -- see the top
    n = len(weights)
    total = int(weights.sum())
    # Everyone's turns up to virtual time (size + n) / total: that is at least `size` turns
    # in all (each backend loses less than one to rounding down), so the first `size` are here.
    counts = (size + n) * weights // total
    owner = np.repeat(np.arange(n), counts)
    first_of_owner = np.repeat(np.cumsum(counts) - counts, counts)
    turn_number = np.arange(len(owner)) - first_of_owner + 1
    # float64 division is correctly rounded (IEEE 754), so the times are the same on every
    # machine; equal times fall back to key order.
    time = turn_number / weights[owner]
    by_time_then_key = np.lexsort((owner, time))
    return owner[by_time_then_key[:size]]


def _fill(turns: np.ndarray, offsets: list[int], skips: list[int], size: int) -> np.ndarray:
    """Play the turns: each backend claims the next free slot in its preference order."""
    import numpy as np  # noqa: PLC0415 -- see the top
    owners = [-1] * size
    next_slot = list(offsets)  # per backend: every slot before this one in its order is taken

    # While most slots are free a claim needs few steps, so a plain loop is fastest.
    tail = min(size, 3 * math.isqrt(size))
    for backend in turns[: size - tail].tolist():
        slot, skip = next_slot[backend], skips[backend]
        while owners[slot] >= 0:
            slot += skip
            if slot >= size:
                slot -= size
        owners[slot] = backend
        slot += skip
        next_slot[backend] = slot - size if slot >= size else slot

    # Near the end a claim would step over ~size/free taken slots. Instead, find the free slot
    # that comes first in the backend's order: the one with the smallest position
    # j = (slot - offset) * skip^-1 mod size. All slots before next_slot are taken, so this
    # is exactly the slot the loop above would reach.
    free = np.flatnonzero(np.asarray(owners) < 0)
    inverse_skips = [pow(skip, -1, size) for skip in skips]
    for backend in turns[size - tail:].tolist():
        position = (free - offsets[backend]) % size * inverse_skips[backend] % size
        first = int(position.argmin())
        owners[free[first]] = backend
        free = np.delete(free, first)
    return np.asarray(owners, dtype=np.int64)
