"""Numba kernels of checkpoints: the modified-row record, copy-on-write bookkeeping and the
row-file scan. All release the GIL (``nogil``), so the checkpoint's background thread runs
them while the training thread goes on.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(nogil=True, cache=True)


@numba.njit(**_JIT)
def move_flags(src, dst):
    """``dst[:] = src; src[:] = 0`` for uint8 flag arrays of one length (a frozen copy of
    per-slot flags and their reset, in one pass). Returns how many were set."""
    n = 0
    for p in range(src.shape[0]):
        v = src[p]
        dst[p] = v
        src[p] = 0
        n += v != 0
    return n


@numba.njit(**_JIT)
def fold_slots(slot_flags, row_of_pos, row_flags, lo, hi):
    """For each slab position p in [lo, hi) whose ``slot_flags[p]`` is set: set
    ``row_flags[row_of_pos[p]]`` and clear ``slot_flags[p]``. Returns how many."""
    n = 0
    for p in range(lo, hi):
        if slot_flags[p]:
            slot_flags[p] = 0
            row_flags[row_of_pos[p]] = 1
            n += 1
    return n


@numba.njit(**_JIT)
def slot_rows(slot_flags, row_of_pos, lo, hi, out, n):
    """Append ``row_of_pos[p]`` of the flagged positions p in [lo, hi) to ``out[n:]`` (long
    enough); returns the new length. Flags are left as they are."""
    for p in range(lo, hi):
        if slot_flags[p]:
            out[n] = row_of_pos[p]
            n += 1
    return n


@numba.njit(**_JIT)
def clear_slots(slot_flags, pos, row_of_pos_of, row_flags):
    """Positions ``pos`` (holding rows ``row_of_pos_of``) leave their slots: move their set
    ``slot_flags`` to ``row_flags`` by row. Returns how many were set."""
    n = 0
    for i in range(pos.shape[0]):
        p = pos[i]
        if slot_flags[p]:
            slot_flags[p] = 0
            row_flags[row_of_pos_of[i]] = 1
            n += 1
    return n


@numba.njit(**_JIT)
def mark_unflagged(pending, rows, done):
    """``pending[r] = 1`` for each row r of ``rows`` whose ``done[r]`` is clear. Returns how
    many (rows distinct)."""
    n = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        if done[r] == 0:
            pending[r] = 1
            n += 1
    return n


@numba.njit(**_JIT)
def filter_flagged(flags, rows, keep):
    """``keep[i] = flags[rows[i]] != 0``; returns how many are kept."""
    n = 0
    for i in range(rows.shape[0]):
        k = flags[rows[i]] != 0
        keep[i] = k
        n += k
    return n


@numba.njit(**_JIT)
def mark(flags, rows):
    """``flags[rows] = 1``."""
    for i in range(rows.shape[0]):
        flags[rows[i]] = 1


@numba.njit(**_JIT)
def flagged(flags, out):
    """Indices of the non-zero ``flags``, ascending, into ``out`` (at least their count + 1
    long: the loop is branchless). Returns how many."""
    n = 0
    for r in range(flags.shape[0]):
        out[n] = r
        n += flags[r] != 0
    return n


@numba.njit(**_JIT)
def count_flagged(flags):
    n = 0
    for r in range(flags.shape[0]):
        n += flags[r] != 0
    return n


@numba.njit(**_JIT)
def written_records(records, flag_offset, lo, hi, flags):
    """Row file scan: ``flags[r] = 1`` for each record r in [lo, hi) whose 'written' byte is
    set. Returns how many."""
    n = 0
    for r in range(lo, hi):
        if records[r, flag_offset]:
            flags[r] = 1
            n += 1
    return n


def rows_of(flags: np.ndarray) -> np.ndarray:
    """Sorted ids of the set ``flags`` (two numba passes; no GIL held)."""
    out = np.empty(count_flagged(flags) + 1, np.int64)
    return out[:flagged(flags, out)]
