"""VictimPool: the smallest-key member slots, exact against a brute-force sort, on both of its
rebuild paths (numba radix for unique keys, argpartition + argsort otherwise)."""

import numpy as np
import pytest

from tierstore.cache.slots import INT64_MAX, Stamps, VictimPool, _members_by_key


def test_members_by_key_sorts_members_and_skips_absent():
    rng = np.random.default_rng(0)
    keys = rng.permutation(50_000).astype(np.int64) * 3 + 7
    keys[rng.random(len(keys)) < 0.3] = INT64_MAX
    slots, ordered = _members_by_key(keys, INT64_MAX)
    members = np.flatnonzero(keys != INT64_MAX)
    expect = members[np.argsort(keys[members], kind="stable")]
    np.testing.assert_array_equal(slots, expect)
    np.testing.assert_array_equal(ordered, keys[expect])
    assert len(_members_by_key(np.full(4, INT64_MAX, dtype=np.int64), INT64_MAX)[0]) == 0


class _Segments:
    """Recency-stamped slots in two segments, as the adaptive policy keeps them."""

    def __init__(self, capacity: int, unique_keys: bool, target: int) -> None:
        self.seg = np.zeros(capacity, dtype=np.uint8)
        self.stamps = Stamps(capacity)
        self.pool = VictimPool(self.key_of, self.all_keys, target, unique_keys=unique_keys)

    def key_of(self, slots):
        return self.stamps.values[slots]

    def all_keys(self):
        return np.where(self.seg == 1, self.stamps.values.astype(np.int64), INT64_MAX)

    def place(self, slots, segment):
        self.seg[slots] = segment
        self.stamps.touch(slots)
        if segment == 1:
            self.pool.offer(slots)

    def brute(self, m, blocked):
        members = np.flatnonzero((self.seg == 1) & ~blocked)
        return members[np.argsort(self.stamps.values[members], kind="stable")][:m]


@pytest.mark.parametrize("unique_keys", [True, False])
def test_pool_serves_the_oldest_members_exactly(unique_keys):
    rng = np.random.default_rng(1)
    cap = 3000
    s = _Segments(cap, unique_keys, target=40)
    s.place(np.arange(cap), 1)
    for _ in range(300):
        k = int(rng.integers(1, 400))
        slots = rng.choice(cap, size=k, replace=False)
        s.place(slots, int(rng.integers(1, 3)))  # some leave the pool's segment
        blocked = rng.random(cap) < 0.05
        m = int(rng.integers(1, 600))
        got = s.pool.smallest(m, blocked)
        np.testing.assert_array_equal(got, s.brute(m, blocked))
        s.place(got, 1)  # evicted and refilled: most recent again
