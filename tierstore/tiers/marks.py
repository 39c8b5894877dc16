"""Distinct ids of a batch in first-occurrence order, with each id's index among them.

For tables of up to ``MAX_MARKED_ROWS`` rows a zero-filled mark array (one int32 per row;
pages never touched cost nothing) turns this into one linear kernel pass; larger or sparse id
spaces fall back to a sort (np.unique), measured ~6x slower on a 80k-id batch.
"""

from __future__ import annotations

import numpy as np

from tierstore.optim import kernels

MAX_MARKED_ROWS = 1 << 24  # 64 MiB of marks at most


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
