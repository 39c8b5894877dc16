"""The policy of a cache that can hold every row of its table: admit each row into the next
free slot, never evict. The DDR tier uses it when capacity >= num_rows, so the all-in-DRAM path
pays nothing for recency or frequency bookkeeping."""

from __future__ import annotations

import numpy as np

from tierstore.cache.base import Admission, CachePolicy


class AdmitAll(CachePolicy):
    name = "admit_all"
    tracks_hits = False

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int32)  # a stack; pop from the end
        self.top = capacity

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        k = min(len(miss_rows), self.top)
        slots = self.free[self.top - k: self.top][::-1].astype(np.int64)
        self.top -= k
        admit = np.zeros(len(miss_rows), dtype=bool)
        admit[:k] = True
        return Admission(admit, slots)

    def release(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        self.free[self.top: self.top + len(slots)] = slots
        self.top += len(slots)

    def reset(self) -> None:
        self.free = np.arange(self.capacity - 1, -1, -1, dtype=np.int32)
        self.top = self.capacity

    def metadata_bytes(self) -> int:
        return self.free.nbytes
