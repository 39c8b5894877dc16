"""The policy of a cache that can hold every row of its table: row r lives in slot r, nothing
is ever evicted. The DDR tier uses it when capacity >= num_rows (and then loads every row at
once, see DDRCache.full_table), so the all-in-DRAM path pays nothing for recency or frequency
bookkeeping and needs no index lookup: a row's position is its id + 1."""

from __future__ import annotations

import numpy as np

from tierstore.cache.base import Admission, CachePolicy


class AdmitAll(CachePolicy):
    """Identity placement: ``access`` admits every missing row into the slot equal to its id.

    Raises ValueError if a row id is not below ``capacity`` (the tier only uses this policy
    for dense tables with capacity >= num_rows)."""

    name = "admit_all"
    tracks_hits = False

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        slots = np.asarray(miss_rows, dtype=np.int64)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.capacity):
            raise ValueError(f"admit_all places row r in slot r: rows must be in "
                             f"[0, {self.capacity}), got {slots.min()}..{slots.max()}")
        return Admission(np.ones(len(slots), dtype=bool), slots)

    def release(self, slots: np.ndarray) -> None:
        """Nothing to do: a slot belongs to its row."""

    def reset(self) -> None:
        """Nothing to forget."""

    def metadata_bytes(self) -> int:
        return 0
