"""Row id -> DRAM slot indexes.

Both map a row id to its DRAM slab position (slot + 1), with 0 meaning "not resident".

``DenseIndex``: ``slot_of_row`` as an int32 array over all rows of a dense table, in shared
memory (untouched pages read as 0 and cost nothing): 4 bytes per table row, one gather per
lookup. ``HashIndex``: open addressing for sparse (raw 64-bit id) tables,
probed for a whole batch at once (a loop over probe rounds, never over ids).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from tierstore.tiers import shm


class DenseIndex:
    """slot_of_row for ids in [0, num_rows)."""

    def __init__(self, num_rows: int, shm_name: str, *, unlink: bool = True) -> None:
        self.segment = shm.create(shm_name, (num_rows,), np.int32, unlink=unlink)
        self.array = self.segment.array
        self.tensor = torch.from_numpy(self.array)

    def get(self, rows: np.ndarray) -> np.ndarray:
        """int64 positions of ``rows`` (0 where not resident)."""
        return self.array[rows].astype(np.int64)

    def put(self, rows: np.ndarray, pos: np.ndarray) -> None:
        self.array[rows] = pos

    def remove(self, rows: np.ndarray) -> None:
        self.array[rows] = 0

    def clear(self) -> None:
        self.array[:] = 0

    def resident_bytes(self) -> int:
        """Bytes of index memory in use (the whole array is counted: 4 per table row)."""
        return self.array.nbytes

    def close(self) -> None:
        self.tensor = None
        self.segment.close()


IN_RANGE, OUT_OF_RANGE = 0, 2  # as kernels.gather_positions's ALL_RESIDENT / OUT_OF_RANGE


@numba.njit(nogil=True, cache=True)
def identity_positions(ids, num_rows, out):
    """out[i] = ids[i] + 1: the positions of a table laid out by row id (row r in slot r, see
    DDRCache.full_table). One streaming pass, no index read. Returns IN_RANGE, or OUT_OF_RANGE
    if an id is outside [0, num_rows) (out is then incomplete)."""
    bad = False
    for i in range(ids.shape[0]):
        r = ids[i]
        bad |= (r < 0) | (r >= num_rows)
        out[i] = r + 1
    return OUT_OF_RANGE if bad else IN_RANGE


_EMPTY = np.int64(-1)
_TOMB = np.int64(-2)
_MUL = np.uint64(0x9E3779B97F4A7C15)


class HashIndex:
    """Open-addressing (linear probing) map int64 id -> int64 position, <= ``capacity`` keys."""

    def __init__(self, capacity: int) -> None:
        size = 1
        while size < 2 * max(capacity, 8):
            size *= 2
        self.mask = np.uint64(size - 1)
        self.keys = np.full(size, _EMPTY, dtype=np.int64)
        self.vals = np.zeros(size, dtype=np.int64)
        self.count = 0
        self.tombs = 0

    def _home(self, keys: np.ndarray) -> np.ndarray:
        h = keys.astype(np.uint64) * _MUL
        return ((h >> np.uint64(17)) & self.mask).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Table position of each key, -1 if absent."""
        pos = self._home(keys)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        m = int(self.mask)
        while len(todo):
            p = pos[todo]
            k = self.keys[p]
            hit = k == keys[todo]
            out[todo[hit]] = p[hit]
            more = ~hit & (k != _EMPTY)
            todo = todo[more]
            pos[todo] = (p[more] + 1) & m
        return out

    def get(self, rows: np.ndarray) -> np.ndarray:
        """int64 positions of ``rows`` (0 where absent)."""
        p = self._find(rows)
        return np.where(p >= 0, self.vals[np.maximum(p, 0)], 0)

    def put(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Insert distinct keys that are not present."""
        if self.count + self.tombs + len(rows) > (int(self.mask) + 1) * 3 // 4:
            self._rebuild()
        pos = self._home(rows)
        todo = np.arange(len(rows))
        m = int(self.mask)
        while len(todo):
            p = pos[todo]
            free = (self.keys[p] == _EMPTY) | (self.keys[p] == _TOMB)
            cand, cells = todo[free], p[free]
            self.tombs -= int((self.keys[np.unique(cells)] == _TOMB).sum())
            # several keys may race for one free cell: the write that lands wins, others move on
            self.keys[cells] = rows[cand]
            won = self.keys[cells] == rows[cand]
            self.vals[cells[won]] = slots[cand[won]]
            done = np.zeros(len(todo), dtype=bool)
            done[np.flatnonzero(free)[won]] = True
            todo = todo[~done]
            pos[todo] = (pos[todo] + 1) & m
        self.count += len(rows)

    def remove(self, rows: np.ndarray) -> None:
        p = self._find(rows)
        p = p[p >= 0]
        self.keys[p] = _TOMB
        self.vals[p] = 0
        self.count -= len(p)
        self.tombs += len(p)

    def clear(self) -> None:
        self.keys[:] = _EMPTY
        self.vals[:] = 0
        self.count = self.tombs = 0

    def _rebuild(self) -> None:
        live = self.keys >= 0
        keys, vals = self.keys[live], self.vals[live]
        self.clear()
        if len(keys):
            self.put(keys, vals)

    def resident_bytes(self) -> int:
        return self.keys.nbytes + self.vals.nbytes

    def close(self) -> None:
        """Nothing to release: plain process memory."""
