"""Distinct ids of a batch in first-occurrence order, with each id's index among them, and the
two batch splits built on it (a forward's misses, a backward's updates of rows not resident).

For tables of up to ``MAX_MARKED_ROWS`` rows a zero-filled mark array (one int32 per row;
pages never touched cost nothing) turns each into one linear kernel pass; larger or sparse id
spaces fall back to a sort (np.unique), measured ~6x slower on a 80k-id batch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tierstore.optim import kernels

MAX_MARKED_ROWS = 1 << 24  # 64 MiB of marks at most


_EMPTY = np.empty(0, dtype=np.int64)


class Misses(NamedTuple):
    """A batch's split for the policy (:meth:`RowMarks.split_misses`)."""

    at: np.ndarray  # int64: batch indices of the ids not resident
    rows: np.ndarray  # int64: those ids, distinct, first-occurrence order
    where: np.ndarray  # int64: index of each missing id (``at``) in ``rows``
    hit_slots: np.ndarray  # int64: distinct slots hit, first-occurrence order (if tracked)


class AwayUpdates(NamedTuple):
    """A batch's update contributions to rows not resident (:meth:`RowMarks.away_updates`)."""

    rows: np.ndarray  # int64: distinct ids not resident, first-occurrence order
    at: np.ndarray  # int64: per contribution, its row's index in ``rows``
    src: np.ndarray  # int64: per contribution, its gradient row
    scale: np.ndarray  # float32: per contribution, its scale (empty: 1)


class RowMarks:
    """Scratch for :meth:`first_occurrence` over ids in [0, num_rows)."""

    def __init__(self, num_rows: int, dense: bool) -> None:
        self._mark = (np.zeros(num_rows, dtype=np.int32)
                      if dense and num_rows <= MAX_MARKED_ROWS else None)

    def first_occurrence(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distinct ids in first-occurrence order, index of each input id in them)."""
        if self._mark is None:
            u, first, inv = np.unique(ids, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")
            rank = np.empty(len(u), dtype=np.int64)
            rank[order] = np.arange(len(u))
            return u[order], rank[inv]
        rows = np.empty(len(ids), dtype=np.int64)
        idx = np.empty(len(ids), dtype=np.int64)
        u = kernels.first_occurrence(np.ascontiguousarray(ids, dtype=np.int64), self._mark,
                                     rows, idx)
        return rows[:u], idx

    def split_misses(self, ids: np.ndarray, pos: np.ndarray, slot_mark: np.ndarray,
                     track_hits: bool) -> Misses:
        """Split a batch of ``ids`` (int64, in range) with slab positions ``pos`` (int64, 0 =
        not resident) for the policy; ``slot_mark`` is the slab's scratch (uint8, a bit per
        position, all 0), left as it was. Hit slots are listed only if ``track_hits``."""
        n = len(ids)
        if self._mark is None:
            miss = pos == 0
            at = np.flatnonzero(miss)
            rows, where = self.first_occurrence(ids[at])
            hits = _EMPTY
            if track_hits:
                hit_pos = pos[~miss]
                out = np.empty(len(hit_pos), dtype=np.int64)
                hits = out[:kernels.distinct_positions(hit_pos, slot_mark, out)] - 1
            return Misses(at, rows, where, hits)
        at, rows, where = (np.empty(n, dtype=np.int64) for _ in range(3))
        hits = np.empty(n if track_hits else 0, dtype=np.int64)
        n_at, n_rows, n_hit = kernels.split_misses(ids, pos, self._mark, slot_mark, track_hits,
                                                   at, rows, where, hits)
        return Misses(at[:n_at], rows[:n_rows], where[:n_at], hits[:n_hit])

    def away_updates(self, ids: np.ndarray, pos: np.ndarray, src: np.ndarray,
                     scale: np.ndarray) -> AwayUpdates:
        """The update contributions (``scale[i] * grad[src[i]]`` to id ``ids[i]`` at slab
        position ``pos[i]``; ``scale`` float32, empty for 1) whose position is 0 (not
        resident), listed by distinct row in first-occurrence order."""
        if self._mark is None:
            away = pos == 0
            rows, at = self.first_occurrence(ids[away])
            return AwayUpdates(rows, at, src[away], scale[away] if len(scale) else scale)
        n = len(ids)
        rows, at, away_src = (np.empty(n, dtype=np.int64) for _ in range(3))
        away_sc = np.empty(n if len(scale) else 0, dtype=np.float32)
        n_away, n_rows = kernels.away_updates(ids, pos, src, scale, self._mark, rows, at,
                                              away_src, away_sc)
        return AwayUpdates(rows[:n_rows], at[:n_away], away_src[:n_away],
                           away_sc[:n_away] if len(scale) else away_sc)
