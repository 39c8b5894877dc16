"""Slot bookkeeping shared by the cache policies.

- :class:`Stamps`: an int32 recency stamp per slot (``-1`` = free), renumbered before overflow.
- :class:`FreeSlots`: which slots hold no row (a fill pointer plus a list of released slots), so
  no policy ever scans its slot arrays to find room.
- :class:`VictimPool`: an amortized source of the slots with the smallest eviction key. A policy
  that evicted with an ``argmin`` over all slots would do O(capacity) work per miss; the pool
  instead keeps a sorted snapshot of the few smallest keys and only rescans all slots when the
  snapshot runs dry, so a miss costs O(1) amortized while the choice stays exact.

All of it works on whole numpy arrays or in numba kernels; nothing loops over the ids of a
batch in Python.
"""

from __future__ import annotations

from typing import Callable

import numba
import numpy as np

from tierstore.optim.kernels import bits_for, sort_payloads

from .base import Admission

INT64_MAX = np.iinfo(np.int64).max
EMPTY_SLOTS = np.empty(0, dtype=np.int64)
EMPTY_SLOTS.flags.writeable = False


def as_index(values: np.ndarray) -> np.ndarray:
    """``values`` as an int64 array (no copy when it already is one)."""
    return np.asarray(values, dtype=np.int64)


def admit_first(m: int, slots: np.ndarray) -> Admission:
    """Admission of the first ``len(slots)`` of ``m`` missing rows into ``slots``, in order."""
    admit = np.zeros(m, dtype=bool)
    admit[: len(slots)] = True
    return Admission(admit=admit, slots=np.array(slots, dtype=np.int64))  # a copy for the caller


def distinct_in_order(values: np.ndarray) -> np.ndarray:
    """Distinct values in order of first occurrence."""
    if len(values) <= 1:
        return values
    u, first = np.unique(values, return_index=True)
    return u[np.argsort(first, kind="stable")]


def default_pool_size(capacity: int) -> int:
    """Snapshot size of a :class:`VictimPool`: ~1/64 of the slots, between 32 and 16384."""
    return int(min(16384, max(32, capacity // 64)))


class Stamps:
    """Per-slot int32 recency stamps from a monotone clock; ``FREE`` (-1) marks an empty slot.

    ``touch(slots)`` gives the slots the next stamps, in order. Before the clock would pass
    ``limit`` the occupied stamps are renumbered to ``0..n-1`` (same order) so a long-running
    cache never overflows; ``touch`` then returns True and callers must drop anything that
    cached old stamp values (e.g. call :meth:`VictimPool.invalidate`).
    """

    FREE = -1

    def __init__(self, capacity: int, limit: int = 2**31 - 1) -> None:
        if limit < 2 * capacity:
            raise ValueError(f"stamp limit {limit} must be at least twice the capacity {capacity}")
        self.values = np.full(capacity, self.FREE, dtype=np.int32)
        self.now = 0
        self.limit = int(limit)

    def reset(self) -> None:
        self.values.fill(self.FREE)
        self.now = 0

    def touch(self, slots: np.ndarray) -> bool:
        """Stamp ``slots`` (distinct) as most recent, in order. True if stamps were renumbered."""
        n = len(slots)
        renumbered = False
        if self.now + n > self.limit:
            self._renumber()
            renumbered = True
        if n == 1:
            self.values[slots] = self.now
        else:
            self.values[slots] = np.arange(self.now, self.now + n, dtype=np.int32)
        self.now += n
        return renumbered

    def free(self, slots: np.ndarray) -> None:
        self.values[slots] = self.FREE

    def _renumber(self) -> None:
        occupied = np.flatnonzero(self.values >= 0)
        order = np.argsort(self.values[occupied], kind="stable")
        self.values[occupied[order]] = np.arange(len(occupied), dtype=np.int32)
        self.now = len(occupied)
        if self.now + len(self.values) > self.limit:
            raise OverflowError("stamp limit too small for this capacity")

    @property
    def nbytes(self) -> int:
        return self.values.nbytes


class FreeSlots:
    """The slots that hold no row: never-used slots ``next..capacity-1`` plus released ones.

    The caller keeps it consistent with its own per-slot state: ``give`` only slots that were
    occupied, ``take`` marks the returned slots as occupied from then on.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.reset()

    def reset(self) -> None:
        self._next = 0
        self._released = EMPTY_SLOTS

    def __len__(self) -> int:
        return self.capacity - self._next + len(self._released)

    def take(self, m: int, pinned: np.ndarray) -> np.ndarray:
        """Up to ``m`` free slots that are not ``pinned`` (released ones first); they count as
        occupied afterwards."""
        if m <= 0 or (self._next == self.capacity and not len(self._released)):
            return EMPTY_SLOTS
        parts = []
        if len(self._released):
            usable = np.flatnonzero(~pinned[self._released])[:m]
            parts.append(self._released[usable])
            self._released = np.delete(self._released, usable)
            m -= len(usable)
        while m > 0 and self._next < self.capacity:
            block = np.arange(self._next, min(self.capacity, self._next + m), dtype=np.int64)
            self._next += len(block)
            usable = ~pinned[block]
            if not usable.all():  # pinned while free: keep them for later
                self._released = np.concatenate([self._released, block[~usable]])
                block = block[usable]
            parts.append(block)
            m -= len(block)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else EMPTY_SLOTS

    def give(self, slots: np.ndarray) -> None:
        """These (distinct, previously occupied) slots are free again."""
        if len(slots):
            self._released = np.concatenate([self._released, as_index(slots)])

    @property
    def nbytes(self) -> int:
        return self._released.nbytes


class VictimPool:
    """The member slots with the smallest keys, served in key order at O(1) amortized cost.

    The owner defines the keys through two callables:

    - ``key_of(slots)``: the current int64-comparable key of each slot (also called with a
      single numpy integer). A slot's key must change whenever the slot is touched, moved or
      freed, and must never return to a value it held before (recency stamps and next-use
      positions have this property), so a pool entry is *valid* exactly when its stored key
      still equals ``key_of(slot)``.
    - ``all_keys()``: int64[capacity] with the key of every member slot and ``INT64_MAX`` for
      non-members (free slots, other segments); None when ``ordered_members`` is given.
    - ``ordered_members(blocked)`` (optional): every member slot sorted by key, their keys,
      and how many of them are ``blocked``. Owners whose members never share a key (recency
      stamps: :func:`stamp_order`) give it, so a rebuild is one numba pass and a radix sort;
      any correct sort of unique keys is the order argpartition + stable argsort would give.

    The pool holds a sorted snapshot of at least ``target`` smallest member keys and a
    ``threshold`` such that every member slot not in the snapshot (with its current key) has a
    key >= threshold. Stale entries are skipped lazily. Owners whose keys only grow (recency
    stamps) need nothing else; owners whose keys can drop below the threshold (counts, next-use
    times) must :meth:`offer` the slots whose keys changed. :meth:`smallest` rescans all slots
    (``all_keys``) only when the snapshot has no eligible entry left.

    The snapshot lives in ``[head, tail)`` of two buffers with spare room at the end, so a
    single offered entry is inserted by shifting the entries after it.
    """

    def __init__(
        self,
        key_of: Callable[[np.ndarray], np.ndarray],
        all_keys: Callable[[], np.ndarray] | None,
        target: int,
        *,
        ordered_members: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, int]]
        | None = None,
    ) -> None:
        self._key_of = key_of
        self._all_keys = all_keys
        self.target = max(1, int(target))
        self._ordered_members = ordered_members
        #: snapshot entries: recency pools fit slots and stamps in int32 (half the bytes)
        self._dtype = np.dtype(np.int32 if ordered_members is not None else np.int64)
        self.rebuilds = 0
        self.invalidate()

    def invalidate(self) -> None:
        """Keys changed wholesale (renumbering, decay, reset): rescan on next use."""
        self._slots = EMPTY_SLOTS
        self._keys = EMPTY_SLOTS
        self._head = self._tail = 0
        self._threshold = INT64_MAX
        self._fresh = False

    def __len__(self) -> int:
        return self._tail - self._head

    def smallest(self, m: int, blocked: np.ndarray) -> np.ndarray:
        """Up to ``m`` member slots with the smallest keys, ascending, skipping ``blocked`` ones.

        Fewer than ``m`` only when fewer eligible members exist. Does not remove anything: a
        slot leaves the pool when its key changes.
        """
        if m <= 0:
            return EMPTY_SLOTS
        if m == 1:  # fast path: drop stale entries at the head one by one
            while self._head < self._tail:
                head = self._head
                first = self._slots[head]
                if self._key_of(first) != self._keys[head]:
                    self._head = head + 1
                elif not blocked[first]:
                    return self._slots[head : head + 1].astype(np.int64)
                else:
                    break
        rebuilt = False
        if not self._fresh:
            self._rebuild(m, blocked)
            rebuilt = True
        span = max(2 * m, 16)
        while True:
            lo = self._head
            hi = min(lo + span, self._tail)
            slots = self._slots[lo:hi]
            valid = self._key_of(slots) == self._keys[lo:hi]
            picked = slots[valid & ~blocked[slots]][:m].astype(np.int64)
            if hi > lo and not valid[0]:
                self._head = lo + (int(np.argmax(valid)) if valid.any() else hi - lo)
            if len(picked) == m:
                return picked
            if hi == self._tail:
                if rebuilt:
                    return picked
                self._rebuild(m, blocked)
                rebuilt = True
                span = max(2 * m, 16)
            else:
                span *= 4

    def offer(self, slots: np.ndarray) -> None:
        """These slots' keys changed; keep the ones that now fall below the threshold."""
        if not self._fresh or not len(slots):
            return
        if len(slots) == 1:
            key = int(self._key_of(slots[0]))
            if key < self._threshold:
                self._insert_one(int(slots[0]), key)
            return
        keys = np.asarray(self._key_of(slots), dtype=np.int64)
        low = keys < self._threshold
        if low.any():
            self._merge(slots[low], keys[low])

    def _insert_one(self, slot: int, key: int) -> None:
        head, tail = self._head, self._tail
        at = head + int(self._keys[head:tail].searchsorted(key, side="right"))
        if at == head and head > 0:  # room just before the snapshot
            self._head = at = head - 1
        else:
            if tail == len(self._slots):
                self._store(self._slots[head:tail], self._keys[head:tail])
                at -= head
                tail = self._tail
            self._slots[at + 1 : tail + 1] = self._slots[at:tail]
            self._keys[at + 1 : tail + 1] = self._keys[at:tail]
            self._tail = tail + 1
        self._slots[at] = slot
        self._keys[at] = key
        self._truncate()

    def _merge(self, slots: np.ndarray, keys: np.ndarray) -> None:
        head, tail = self._head, self._tail
        if (tail > head and keys[0] >= self._keys[tail - 1] and tail + len(slots) <= len(self._slots)
                and (len(keys) == 1 or bool(np.all(keys[1:] >= keys[:-1])))):
            # already in order after the snapshot (fresh recency stamps): the stable merge
            # would put them exactly here
            self._slots[tail:tail + len(slots)] = slots
            self._keys[tail:tail + len(slots)] = keys
            self._tail = tail + len(slots)
            self._truncate()
            return
        all_slots = np.concatenate([self._slots[self._head : self._tail], slots])
        all_keys = np.concatenate([self._keys[self._head : self._tail], keys])
        order = np.argsort(all_keys, kind="stable")
        self._store(all_slots[order], all_keys[order])
        self._truncate()

    def _truncate(self) -> None:
        if self._tail - self._head > 2 * self.target + 64:
            keep = self._head + self.target
            self._threshold = int(self._keys[keep])
            self._tail = keep

    def _store(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """Make (slots, keys), sorted by key, the snapshot, with spare room after it."""
        room = len(slots) + max(64, len(slots) // 2)
        self._slots = np.empty(room, dtype=self._dtype)
        self._keys = np.empty(room, dtype=self._dtype)
        self._slots[: len(slots)] = slots
        self._keys[: len(keys)] = keys
        self._head, self._tail = 0, len(slots)

    def _rebuild(self, m: int, blocked: np.ndarray) -> None:
        self._fresh = True
        self.rebuilds += 1
        if self._ordered_members is not None:
            ordered, ordered_keys, n_blocked = self._ordered_members(blocked)
            size = min(max(self.target, 2 * m) + n_blocked, len(ordered))
            self._threshold = int(ordered_keys[size]) if size < len(ordered) else INT64_MAX
            self._store(ordered[:size], ordered_keys[:size])
            return
        assert self._all_keys is not None
        keys = np.asarray(self._all_keys(), dtype=np.int64)
        member = keys != INT64_MAX
        n_members = int(np.count_nonzero(member))
        n_blocked = int(np.count_nonzero(blocked & member))
        size = min(max(self.target, 2 * m) + n_blocked, n_members)
        if size < len(keys):
            part = np.argpartition(keys, size)
            chosen = part[:size]
            self._threshold = int(keys[part[size]])
        else:
            chosen = np.arange(len(keys), dtype=np.int64)
            self._threshold = INT64_MAX
        chosen = chosen[np.argsort(keys[chosen], kind="stable")]
        self._store(chosen, keys[chosen])

    @property
    def nbytes(self) -> int:
        return self._slots.nbytes + self._keys.nbytes


@numba.njit(nogil=True, cache=True)
def stamp_order(stamps, seg, segment, blocked):
    """(slots, stamps, how many blocked) of the occupied slots (stamp >= 0) whose ``seg`` is
    ``segment`` (every occupied slot if ``seg`` is empty), sorted by stamp (:func:`sort_by_stamp`);
    O(len(stamps)). ``blocked``: bool per slot."""
    n = 0
    n_blocked = 0
    lo = np.int64(2**62)
    hi = np.int64(-1)
    every = seg.shape[0] == 0
    for i in range(stamps.shape[0]):
        if stamps[i] >= 0 and (every or seg[i] == segment):
            n += 1
            n_blocked += blocked[i]
            lo = min(lo, np.int64(stamps[i]))
            hi = max(hi, np.int64(stamps[i]))
    a = np.empty(n, dtype=np.int64)
    j = 0
    for i in range(stamps.shape[0]):
        if stamps[i] >= 0 and (every or seg[i] == segment):
            a[j] = i
            j += 1
    a = sort_by_stamp(a, stamps, lo, hi)
    keys = np.empty(n, dtype=np.int64)
    for i in range(n):
        keys[i] = stamps[a[i]]
    return a, keys, n_blocked


@numba.njit(nogil=True, cache=True)
def sort_by_stamp(slots, stamps, lo, hi):
    """``slots`` (int64, below 2**32; a new array) ordered by ``stamps[slot]``, all within
    [lo, hi] (hi - lo < 2**31): the update kernel's radix sort on stamp - lo, the slots as
    payload (one gather, then sequential memory)."""
    keys = np.empty(slots.shape[0], dtype=np.int64)
    for i in range(slots.shape[0]):
        keys[i] = np.int64(stamps[slots[i]]) - lo
    return sort_payloads(keys, slots, bits_for(max(hi - lo, 0)))


def pin_for_batch(pinned: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Pin ``slots`` while a batch is decided; returns their previous flags for :func:`unpin_after_batch`."""
    previous = pinned[slots]
    pinned[slots] = True
    return previous


def unpin_after_batch(pinned: np.ndarray, slots: np.ndarray, previous: np.ndarray) -> None:
    pinned[slots] = previous
