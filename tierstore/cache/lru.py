"""Exact least-recently-used eviction."""

from __future__ import annotations

import numpy as np

from .base import Admission, CachePolicy
from .slots import (
    EMPTY_SLOTS,
    FreeSlots,
    Stamps,
    VictimPool,
    admit_first,
    as_index,
    default_pool_size,
    pin_for_batch,
    stamp_order,
    unpin_after_batch,
)

_NO_SEGMENTS = np.empty(0, dtype=np.uint8)


class LRUPolicy(CachePolicy):
    """Evict the least recently used rows; every missing row is admitted while room allows.

    State: one int32 recency stamp per slot (4 bytes/slot). A batch stamps its hit slots (in
    order), then gives the misses free slots first and then the slots with the oldest stamps,
    found through a :class:`~tierstore.cache.slots.VictimPool` (exact: stamps only grow, so the
    snapshot of the oldest slots stays the oldest until it is used up).
    """

    name = "lru"

    def __init__(self, capacity: int, *, pool_size: int | None = None) -> None:
        super().__init__(capacity)
        self._stamps = Stamps(self.capacity)
        self._free = FreeSlots(self.capacity)
        self._pool = VictimPool(
            self._key_of, None, pool_size or default_pool_size(self.capacity),
            ordered_members=lambda blocked: stamp_order(self._stamps.values, _NO_SEGMENTS, 0,
                                                        blocked),
        )

    # -- the victim pool's key: the stamp itself (free slots are not members) --
    def _key_of(self, slots: np.ndarray) -> np.ndarray:
        return self._stamps.values[slots]

    def _touch(self, slots: np.ndarray) -> None:
        if self._stamps.touch(slots):
            self._pool.invalidate()

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        hit_slots = as_index(hit_slots)
        m = len(miss_rows)
        if len(hit_slots):
            self._touch(hit_slots)
        if m == 0:
            return admit_first(0, EMPTY_SLOTS)
        slots = self._free.take(m, self.pinned)
        if len(slots) < m:
            previous = pin_for_batch(self.pinned, hit_slots)
            victims = self._pool.smallest(m - len(slots), self.pinned)
            unpin_after_batch(self.pinned, hit_slots, previous)
            slots = np.concatenate([slots, victims]) if len(slots) else victims
        self._touch(slots)
        return admit_first(m, slots)

    def reset(self) -> None:
        self._stamps.reset()
        self._free.reset()
        self._pool.invalidate()

    def release(self, slots: np.ndarray) -> None:
        slots = np.unique(as_index(slots))
        slots = slots[self._stamps.values[slots] >= 0]
        self._stamps.free(slots)
        self._free.give(slots)

    def metadata_bytes(self) -> int:
        return self._stamps.nbytes + self.pinned.nbytes + self._pool.nbytes + self._free.nbytes
