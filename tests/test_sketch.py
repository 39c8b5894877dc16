"""The count-min sketch's batch increment (a numba kernel) against a plain numpy statement of
its semantics: each of a row's 4 nibble counters +1, saturating at 15, every counter of the
batch read before any is written (a counter shared within a batch is raised once)."""

import numpy as np
import pytest

from tierstore.cache.sketch import SKETCH_HASHES, CountMinSketch, row_hashes


def numpy_increment(sketch: CountMinSketch, rows: np.ndarray) -> None:
    counter = ((row_hashes(rows)[:SKETCH_HASHES] * np.uint64(sketch.width)) >> np.uint64(32)) \
        .astype(np.int64) + (np.arange(SKETCH_HASHES) * sketch.width)[:, None]
    byte, shift = (counter >> 1).ravel(), ((counter & 1) << 2).ravel()
    table = sketch._table
    for nibble in (0, 4):
        b = byte[shift == nibble]
        old = table[b]
        up = ((old >> nibble) & 15) < 15
        table[b[up]] = old[up] + np.uint8(1 << nibble)


@pytest.mark.parametrize("width", [2, 64, 1001, 100_000])
def test_batch_increment_matches_numpy_semantics(width):
    rng = np.random.default_rng(width)
    got, want = CountMinSketch(width, 10**9), CountMinSketch(width, 10**9)
    for _ in range(200):
        rows = rng.integers(0, 10**6, rng.integers(2, 3000))
        got.increment(rows)
        numpy_increment(want, rows)
        assert np.array_equal(got._table, want._table)
    assert got._table.max() > 0


def test_shared_counter_raised_once_per_batch_and_saturates():
    s = CountMinSketch(64, 10**9)
    row = np.array([12345] * 7, dtype=np.int64)
    s.increment(row)
    assert s.estimate(row[:1])[0] == 1
    for _ in range(40):
        s.increment(row)
    assert s.estimate(row[:1])[0] == 15


def test_batch_estimate_is_the_smallest_counter():
    rng = np.random.default_rng(5)
    s = CountMinSketch(500, 10**9)
    for _ in range(30):
        s.increment(rng.integers(0, 3000, 400))
    rows = rng.integers(0, 3000, 1000)
    counter = ((row_hashes(rows)[:SKETCH_HASHES] * np.uint64(s.width)) >> np.uint64(32)) \
        .astype(np.int64) + (np.arange(SKETCH_HASHES) * s.width)[:, None]
    want = ((s._table[counter >> 1] >> ((counter & 1) << 2)) & 15).min(axis=0)
    got = s.estimate(rows)
    np.testing.assert_array_equal(got, want)
    assert [s.estimate_one(r) for r in rows[:50]] == got[:50].tolist()
    assert got.max() > 0
