"""Maglev table: weights, minimal disruption, determinism, speed."""

import hashlib
import random
import time

import numpy as np
import pytest

from zfast.reconcile.maglev import DEFAULT_SIZE, build_table, is_prime, next_prime, table_shares


def addresses(n):
    return [f"10.1.{i // 256}.{i % 256}" for i in range(n)]


def assert_shares_follow_weights(backends, size=DEFAULT_SIZE):
    table = build_table(backends, size)
    assert table.dtype == np.uint32 and len(table) == size
    weights = np.array([weight for _, weight in backends])
    shares = table_shares(table, len(backends))
    assert np.all(np.abs(shares - weights / weights.sum()) <= 0.01), shares


@pytest.mark.parametrize("weights", [(1, 1, 2), (1, 2, 3, 4), (1, 65535), (7,)])
def test_shares_follow_weights(weights):
    assert_shares_follow_weights(list(zip(addresses(len(weights)), weights)))


@pytest.mark.parametrize("seed", range(10))
def test_shares_follow_random_weights(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 200)
    weights = [rng.randint(0, 100) for _ in range(n)]
    weights[0] = max(weights[0], 1)  # at least one backend takes part
    assert_shares_follow_weights(list(zip(addresses(n), weights)))


def test_weight_zero_gets_no_entries():
    table = build_table([("a", 1), ("drained", 0), ("b", 1)], 101)
    assert 1 not in table
    assert set(table.tolist()) == {0, 2}


def test_table_is_within_one_entry_of_exact_share():
    backends = list(zip(addresses(4), (1, 2, 3, 4)))
    counts = np.bincount(build_table(backends, 1009), minlength=4)
    assert np.all(np.abs(counts - 1009 * np.array([1, 2, 3, 4]) / 10) <= 1)


def changed_fraction(before_keys, before, after_keys, after):
    """Fraction of slots whose backend key differs between two tables."""
    return np.mean(np.asarray(before_keys)[before] != np.asarray(after_keys)[after])


@pytest.mark.parametrize("n", [3, 5, 10, 100])
def test_removing_one_backend_moves_little(n):
    keys = addresses(n)
    before = build_table([(key, 1) for key in keys])
    for removed in range(0, n, max(1, n // 5)):
        rest = keys[:removed] + keys[removed + 1:]
        after = build_table([(key, 1) for key in rest])
        assert changed_fraction(keys, before, rest, after) <= 1 / n + 0.01


def test_listing_order_does_not_matter():
    backends = list(zip(addresses(20), range(1, 21)))
    shuffled = backends[:]
    random.Random(1).shuffle(shuffled)
    keys = [key for key, _ in backends]
    shuffled_keys = [key for key, _ in shuffled]
    assert changed_fraction(keys, build_table(backends), shuffled_keys,
                            build_table(shuffled)) == 0


def test_same_input_same_table():
    backends = list(zip(addresses(50), range(1, 51)))
    assert np.array_equal(build_table(backends), build_table(backends))


def test_fixed_fingerprint():
    # Two nodes of an HA pair must agree, across versions too: a change here is a change of
    # algorithm (and moves flows during a rolling upgrade). Update only on purpose.
    table = build_table([("10.1.0.1", 1), ("10.1.0.2", 2), ("10.1.0.3", 3)])
    assert hashlib.sha256(table.astype("<u4").tobytes()).hexdigest() == (
        "f10838d2135168ea53011d232a1d40f11219703d9d1e0269c0fbfe6057d6ea43")
    assert build_table([("a", 1), ("b", 1), ("c", 2)], 13).tolist() == [
        0, 0, 2, 2, 2, 2, 1, 1, 0, 2, 2, 2, 1]


def test_primes():
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert is_prime(65537) and is_prime(1_000_003)
    assert not is_prime(65536) and not is_prime(1_000_001) and not is_prime(-7)
    assert next_prime(65536) == 65537
    assert next_prime(65537) == 65537
    assert next_prime(1_000_000) == 1_000_003
    assert next_prime(0) == 2


@pytest.mark.parametrize("backends, size", [
    ([], DEFAULT_SIZE),                          # nothing to balance to
    ([("a", 0), ("b", 0)], DEFAULT_SIZE),        # all drained
    ([("a", 1)], 65536),                         # size not prime
    ([("a", 1)], 1),
    ([("a", 1), ("a", 2)], DEFAULT_SIZE),        # same key twice
    ([("a", -1)], DEFAULT_SIZE),
    ([("a", True)], DEFAULT_SIZE),
    ([("a", 1.5)], DEFAULT_SIZE),
    ([(1, 1)], DEFAULT_SIZE),
    ([("a", 1), ("b", 1), ("c", 1)], 2),         # more backends than slots
])
def test_errors(backends, size):
    with pytest.raises(ValueError):
        build_table(backends, size)


def test_thousand_backends_build_fast():
    backends = list(zip(addresses(1000), [1, 2, 3, 4] * 250))
    start = time.perf_counter()
    table = build_table(backends)
    assert time.perf_counter() - start < 2
    assert len(np.unique(table)) == 1000


def test_large_table():
    table = build_table(list(zip(addresses(100), range(1, 101))), 1_000_003)
    assert len(table) == 1_000_003
    deviation = table_shares(table, 100) - np.arange(1, 101) / 5050
    assert np.all(np.abs(deviation) <= 0.001)
