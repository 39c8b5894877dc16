"""The default policy: W-TinyLFU whose window size adapts to the workload from ghost hits.

Structure (Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission Policy",
2017; the W-TinyLFU of the Caffeine library):

- a *window* LRU that every missing row enters;
- a *main* segmented LRU: *probation* and *protected* (at most ``protected`` of main); a hit in
  probation promotes the row to protected, whose overflow is demoted back to probation;
- when the window is over its target size, its least recent row (the *candidate*) leaves it
  and duels the least recent row of main (the *victim*, probation first): the candidate enters
  probation only if a count-min sketch has seen it more often lately than the victim;
  otherwise the candidate is evicted.

A small window with the frequency filter is what i.i.d. (Zipf-like) traffic wants; a window
that fills the whole cache is plain LRU, which is what recency-heavy embedding traces want. The
window target moves the way ARC (Megiddo & Modha, 2003) moves its T1/T2 split: two ghost lists
remember recently evicted rows, one for rows that left through the window (rejected
candidates) and one for rows evicted from main. A miss on a row the window ghost remembers means
a larger window would have hit it, so the target grows by ``step * capacity`` times ARC's ratio
max(1, |main ghost| / |window ghost|); a miss on a row only the main ghost remembers shrinks it
the same way, and consecutive moves in one direction take growing steps (up to ``momentum``
times). Each ghost hit is direct evidence for one direction, so the window converges within a
few capacities of traffic; hill climbing on sampled hit rates (Caffeine's method) was too noisy
and too slow on half-million-access traces (docs/cache.md).

Batches of more than one row follow base.py: hits are recorded first (sketch, promotion,
recency), then the misses enter the window together; the candidates they push out are the
oldest window rows, dueled pairwise against the oldest main rows. With batch 1 this is exactly
the per-access algorithm (run by :meth:`AdaptivePolicy._admit_one` for speed). A batch with
more than one hit or miss is decided in one numba call (:mod:`.adaptive_batch`), which takes
the same decisions as the methods below (tests compare the two).

Memory per cached row, defaults: uint8 segment + int32 stamp per slot (5 bytes); the sketch,
4 x ``sketch_width`` x capacity 4-bit counters (2 bytes); the ghosts, 2 x ``ghost_fraction`` x
capacity 16-bit fingerprints (1 byte). The row held by each slot is read from the tier's array
once :meth:`AdaptivePolicy.bind_rows` is called, else kept here (8 more bytes per slot).
"""

from __future__ import annotations

import math

import numpy as np

from .adaptive_batch import access_batch
from .base import Admission, CachePolicy
from .sketch import _SKETCH_MULTIPLIERS, CountMinSketch, GhostLists
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

FREE, WINDOW, PROBATION, PROTECTED = 0, 1, 2, 3
WINDOW_GHOST, MAIN_GHOST = 0, 1


class AdaptivePolicy(CachePolicy):
    """W-TinyLFU with an ARC-style, ghost-driven window size (see the module docstring).

    Parameters (fractions are of ``capacity``):
        window: initial window target (default 1%, TinyLFU's choice).
        protected: protected share of main (default 80%).
        sketch_width: sketch counters per hash row, per cached row (default 1.0).
        sample: the sketch halves its counters every ``sample * capacity`` accesses (10).
        ghost_fraction: rows each ghost list remembers (default 25%).
        ghost_bits: ghost fingerprint width, 16 or 8 (default 16).
        step: window change per ghost hit, before ARC's ratio (default 0.2%).
        momentum: largest multiple of the step taken by consecutive same-direction moves (4).
        pool_size: snapshot size of the victim pools (default ~capacity/64).
    """

    name = "adaptive"

    def __init__(
        self,
        capacity: int,
        *,
        window: float = 0.01,
        protected: float = 0.8,
        sketch_width: float = 1.0,
        sample: float = 10.0,
        ghost_fraction: float = 0.25,
        ghost_bits: int = 16,
        step: float = 0.002,
        momentum: int = 4,
        pool_size: int | None = None,
    ) -> None:
        super().__init__(capacity)
        c = self.capacity
        if not 0.0 <= protected <= 1.0:
            raise ValueError(f"protected must be within [0, 1], got {protected}")
        self._protected_share = float(protected)
        self._window_bounds = (1.0, float(max(1, c - 1)))
        self._initial_window = min(max(window * c, 1.0), self._window_bounds[1])
        self._step = max(1.0, step * c)
        self._momentum = max(1, int(momentum))
        self._seg = np.zeros(c, dtype=np.uint8)
        self._stamps = Stamps(c)
        self._free = FreeSlots(c)
        target = pool_size or default_pool_size(c)
        self._pools = {
            segment: VictimPool(self._stamp_of, None, target,
                                ordered_members=self._segment_order(segment))
            for segment in (WINDOW, PROBATION, PROTECTED)
        }
        self._sketch = CountMinSketch(width=math.ceil(sketch_width * c), sample=sample * c)
        self._ghosts = GhostLists(round(ghost_fraction * c), ghost_bits)
        self._rows = np.full(c, -1, dtype=np.int64)
        self._owns_rows = True
        self.single_path = True  # use _admit_one for single misses (tests turn it off)
        #: decide batches (more than one hit or miss) in one numba call (adaptive_batch.py);
        #: the same decisions as the Python path, which tests compare it with
        self.batch_kernel = True
        self.reset()

    # ----------------------------------------------------------------------------- public API
    def bind_rows(self, slot_rows: np.ndarray) -> None:
        """Read each slot's row id from the tier's int32/int64[capacity] array, not a copy.

        Call it before the first :meth:`access`. The tier must have applied every earlier
        Admission to ``slot_rows`` before the next :meth:`access` (the rows of victims are read
        during the call, before the tier evicts them). Saves 8 bytes per slot.
        """
        slot_rows = np.asarray(slot_rows)
        if slot_rows.shape != (self.capacity,) or slot_rows.dtype not in (np.int32, np.int64):
            raise ValueError(f"slot_rows must be int32 or int64[{self.capacity}]")
        self._rows = slot_rows
        self._owns_rows = False

    @property
    def window_target(self) -> int:
        """Current target size of the window segment, in rows."""
        return int(self._window)

    def segment_sizes(self) -> dict[str, int]:
        return {
            "window": int(self._size[WINDOW]),
            "probation": int(self._size[PROBATION]),
            "protected": int(self._size[PROTECTED]),
            "free": len(self._free),
        }

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        hit_slots = as_index(hit_slots)
        miss_rows = as_index(miss_rows)
        n_hit, m = len(hit_slots), len(miss_rows)
        if self.batch_kernel and (m > 1 or n_hit > 1) and self._stamps_last(n_hit + m):
            return admit_first(m, self._access_batch(hit_slots, miss_rows))
        if n_hit:
            self._sketch.increment(self._rows[hit_slots])
            self._record_hits(hit_slots)
        if m == 0:
            return admit_first(0, EMPTY_SLOTS)
        self._sketch.increment(miss_rows)
        if m == 1:
            in_window_ghost, in_main_ghost = self._ghosts.lookup_one(miss_rows[0])
            self._move_window(int(in_window_ghost), int(in_main_ghost and not in_window_ghost))
        else:
            in_window_ghost, in_main_ghost = self._ghosts.lookup(miss_rows)
            grow = int(np.count_nonzero(in_window_ghost))
            self._move_window(grow, int(np.count_nonzero(in_main_ghost & ~in_window_ghost)))
        previous = pin_for_batch(self.pinned, hit_slots)
        try:
            slots = self._admit_one() if self._use_single_path(m) else self._admit(m)
        finally:
            unpin_after_batch(self.pinned, hit_slots, previous)
        if len(slots):
            self._place(slots, WINDOW)
            if self._owns_rows:
                self._rows[slots] = miss_rows[: len(slots)]
        return admit_first(m, slots)

    def reset(self) -> None:
        self._seg.fill(FREE)
        self._size = [0, 0, 0, 0]  # rows per segment code
        self._stamps.reset()
        self._free.reset()
        for pool in self._pools.values():
            pool.invalidate()
        self._sketch.clear()
        self._ghosts.clear()
        self._window = self._initial_window
        self._direction, self._run = 0, 0  # last move of the window target, and its run length
        if self._owns_rows:
            self._rows.fill(-1)

    def release(self, slots: np.ndarray) -> None:
        slots = np.unique(as_index(slots))
        slots = slots[self._seg[slots] != FREE]
        for code, count in enumerate(np.bincount(self._seg[slots], minlength=4).tolist()):
            self._size[code] -= count
        self._seg[slots] = FREE
        self._stamps.free(slots)
        self._free.give(slots)
        if self._owns_rows:
            self._rows[slots] = -1

    def metadata_bytes(self) -> int:
        total = self._seg.nbytes + self._stamps.nbytes + self.pinned.nbytes + self._free.nbytes
        total += sum(pool.nbytes for pool in self._pools.values())
        total += self._sketch.nbytes + self._ghosts.nbytes
        return total + (self._rows.nbytes if self._owns_rows else 0)

    # ------------------------------------------------------------------- the numba batch path
    def _stamps_last(self, n: int) -> bool:
        """Whether the stamp clock can serve a batch of ``n`` without renumbering (a batch
        touches each hit, miss and moved slot at most once per step: at most n + 3 capacity);
        the Python path renumbers when it must."""
        return self._stamps.now + n + 3 * self.capacity <= self._stamps.limit

    def _access_batch(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> np.ndarray:
        """:meth:`access` in one numba call; returns the slots of the first misses."""
        sk, gh, free, st = self._sketch, self._ghosts, self._free, self._stamps
        ints = np.array([st.now, free._next, sk.additions, gh._occupied[WINDOW_GHOST],
                         gh._occupied[MAIN_GHOST], self._direction, self._run, 0], dtype=np.int64)
        floats = np.array([self._window], dtype=np.float64)
        sizes = np.array(self._size, dtype=np.int64)
        g_pos, g_fp, g_entries, g_modulus = gh._hashing
        slots, free._released = access_batch(
            hit_slots, miss_rows, self._rows, self._seg, st.values, self.pinned, sizes,
            free._released, ints, floats, sk._table, _SKETCH_MULTIPLIERS, sk.width, sk.sample,
            gh._tables[WINDOW_GHOST], gh._tables[MAIN_GHOST], g_pos, g_fp, g_entries, g_modulus,
            self.capacity, self._protected_share, self._step, self._momentum,
            *self._window_bounds, self._owns_rows)
        st.now, free._next, sk.additions = int(ints[0]), int(ints[1]), int(ints[2])
        gh._occupied = [int(ints[3]), int(ints[4])]
        self._direction, self._run = int(ints[5]), int(ints[6])
        self._window = float(floats[0])
        self._size = [int(v) for v in sizes]
        for pool in self._pools.values():  # they missed this batch's moves
            pool.invalidate()
        return slots

    # ------------------------------------------------------------------------ segment moves
    def _stamp_of(self, slots: np.ndarray) -> np.ndarray:
        return self._stamps.values[slots]

    def _segment_order(self, segment: int):
        def ordered(blocked: np.ndarray):
            return stamp_order(self._stamps.values, self._seg, segment, blocked)

        return ordered

    def _place(self, slots: np.ndarray, segment: int) -> None:
        """Make ``slots`` the most recent rows of ``segment`` (moving them from wherever)."""
        n = len(slots)
        if n == 0:
            return
        if n == 1:
            self._size[self._seg[slots[0]]] -= 1
        else:
            for code, count in enumerate(np.bincount(self._seg[slots], minlength=4).tolist()):
                self._size[code] -= count
        self._size[segment] += n
        self._seg[slots] = segment
        if self._stamps.touch(slots):
            for pool in self._pools.values():
                pool.invalidate()
        self._pools[segment].offer(slots)

    def _record_hits(self, slots: np.ndarray) -> None:
        """Window hits stay in the window; probation and protected hits go to protected."""
        if len(slots) == 1:
            self._place(slots, WINDOW if self._seg[slots[0]] == WINDOW else PROTECTED)
        else:
            in_window = self._seg[slots] == WINDOW
            self._place(slots[in_window], WINDOW)
            self._place(slots[~in_window], PROTECTED)
        self._demote_protected_overflow()

    def _protected_limit(self) -> int:
        return int(self._protected_share * (self.capacity - self.window_target))

    def _demote_protected_overflow(self) -> None:
        excess = int(self._size[PROTECTED]) - self._protected_limit()
        if excess > 0:
            demoted = self._pools[PROTECTED].smallest(excess, self.pinned)
            self._place(demoted, PROBATION)

    # ---------------------------------------------------------------------------- adaptation
    def _move_window(self, grow: int, shrink: int) -> None:
        """Apply this batch's ghost hits to the window target (ARC's rule, with momentum).

        ``grow``: misses on rows the window ghost remembers; ``shrink``: misses on rows only the
        main ghost remembers. Consecutive moves in the same direction take larger steps (the
        k-th in a row moves k times as far, up to ``momentum``), so a real shift in the
        workload moves the window within a fraction of a capacity of traffic, while noise that
        alternates direction keeps single steps.
        """
        if not (grow or shrink):
            return
        window_ghost = max(1, self._ghosts.remembered(WINDOW_GHOST))
        main_ghost = max(1, self._ghosts.remembered(MAIN_GHOST))
        up = grow * self._step * max(1.0, main_ghost / window_ghost)
        down = shrink * self._step * max(1.0, window_ghost / main_ghost)
        direction = 1 if up >= down else -1
        self._run = self._run + 1 if direction == self._direction else 1
        self._direction = direction
        low, high = self._window_bounds
        moved = (up - down) * min(self._run, self._momentum)
        self._window = min(max(self._window + moved, low), high)
        self._demote_protected_overflow()

    # ----------------------------------------------------------------------------- admission
    def _admit(self, m: int) -> np.ndarray:
        """Slots for the first misses of the batch: free slots, then duel losers' slots."""
        free = self._free.take(m, self.pinned)
        need = m - len(free)
        leaving = max(0, int(self._size[WINDOW]) + m - self.window_target)
        candidates = self._pools[WINDOW].smallest(leaving, self.pinned)
        n_duels = min(need, len(candidates))
        victims = self._main_victims(need)
        challengers = candidates[: min(n_duels, len(victims))]
        opponents = victims[: len(challengers)]
        wins = self._challenger_wins(challengers, opponents)
        # Window rows that leave without room to win (no opponent) are evicted; the rest of
        # the victims are evicted outright (the window is below its target and grows).
        rejected = np.concatenate([challengers[~wins], candidates[len(challengers) : n_duels]])
        evicted_main = np.concatenate([opponents[wins], victims[n_duels:]])
        promoted = np.concatenate([challengers[wins], candidates[n_duels:]])
        shortfall = need - len(rejected) - len(evicted_main)
        if shortfall > 0:  # main is empty or pinned: fall back to older window rows
            older = self._pools[WINDOW].smallest(len(candidates) + shortfall, self.pinned)
            rejected = np.concatenate([rejected, older[len(candidates) :]])
        self._remember(WINDOW_GHOST, rejected)
        self._remember(MAIN_GHOST, evicted_main)
        if len(promoted):
            self._place(promoted, PROBATION)
        return np.concatenate([free, rejected, evicted_main])

    def _use_single_path(self, m: int) -> bool:
        """One miss into a full cache whose window is at most one row over its target."""
        return (
            self.single_path
            and m == 1
            and not len(self._free)
            and self._size[WINDOW] + 1 - self.window_target <= 1
        )

    def _admit_one(self) -> np.ndarray:
        """:meth:`_admit` for one miss in the common state (see ``_use_single_path``).

        Same decisions as ``_admit(1)``, with scalar steps instead of array operations (numpy
        call overhead dominates at batch size 1); the tests check the two agree.
        """
        window = self._pools[WINDOW]
        leaving = self._size[WINDOW] + 1 > self.window_target
        candidate = window.smallest(1, self.pinned) if leaving else EMPTY_SLOTS
        victim = self._main_victims(1)
        if len(candidate) and len(victim):
            rows = self._rows
            if self._sketch.estimate_one(rows[candidate[0]]) > self._sketch.estimate_one(
                rows[victim[0]]
            ):
                self._remember(MAIN_GHOST, victim)
                self._place(candidate, PROBATION)
                return victim
            self._remember(WINDOW_GHOST, candidate)
            return candidate
        if len(candidate):
            self._remember(WINDOW_GHOST, candidate)
            return candidate
        if len(victim):
            self._remember(MAIN_GHOST, victim)
            return victim
        fallback = window.smallest(1, self.pinned)
        self._remember(WINDOW_GHOST, fallback)
        return fallback

    def _main_victims(self, k: int) -> np.ndarray:
        """Up to ``k`` least recent main rows: probation first, then protected."""
        victims = self._pools[PROBATION].smallest(k, self.pinned)
        if len(victims) < k:
            more = self._pools[PROTECTED].smallest(k - len(victims), self.pinned)
            victims = np.concatenate([victims, more])
        return victims

    def _challenger_wins(self, challengers: np.ndarray, opponents: np.ndarray) -> np.ndarray:
        """TinyLFU's admission test: the challenger was seen more often lately."""
        n = len(challengers)
        if n == 0:
            return np.zeros(0, dtype=bool)
        counts = self._sketch.estimate(
            np.concatenate([self._rows[challengers], self._rows[opponents]])
        )
        return counts[:n] > counts[n:]

    def _remember(self, which: int, slots: np.ndarray) -> None:
        """Put the rows held by ``slots`` (about to be evicted) into ghost list ``which``."""
        if len(slots):
            self._ghosts.add(which, self._rows[slots])
