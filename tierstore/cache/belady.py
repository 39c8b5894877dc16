"""Belady's offline optimal replacement (MIN with bypass), for evaluation only."""

from __future__ import annotations

import numpy as np

from .base import Admission, CachePolicy
from .slots import (
    EMPTY_SLOTS,
    INT64_MAX,
    FreeSlots,
    VictimPool,
    as_index,
    default_pool_size,
    pin_for_batch,
    unpin_after_batch,
)


def next_use_positions(ids: np.ndarray) -> np.ndarray:
    """int64[n]: for each position p, the next position holding the same id.

    A position whose id never comes back gets ``n + p``: later than every real use, and still
    distinct per position so that a slot's next-use time never repeats.
    """
    ids = as_index(ids)
    n = len(ids)
    nxt = np.arange(n, 2 * n, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    same = ids[order[1:]] == ids[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class BeladyPolicy(CachePolicy):
    """Evict the resident row whose next use is farthest; bypass rows used even later.

    ``future`` is the whole id sequence in access order and ``batch`` the number of trace
    entries per :meth:`access` call (the last call may get fewer), so the policy knows where
    in the trace each batch is. A row's next use after a batch is its first occurrence after
    the batch. Within a batch the misses with the nearest next use are matched with free
    slots and then with the residents used farthest in the future (the optimal choice, which
    for batch 1 is plain Belady/MIN): a miss is admitted only if it is used again before the
    row it would replace. Raises ValueError if a batch does not match the future trace.
    """

    name = "belady"

    def __init__(
        self,
        capacity: int,
        *,
        future: np.ndarray,
        batch: int = 1,
        pool_size: int | None = None,
    ) -> None:
        super().__init__(capacity)
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self._future = as_index(future).ravel()
        self._next_use = next_use_positions(self._future)
        self.batch = int(batch)
        self._cursor = 0
        self._next = np.full(self.capacity, -1, dtype=np.int64)  # -1: free slot
        self._rows = np.full(self.capacity, -1, dtype=np.int64)
        self._free = FreeSlots(self.capacity)
        self._pool = VictimPool(
            self._key_of, self._all_keys, pool_size or default_pool_size(self.capacity)
        )

    def _key_of(self, slots: np.ndarray) -> np.ndarray:
        return -self._next[slots]

    def _all_keys(self) -> np.ndarray:
        return np.where(self._next >= 0, -self._next, INT64_MAX)

    def _next_uses(self, hit_rows: np.ndarray, miss_rows: np.ndarray) -> np.ndarray:
        """Next use after the current batch of each row (hits then misses); advances the cursor."""
        start = self._cursor
        if start >= len(self._future):
            raise ValueError("more batches than the future trace holds")
        stop = min(start + self.batch, len(self._future))
        self._cursor = stop
        if stop - start == 1:  # one access: no sorting needed
            rows = hit_rows if len(hit_rows) else miss_rows
            if len(hit_rows) + len(miss_rows) != 1 or rows[0] != self._future[start]:
                raise ValueError("batch rows do not match the future trace")
            return self._next_use[start:stop]
        ids = self._future[start:stop]
        nxt = self._next_use[start:stop]
        last = nxt >= stop  # the last occurrence of each distinct id in the batch
        ids, nxt = ids[last], nxt[last]
        rows = np.concatenate([hit_rows, miss_rows])
        if len(rows) != len(ids):
            raise ValueError(f"batch has {len(rows)} distinct rows, the future trace {len(ids)}")
        order = np.argsort(ids, kind="stable")
        at = np.searchsorted(ids[order], rows)
        at = np.minimum(at, len(ids) - 1)
        if not np.array_equal(ids[order][at], rows):
            raise ValueError("batch rows do not match the future trace")
        return nxt[order][at]

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        hit_slots = as_index(hit_slots)
        miss_rows = as_index(miss_rows)
        n_hit, m = len(hit_slots), len(miss_rows)
        nxt = self._next_uses(self._rows[hit_slots], miss_rows)
        if n_hit:
            self._next[hit_slots] = nxt[:n_hit]
            self._pool.offer(hit_slots)
        admit = np.zeros(m, dtype=bool)
        if m == 0:
            return Admission(admit=admit, slots=EMPTY_SLOTS.copy())
        miss_next = nxt[n_hit:]
        by_next = np.argsort(miss_next, kind="stable") if m > 1 else np.zeros(1, np.int64)
        free = self._free.take(m, self.pinned)
        previous = pin_for_batch(self.pinned, hit_slots)
        victims = self._pool.smallest(m - len(free), self.pinned)  # farthest next use first
        unpin_after_batch(self.pinned, hit_slots, previous)
        contenders = miss_next[by_next[len(free) : len(free) + len(victims)]]
        n_replace = int(np.count_nonzero(contenders < self._next[victims]))
        chosen = by_next[: len(free) + n_replace]
        slots = np.concatenate([free, victims[:n_replace]])
        admit[chosen] = True
        if len(chosen) > 1:  # report slots in the order of miss_rows[admit]
            slots = slots[np.argsort(chosen)]
        self._rows[slots] = miss_rows[admit]
        self._next[slots] = miss_next[admit]
        self._pool.offer(slots)
        return Admission(admit=admit, slots=slots)

    def reset(self) -> None:
        """Empty the cache; the position in the future trace is kept."""
        self._next.fill(-1)
        self._rows.fill(-1)
        self._free.reset()
        self._pool.invalidate()

    def release(self, slots: np.ndarray) -> None:
        slots = np.unique(as_index(slots))
        slots = slots[self._next[slots] >= 0]
        self._next[slots] = -1
        self._rows[slots] = -1
        self._free.give(slots)

    def metadata_bytes(self) -> int:
        return self._next.nbytes + self._rows.nbytes + self.pinned.nbytes + self._pool.nbytes
