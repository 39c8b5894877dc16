"""Least-frequently-used eviction with periodically halved counts."""

from __future__ import annotations

import numpy as np

from .base import Admission, CachePolicy
from .slots import (
    EMPTY_SLOTS,
    INT64_MAX,
    FreeSlots,
    Stamps,
    VictimPool,
    admit_first,
    as_index,
    default_pool_size,
    pin_for_batch,
    unpin_after_batch,
)

MAX_COUNT = np.iinfo(np.uint16).max


class LFUPolicy(CachePolicy):
    """Classic in-cache LFU: evict the cached row used least often; ties go to the oldest.

    Every missing row is admitted (with count 1) while room allows; only resident rows have
    counts, so a row's history is forgotten when it is evicted. Each hit adds 1 to the slot's
    count (saturating at 65535).

    Decay: after every ``decay_period`` accesses (distinct ids per batch, hits and misses;
    default ``10 * capacity``, the TinyLFU sample length) all counts are halved, rounding
    down, at the end of the batch. Without decay, rows that were popular long ago can never be
    evicted; halving keeps the counts about the last few periods.

    State: uint16 count + int32 recency stamp per slot (6 bytes/slot). The eviction order is the
    key ``count << 32 | stamp``, served by a :class:`~tierstore.cache.slots.VictimPool` to which
    every changed slot is offered (a hit can leave a slot with a small count).
    """

    name = "lfu"

    def __init__(
        self, capacity: int, *, decay_period: int | None = None, pool_size: int | None = None
    ) -> None:
        super().__init__(capacity)
        self.decay_period = int(decay_period or 10 * self.capacity)
        if self.decay_period <= 0:
            raise ValueError(f"decay_period must be positive, got {decay_period}")
        self._counts = np.zeros(self.capacity, dtype=np.uint16)
        self._stamps = Stamps(self.capacity)
        self._free = FreeSlots(self.capacity)
        self._pool = VictimPool(
            self._key_of, self._all_keys, pool_size or default_pool_size(self.capacity)
        )
        self._since_decay = 0

    def _key_of(self, slots: np.ndarray) -> np.ndarray:
        if isinstance(slots, np.integer):  # one slot: plain ints are much faster
            return (int(self._counts[slots]) << 32) | int(self._stamps.values[slots])
        return (self._counts[slots].astype(np.int64) << 32) | self._stamps.values[slots]

    def _all_keys(self) -> np.ndarray:
        keys = (self._counts.astype(np.int64) << 32) | self._stamps.values
        keys[self._stamps.values < 0] = INT64_MAX
        return keys

    def _touch(self, slots: np.ndarray) -> None:
        if self._stamps.touch(slots):
            self._pool.invalidate()

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        hit_slots = as_index(hit_slots)
        m = len(miss_rows)
        if len(hit_slots):
            counts = self._counts[hit_slots]
            self._counts[hit_slots] = counts + (counts < MAX_COUNT)
            self._touch(hit_slots)
            self._pool.offer(hit_slots)
        slots = EMPTY_SLOTS
        if m:
            slots = self._free.take(m, self.pinned)
            if len(slots) < m:
                previous = pin_for_batch(self.pinned, hit_slots)
                victims = self._pool.smallest(m - len(slots), self.pinned)
                unpin_after_batch(self.pinned, hit_slots, previous)
                slots = np.concatenate([slots, victims]) if len(slots) else victims
            self._counts[slots] = 1
            self._touch(slots)
            self._pool.offer(slots)
        self._age(len(hit_slots) + m)
        return admit_first(m, slots)

    def _age(self, accesses: int) -> None:
        self._since_decay += accesses
        if self._since_decay >= self.decay_period:
            self._since_decay %= self.decay_period
            np.right_shift(self._counts, 1, out=self._counts)
            self._pool.invalidate()

    def reset(self) -> None:
        self._counts.fill(0)
        self._stamps.reset()
        self._free.reset()
        self._pool.invalidate()
        self._since_decay = 0

    def release(self, slots: np.ndarray) -> None:
        slots = np.unique(as_index(slots))
        slots = slots[self._stamps.values[slots] >= 0]
        self._counts[slots] = 0
        self._stamps.free(slots)
        self._free.give(slots)

    def metadata_bytes(self) -> int:
        return (
            self._counts.nbytes
            + self._stamps.nbytes
            + self.pinned.nbytes
            + self._pool.nbytes
            + self._free.nbytes
        )
