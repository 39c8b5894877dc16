"""VictimPool: the smallest-key member slots, exact against a brute-force sort, on both of its
rebuild paths (the owner's ordered members, as recency stamps give them; argpartition +
argsort of all keys otherwise)."""

import numpy as np
import pytest

from tierstore.cache.slots import INT64_MAX, Stamps, VictimPool, stamp_order


def test_stamp_order_sorts_the_segment_by_stamp():
    rng = np.random.default_rng(0)
    n = 50_000
    stamps = rng.permutation(n).astype(np.int32) * 3 + 7
    stamps[rng.random(n) < 0.2] = -1  # free slots
    seg = rng.integers(1, 4, n).astype(np.uint8)
    blocked = rng.random(n) < 0.1
    for segment, segs in ((2, seg), (0, np.empty(0, np.uint8))):
        slots, keys, n_blocked = stamp_order(stamps, segs, segment, blocked)
        members = np.flatnonzero((stamps >= 0) & ((seg == segment) if len(segs) else True))
        expect = members[np.argsort(stamps[members], kind="stable")]
        np.testing.assert_array_equal(slots, expect)
        np.testing.assert_array_equal(keys, stamps[expect])
        assert n_blocked == blocked[members].sum()
    none = stamp_order(np.full(4, -1, np.int32), np.empty(0, np.uint8), 0, np.zeros(4, bool))
    assert len(none[0]) == 0 and none[2] == 0


class _Segments:
    """Recency-stamped slots in two segments, as the adaptive policy keeps them."""

    def __init__(self, capacity: int, ordered: bool, target: int) -> None:
        self.seg = np.zeros(capacity, dtype=np.uint8)
        self.stamps = Stamps(capacity)
        self.pool = VictimPool(
            self.key_of, None if ordered else self.all_keys, target,
            ordered_members=(lambda b: stamp_order(self.stamps.values, self.seg, 1, b))
            if ordered else None)

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


@pytest.mark.parametrize("ordered", [True, False])
def test_pool_serves_the_oldest_members_exactly(ordered):
    rng = np.random.default_rng(1)
    cap = 3000
    s = _Segments(cap, ordered, target=40)
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
