"""Row-id sketches for admission and adaptation: a 4-bit count-min sketch and ghost filters.

Both are indexed by hashes of row ids, so their size depends on the cache capacity, not on the
table size. Hashing is multiply-shift (Dietzfelbinger): for an odd 64-bit multiplier ``a`` the
high 32 bits of ``a * row mod 2**64`` are a universal hash of ``row``; each structure uses its
own multipliers. :func:`row_hashes` computes all of them for a batch at once so a policy hashes
each row once per batch and hands the result to both structures.
"""

from __future__ import annotations

import numpy as np

# Odd 64-bit multipliers (fixed, so hit rates are reproducible run to run).
_MULTIPLIERS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0xA0761D6478BD642F,
    ],
    dtype=np.uint64,
)[:, None]
SKETCH_HASHES = 4  # rows of the count-min sketch: hashes 0..3
GHOST_HASHES = 3  # bit positions per key in the ghost filters: hashes 4..6
_SHIFT32 = np.uint64(32)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """uint64[7, n]: seven independent 32-bit hashes of each (non-negative) row id."""
    keys = np.asarray(rows, dtype=np.int64).view(np.uint64)
    return (keys[None, :] * _MULTIPLIERS) >> _SHIFT32


def _reduce(hashes: np.ndarray, width: int) -> np.ndarray:
    """Map 32-bit hashes onto ``0..width-1`` without modulo bias (``hash * width >> 32``)."""
    return ((hashes * np.uint64(width)) >> _SHIFT32).astype(np.int64)


class CountMinSketch:
    """Frequency estimates for row ids: 4 rows of ``width`` 4-bit counters (TinyLFU's sketch).

    ``increment`` adds one to each of a row id's 4 counters (saturating at 15); ``estimate``
    is the minimum of them, an over-estimate of how often the id was seen lately. After
    ``sample`` increments all counters are halved (the TinyLFU "reset"), so counts describe the
    last few ``sample`` accesses and the sketch adapts when popularity shifts. Two counters share
    a byte, so the sketch costs ``2 * width`` bytes.
    """

    MAX_COUNT = 15

    def __init__(self, width: int, sample: int) -> None:
        self.width = max(2, int(width) + int(width) % 2)
        self.sample = max(1, int(sample))
        self._offsets = (np.arange(SKETCH_HASHES, dtype=np.int64) * self.width)[:, None]
        self._table = np.zeros(SKETCH_HASHES * self.width // 2, dtype=np.uint8)
        self.additions = 0

    def clear(self) -> None:
        self._table.fill(0)
        self.additions = 0

    def _nibbles(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counter = _reduce(hashes[:SKETCH_HASHES], self.width) + self._offsets
        return counter >> 1, (counter & 1) << 2  # byte index, bit shift of the nibble

    def estimate(self, hashes: np.ndarray) -> np.ndarray:
        """int array[n]: estimated recent frequency of each row (hashes from row_hashes)."""
        byte, shift = self._nibbles(hashes)
        return ((self._table[byte] >> shift) & self.MAX_COUNT).min(axis=0)

    def increment(self, hashes: np.ndarray) -> None:
        """Count one access of each row (distinct rows); halves everything every ``sample``."""
        n = hashes.shape[1]
        if n == 0:
            return
        byte, shift = self._nibbles(hashes)
        if n > 1:  # two rows sharing a counter must not both raise it past 15
            counter = np.unique((byte << 3) | shift)
            byte, shift = counter >> 3, counter & 7
        else:
            byte, shift = byte.ravel(), shift.ravel()
        below = ((self._table[byte] >> shift) & self.MAX_COUNT) < self.MAX_COUNT
        np.add.at(self._table, byte[below], (1 << shift[below]).astype(np.uint8))
        self.additions += n
        if self.additions >= self.sample:
            self._halve()

    def _halve(self) -> None:
        np.right_shift(self._table, 1, out=self._table)
        np.bitwise_and(self._table, 0x77, out=self._table)  # drop bits shifted across nibbles
        self.additions //= 2

    @property
    def nbytes(self) -> int:
        return self._table.nbytes


class GhostLists:
    """Approximate memory of recently evicted rows, in two lists (as in ARC's B1/B2).

    List 0 ("window ghost") and list 1 ("main ghost") each remember about the last
    ``entries`` rows added to them: a list is two Bloom filters, *current* and *previous*; rows
    go into *current*, and when it has taken ``entries // 2`` rows it becomes *previous* (the
    old *previous* is dropped). A lookup asks both. The four filters share one byte array, one
    bit lane each, so a lookup is a single gather. False positives are ~3% at the default
    8 bits per entry; nothing is ever deleted.
    """

    def __init__(self, entries: int, bits_per_entry: int = 8) -> None:
        self.entries = max(2, int(entries))
        self._per_filter = self.entries // 2
        self.size = max(64, self._per_filter * bits_per_entry)
        self._bits = np.zeros(self.size, dtype=np.uint8)
        self._inserted = [[0, 0], [0, 0]]  # per list: [current, previous]

    def clear(self) -> None:
        self._bits.fill(0)
        self._inserted = [[0, 0], [0, 0]]

    def _positions(self, hashes: np.ndarray) -> np.ndarray:
        return _reduce(hashes[SKETCH_HASHES : SKETCH_HASHES + GHOST_HASHES], self.size)

    def lookup(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in list 0, in list 1): bool arrays over the rows of ``hashes``."""
        lanes = np.bitwise_and.reduce(self._bits[self._positions(hashes)], axis=0)
        return (lanes & 0b0011) != 0, (lanes & 0b1100) != 0

    def add(self, which: int, hashes: np.ndarray) -> None:
        """Remember these rows in list ``which`` (0 or 1)."""
        n = hashes.shape[1]
        if n == 0:
            return
        current_bit = np.uint8(1 << (2 * which))
        self._bits[self._positions(hashes)] |= current_bit  # same bit everywhere: repeats are fine
        counts = self._inserted[which]
        counts[0] += n
        if counts[0] >= self._per_filter:
            self._rotate(which)

    def remembered(self, which: int) -> int:
        """About how many rows list ``which`` holds (for ARC's adaptation ratio)."""
        return min(self.entries, sum(self._inserted[which]))

    def _rotate(self, which: int) -> None:
        base = 2 * which
        lane_mask = np.uint8(0b11 << base)
        current = (self._bits >> np.uint8(base)) & np.uint8(1)
        self._bits &= ~lane_mask
        self._bits |= current << np.uint8(base + 1)
        counts = self._inserted[which]
        counts[1], counts[0] = counts[0], 0

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes
