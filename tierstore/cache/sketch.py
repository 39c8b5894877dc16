"""Row-id sketches for admission and adaptation: a 4-bit count-min sketch and ghost filters.

Both are indexed by hashes of row ids, so their size depends on the cache capacity, not on the
table size. Hashing is multiply-shift (Dietzfelbinger): for an odd 64-bit multiplier ``a`` the
high 32 bits of ``a * row mod 2**64`` are a universal hash of ``row``; each structure uses its
own multipliers (:func:`row_hashes` states them in numpy). Batches go through numba kernels; a
single row takes a scalar Python path with the same hashes, because the per-call overhead of a
kernel dominates at batch size 1.
"""

from __future__ import annotations

import numba
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
_MULTIPLIER_INTS = [int(a) for a in _MULTIPLIERS.ravel()]
_MASK64 = (1 << 64) - 1
SKETCH_HASHES = 4  # rows of the count-min sketch: hashes 0..3
SKETCH_MAX_COUNT = 15  # a counter saturates here (4 bits)
# hash 4: position in a ghost list, hash 5: fingerprint (hash 6 is spare)
_SHIFT32 = np.uint64(32)
_SKETCH_MULTIPLIERS = np.ascontiguousarray(_MULTIPLIERS[:SKETCH_HASHES, 0])


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """uint64[7, n]: seven independent 32-bit hashes of each (non-negative) row id."""
    keys = np.asarray(rows, dtype=np.int64).view(np.uint64)
    return (keys[None, :] * _MULTIPLIERS) >> _SHIFT32


def _keys(rows: np.ndarray) -> np.ndarray:
    """Row ids as the uint64 keys the hashes multiply (no copy for int64 arrays)."""
    return np.ascontiguousarray(rows, dtype=np.int64).view(np.uint64)


def _positions_one(row: int, first: int, count: int, width: int) -> list[int]:
    """Hashes ``first .. first+count-1`` of one row, each mapped onto ``0..width-1`` without
    modulo bias (``hash * width >> 32``), as the batch kernels map them."""
    return [
        ((((row * a) & _MASK64) >> 32) * width) >> 32
        for a in _MULTIPLIER_INTS[first : first + count]
    ]


@numba.njit(inline="always", nogil=True, cache=True)
def _hash_to(key, a, width):
    """Hash ``a`` of ``key`` (uint64) mapped onto 0..width-1: the kernels' twin of
    :func:`_positions_one`."""
    return np.int64((((key * a) >> np.uint64(32)) * np.uint64(width)) >> np.uint64(32))


@numba.njit(inline="always", nogil=True, cache=True)
def _ghost_entry(key, to_position, to_fingerprint, entries, modulus):
    """(position, fingerprint in 1..modulus) of ``key`` in a ghost list: the kernels' twin
    of :meth:`GhostLists._where_one`."""
    f = ((key * to_fingerprint) >> np.uint64(32)) % np.uint64(modulus) + np.uint64(1)
    return _hash_to(key, to_position, entries), f


@numba.njit(nogil=True, cache=True)
def _increment_batch(table, keys, multipliers, width, max_count, seen):
    """CountMinSketch.increment of a batch, with the exact semantics of reading every counter
    of the batch before writing any: a counter shared by several rows of the batch is raised
    once. ``seen`` (one bit per counter, all zero on entry) marks the counters raised so far.
    The earlier two-pass version's batch arrays (8 bytes per counter touched) page-faulted on
    every large batch: 3x slower. Branchless: 1.2-1.5x the branching loop at 2k-18k keys."""
    for i in range(keys.shape[0]):
        for j in range(multipliers.shape[0]):
            c = _hash_to(keys[i], multipliers[j], width) + j * width
            bit = np.uint8(1) << np.uint8(c & 7)
            marks = seen[c >> 3]
            seen[c >> 3] = marks | bit
            shift = np.uint8((c & 1) << 2)
            v = table[c >> 1]
            # branchless (these branches mispredict): raise if unseen and not saturated
            up = ((marks & bit) == 0) & (((v >> shift) & max_count) < max_count)
            table[c >> 1] = v + (np.uint8(up) << shift)


@numba.njit(nogil=True, cache=True)
def count_batch(table, keys, multipliers, width, additions, sample):
    """CountMinSketch.increment of a batch of ``keys`` (uint64, distinct rows): raise their
    counters (:func:`_increment_batch`), add ``len(keys)`` to ``additions`` and halve every
    counter once that reaches ``sample``. Returns the new ``additions``."""
    seen = np.zeros((multipliers.shape[0] * width + 7) // 8, dtype=np.uint8)
    _increment_batch(table, keys, multipliers, width, np.uint8(SKETCH_MAX_COUNT), seen)
    additions += keys.shape[0]
    if additions >= sample:
        _halve(table)
        additions //= 2
    return additions


@numba.njit(nogil=True, cache=True)
def _halve(table):
    """Halve every 4-bit counter (two per byte): shift, then drop the bits that crossed from
    the high nibble into the low one."""
    for i in range(table.shape[0]):
        table[i] = (table[i] >> np.uint8(1)) & np.uint8(0x77)


@numba.njit(nogil=True, cache=True)
def _estimate_batch(table, keys, multipliers, width, out):
    """CountMinSketch.estimate of a batch: out[i] = the smallest of row i's counters."""
    for i in range(keys.shape[0]):
        low = np.uint8(15)
        for j in range(multipliers.shape[0]):
            c = _hash_to(keys[i], multipliers[j], width) + j * width
            v = (table[c >> 1] >> np.uint8((c & 1) << 2)) & np.uint8(15)
            low = min(low, v)
        out[i] = low


@numba.njit(nogil=True, cache=True)
def _ghost_add(table, keys, to_position, to_fingerprint, entries, modulus):
    """GhostLists.add of a batch into one list (a later row overwrites an earlier one at the
    same position, as numpy's assignment does); returns how many positions were empty."""
    filled = 0
    for i in range(keys.shape[0]):
        p, f = _ghost_entry(keys[i], to_position, to_fingerprint, entries, modulus)
        filled += table[p] == 0
        table[p] = f
    return filled


@numba.njit(nogil=True, cache=True)
def _ghost_lookup(first, second, keys, to_position, to_fingerprint, entries, modulus, out):
    """GhostLists.lookup of a batch: out[0, i] / out[1, i] = row i is in list 0 / list 1."""
    for i in range(keys.shape[0]):
        p, f = _ghost_entry(keys[i], to_position, to_fingerprint, entries, modulus)
        out[0, i] = first[p] == f
        out[1, i] = second[p] == f


class CountMinSketch:
    """Frequency estimates for row ids: 4 rows of ``width`` 4-bit counters (TinyLFU's sketch).

    ``increment`` adds one to each of a row id's 4 counters (saturating at 15); ``estimate``
    is the minimum of them, an over-estimate of how often the id was seen lately. After
    ``sample`` increments all counters are halved (the TinyLFU "reset"), so counts describe the
    last few ``sample`` accesses and the sketch adapts when popularity shifts. Two counters share
    a byte, so the sketch costs ``2 * width`` bytes (a batch increment borrows a bit per counter
    for the call).
    """

    MAX_COUNT = SKETCH_MAX_COUNT

    def __init__(self, width: int, sample: int) -> None:
        self.width = max(2, int(width) + int(width) % 2)
        self.sample = max(1, int(sample))
        # One buffer, two views: numpy for batches, the bytearray for single rows (faster).
        self._bytes = bytearray(SKETCH_HASHES * self.width // 2)
        self._table = np.frombuffer(self._bytes, dtype=np.uint8)
        self.additions = 0

    def clear(self) -> None:
        self._table.fill(0)
        self.additions = 0

    def _counters_one(self, row: int) -> list[int]:
        counters = _positions_one(row, 0, SKETCH_HASHES, self.width)
        return [c + i * self.width for i, c in enumerate(counters)]

    def estimate(self, rows: np.ndarray) -> np.ndarray:
        """int array[n]: estimated recent frequency of each row."""
        out = np.empty(len(rows), dtype=np.uint8)
        _estimate_batch(self._table, _keys(rows), _SKETCH_MULTIPLIERS, self.width, out)
        return out

    def estimate_one(self, row: int) -> int:
        """:meth:`estimate` of a single row, as a Python int."""
        table = self._bytes
        return min((table[c >> 1] >> ((c & 1) << 2)) & 15 for c in self._counters_one(int(row)))

    def increment(self, rows: np.ndarray) -> None:
        """Count one access of each row (distinct rows); halves everything every ``sample``."""
        n = len(rows)
        if n > 1:
            self.additions = int(count_batch(self._table, _keys(rows), _SKETCH_MULTIPLIERS,
                                             self.width, self.additions, self.sample))
            return
        if n == 1:
            self._increment_one(int(rows[0]))
        self.additions += n
        if self.additions >= self.sample:
            self._halve()

    def _halve(self) -> None:
        _halve(self._table)
        self.additions //= 2

    def _increment_one(self, row: int) -> None:
        table = self._bytes
        for c in self._counters_one(row):
            byte, shift = c >> 1, (c & 1) << 2
            value = table[byte]
            if (value >> shift) & 15 != 15:
                table[byte] = value + (1 << shift)

    @property
    def nbytes(self) -> int:
        return self._table.nbytes


class GhostLists:
    """Approximate memory of recently evicted rows, in two lists (as ARC's B1/B2 ghosts).

    Each list is a direct-mapped table of ``entries`` fingerprints (``fingerprint_bits`` 8 or
    16): ``add`` writes a row's fingerprint at the row's hashed position, overwriting whatever
    was there, and ``lookup`` compares. A remembered row is forgotten once another row lands on
    its position, so a list remembers about its last ``entries`` additions (an entry survives
    ``k`` later additions with probability ``exp(-k / entries)``). A lookup of a row that was
    never added matches with probability ``2 ** -fingerprint_bits`` (0 marks an empty entry).
    """

    def __init__(self, entries: int, fingerprint_bits: int = 16) -> None:
        if fingerprint_bits not in (8, 16):
            raise ValueError(f"fingerprint_bits must be 8 or 16, got {fingerprint_bits}")
        self.entries = max(2, int(entries))
        self._modulus = (1 << fingerprint_bits) - 1
        dtype, code = (np.uint8, "B") if fingerprint_bits == 8 else (np.uint16, "H")
        # A buffer per list: numpy views for batches, typed memoryviews for single rows.
        buffers = [bytearray(self.entries * np.dtype(dtype).itemsize) for _ in range(2)]
        self._tables = [np.frombuffer(b, dtype=dtype) for b in buffers]
        self._cells = [memoryview(b).cast(code) for b in buffers]
        self._occupied = [0, 0]
        #: the batch kernels' hashing: position and fingerprint multipliers, entries, modulus
        self._hashing = (_MULTIPLIERS[SKETCH_HASHES, 0], _MULTIPLIERS[SKETCH_HASHES + 1, 0],
                         self.entries, self._modulus)

    def clear(self) -> None:
        for table in self._tables:
            table.fill(0)
        self._occupied = [0, 0]

    def _where_one(self, row: int) -> tuple[int, int]:
        """(position, fingerprint in 1..2**bits-1) of one row, in plain ints (the hashes of
        the batch kernels)."""
        position = _positions_one(row, SKETCH_HASHES, 1, self.entries)[0]
        mixed = ((row * _MULTIPLIER_INTS[SKETCH_HASHES + 1]) & _MASK64) >> 32
        return position, mixed % self._modulus + 1

    def lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(in list 0, in list 1): bool arrays over ``rows``."""
        out = np.empty((2, len(rows)), dtype=np.bool_)
        _ghost_lookup(self._tables[0], self._tables[1], _keys(rows), *self._hashing, out)
        return out[0], out[1]

    def lookup_one(self, row: int) -> tuple[bool, bool]:
        """:meth:`lookup` of a single row."""
        position, fingerprint = self._where_one(int(row))
        return self._cells[0][position] == fingerprint, self._cells[1][position] == fingerprint

    def add(self, which: int, rows: np.ndarray) -> None:
        """Remember these rows in list ``which`` (0 or 1)."""
        if len(rows) == 1:
            position, fingerprint = self._where_one(int(rows[0]))
            cells = self._cells[which]
            self._occupied[which] += cells[position] == 0
            cells[position] = fingerprint
        elif len(rows):
            self._occupied[which] += int(_ghost_add(self._tables[which], _keys(rows),
                                                    *self._hashing))

    def remembered(self, which: int) -> int:
        """How many rows list ``which`` holds (for ARC's adaptation ratio)."""
        return self._occupied[which]

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for table in self._tables)
