"""RowMarks' batch splits: the one-pass kernels equal a plain numpy reference, and the sort
fallback (sparse or huge id spaces) gives the same result."""

import numpy as np
import pytest

from tierstore.tiers.marks import RowMarks


def _batch(seed, n=5000, rows=3000, slots=400):
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.3, n).astype(np.int64) % rows
    resident = rng.permutation(rows)[:slots]
    pos_of = np.zeros(rows, dtype=np.int64)
    pos_of[resident] = np.arange(1, slots + 1)
    return ids, pos_of[ids], rows, slots


def _first_occurrence(values):
    u, first = np.unique(values, return_index=True)
    return u[np.argsort(first, kind="stable")]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("track_hits", [True, False])
def test_split_misses_matches_numpy(dense, track_hits):
    ids, pos, rows, slots = _batch(1)
    mark = np.zeros((slots + 1 + 7) // 8, dtype=np.uint8)
    m = RowMarks(rows, dense).split_misses(ids, pos, mark, track_hits)
    at = np.flatnonzero(pos == 0)
    np.testing.assert_array_equal(m.at, at)
    np.testing.assert_array_equal(m.rows, _first_occurrence(ids[at]))
    np.testing.assert_array_equal(m.rows[m.where], ids[at])
    hits = _first_occurrence(pos[pos > 0]) - 1 if track_hits else np.empty(0)
    np.testing.assert_array_equal(m.hit_slots, hits)
    assert not mark.any()  # scratch left as found
    again = RowMarks(rows, dense).split_misses(ids, pos, mark, track_hits)
    np.testing.assert_array_equal(again.rows, m.rows)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("scaled", [True, False])
def test_away_updates_matches_numpy(dense, scaled):
    ids, pos, rows, _ = _batch(2)
    src = np.random.default_rng(3).integers(0, 64, len(ids))
    scale = (np.random.default_rng(4).random(len(ids)).astype(np.float32) if scaled
             else np.empty(0, dtype=np.float32))
    marks = RowMarks(rows, dense)
    u = marks.away_updates(ids, pos, src, scale)
    away = pos == 0
    np.testing.assert_array_equal(u.rows, _first_occurrence(ids[away]))
    np.testing.assert_array_equal(u.rows[u.at], ids[away])
    np.testing.assert_array_equal(u.src, src[away])
    if scaled:
        np.testing.assert_array_equal(u.scale, scale[away])
    else:
        assert len(u.scale) == 0
    # the marks are clean again: a second split of other ids is unaffected by the first
    u2 = marks.away_updates(ids[::-1].copy(), pos[::-1].copy(), src, scale)
    np.testing.assert_array_equal(u2.rows, _first_occurrence(ids[::-1][pos[::-1] == 0]))
