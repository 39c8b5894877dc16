"""One numba call per batch for :class:`~tierstore.cache.adaptive.AdaptivePolicy`.

The policy's Python methods decide a batch with some forty numpy calls (victim pools, sketch,
ghosts, segment moves); at 4096 lookups per table and step that overhead was most of the
policy's cost (~0.4 ms per table at pooling 1). :func:`access_batch` makes exactly the same
decisions in one call: the same order of steps as ``AdaptivePolicy.access`` (hits recorded,
sketch, ghost adaptation, admission duels, placements), on the same arrays.

The one difference is how it finds the oldest rows of a segment: the Python path keeps
:class:`~tierstore.cache.slots.VictimPool` snapshots between calls, this one scans the
segment (:func:`oldest`: a histogram of the stamps picks the few buckets that hold the oldest
``k``, and only those are sorted). Stamps are unique, so both give the same slots in the same
order; the policy invalidates its pools after a batch decided here.
"""

from __future__ import annotations

import numba
import numpy as np

from .sketch import _estimate_batch, _ghost_add, _ghost_lookup, count_batch
from .slots import sort_by_stamp

FREE, WINDOW, PROBATION, PROTECTED = 0, 1, 2, 3
# ints[]: the policy's scalar state, read and written by access_batch (SINK: scratch)
NOW, FREE_NEXT, ADDITIONS, OCCUPIED_W, OCCUPIED_M, DIRECTION, RUN, SINK = range(8)
_BUCKETS = 2048

_JIT = dict(nogil=True, cache=True)


@numba.njit(**_JIT)
def oldest(stamps, seg, segment, pinned, size, k):
    """Up to ``k`` slots of ``segment`` (which holds ``size`` slots) that are not pinned,
    smallest stamp first.

    One scan packs each member as ``stamp << 32 | slot``; a histogram of the stamps finds the
    buckets that hold the oldest ``k``, and only those members are sorted. Segments are spread
    over the slots at random: when one holds between a third and 95% of them, a branch per
    slot would mispredict often, and the scan runs branchless (on 100k slots: 2x faster for a
    three-quarter segment; slower for a fifth or a twentieth, where the branch is cheap)."""
    if k <= 0 or size <= 0:
        return np.empty(0, dtype=np.int64)
    c = stamps.shape[0]
    packed = np.empty(c, dtype=np.int64)
    n = 0
    lo = np.int64(2**62)
    hi = np.int64(-1)
    if 3 * size > c and 20 * size < 19 * c:
        for i in range(c):
            t = np.int64(stamps[i])
            ok = (seg[i] == segment) & (not pinned[i])
            packed[n] = (t << 32) | i
            n += ok
            lo = min(lo, t if ok else lo)
            hi = max(hi, t if ok else hi)
    else:
        for i in range(c):
            if seg[i] == segment and not pinned[i]:
                t = np.int64(stamps[i])
                packed[n] = (t << 32) | i
                n += 1
                lo = min(lo, t)
                hi = max(hi, t)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    m = n
    if n > k:
        shift = 0
        while ((hi - lo) >> shift) >= _BUCKETS:
            shift += 1
        hist = np.zeros(_BUCKETS, dtype=np.int64)
        for j in range(n):
            hist[((packed[j] >> 32) - lo) >> shift] += 1
        total = 0
        b = 0
        while total + hist[b] < k:
            total += hist[b]
            b += 1
        limit = lo + ((b + 1) << shift) - 1  # members with stamp <= limit: k or a few more
        m = 0
        for j in range(n):
            v = packed[j]
            packed[m] = v
            m += (v >> 32) <= limit
        hi = min(hi, limit)
    chosen = np.empty(m, dtype=np.int64)
    for j in range(m):
        chosen[j] = packed[j] & 0xFFFFFFFF
    return sort_by_stamp(chosen, stamps, lo, hi)[:k]


@numba.njit(**_JIT)
def _place(slots, segment, seg, stamps, sizes, ints):
    """Make ``slots`` the most recent rows of ``segment`` (``AdaptivePolicy._place``)."""
    n = slots.shape[0]
    for j in range(n):
        s = slots[j]
        sizes[seg[s]] -= 1
        seg[s] = segment
        stamps[s] = ints[NOW] + j
    sizes[segment] += n
    ints[NOW] += n


@numba.njit(**_JIT)
def _increment(sketch, rows, multipliers, width, sample, ints):
    """``CountMinSketch.increment`` of ``rows`` (int64, distinct), additions kept in ints."""
    if rows.shape[0]:
        ints[ADDITIONS] = count_batch(sketch, rows.view(np.uint64), multipliers, width,
                                      ints[ADDITIONS], sample)


@numba.njit(**_JIT)
def _window_target(floats):
    return np.int64(floats[0])


@numba.njit(**_JIT)
def _demote_protected_overflow(seg, stamps, sizes, pinned, ints, floats, capacity, share):
    limit = np.int64(share * (capacity - _window_target(floats)))
    excess = sizes[PROTECTED] - limit
    if excess > 0:
        demoted = oldest(stamps, seg, PROTECTED, pinned, sizes[PROTECTED], excess)
        _place(demoted, PROBATION, seg, stamps, sizes, ints)


@numba.njit(**_JIT)
def _take_free(m, pinned, released, ints, capacity):
    """``FreeSlots.take``: released slots first (skipping pinned ones), then never-used
    ones; returns (slots, the released list afterwards)."""
    out = np.empty(m, dtype=np.int64)
    k = 0
    keep = np.empty(released.shape[0] + m, dtype=np.int64)
    kept = 0
    for s in released:
        if k < m and not pinned[s]:
            out[k] = s
            k += 1
        else:
            keep[kept] = s
            kept += 1
    while k < m and ints[FREE_NEXT] < capacity:
        s = ints[FREE_NEXT]
        ints[FREE_NEXT] += 1
        if pinned[s]:
            keep[kept] = s
            kept += 1
        else:
            out[k] = s
            k += 1
    return out[:k], keep[:kept].copy()


@numba.njit(**_JIT)
def _concat(a, b):
    out = np.empty(a.shape[0] + b.shape[0], dtype=np.int64)
    out[: a.shape[0]] = a
    out[a.shape[0]:] = b
    return out


@numba.njit(**_JIT)
def _warm(a):
    """Read one element per 64-byte line of ``a`` (1-d), so a later random pass finds it in
    cache; returns a sum nobody uses (keeps the reads)."""
    step = max(1, 64 // a.itemsize)
    t = 0
    for i in range(0, a.shape[0], step):
        t += a[i]
    return t


@numba.njit(**_JIT)
def access_batch(hit_slots, miss_rows, rows, seg, stamps, pinned, sizes, released, ints, floats,
                 sketch, sk_mult, sk_width, sk_sample, ghost_w, ghost_m, g_pos, g_fp, g_entries,
                 g_modulus, capacity, share, step, momentum, low, high, owns_rows):
    """``AdaptivePolicy.access(hit_slots, miss_rows)`` in one call (see the module docstring).

    State: ``seg``, ``stamps`` (int32), ``pinned``, ``sizes`` (int64[4], rows per segment),
    ``rows`` (row of each slot), ``ints`` (NOW, FREE_NEXT, ADDITIONS, OCCUPIED_W, OCCUPIED_M,
    DIRECTION, RUN; SINK is scratch), ``floats`` ([window target]), the sketch's counters and
    the two ghost lists, all updated in place. Returns (slots for the first misses in order,
    the free list's released slots afterwards).
    """
    n_hit = hit_slots.shape[0]
    m = miss_rows.shape[0]
    # Between two batches of a table the other tables' work evicts its state from cache; one
    # streaming read brings it back before the random passes below (during training at
    # 8 x 1M x 64, pooling 20: 1650 -> 1430 us per call; 26 x 100k, pooling 1: 151 -> 132).
    ints[SINK] = (_warm(stamps) + _warm(rows) + _warm(sketch) + _warm(seg) + _warm(ghost_w)
                  + _warm(ghost_m))
    if n_hit:
        hit_rows = np.empty(n_hit, dtype=np.int64)
        for j in range(n_hit):
            hit_rows[j] = rows[hit_slots[j]]
        _increment(sketch, hit_rows, sk_mult, sk_width, sk_sample, ints)
        in_window = np.empty(n_hit, dtype=np.int64)
        elsewhere = np.empty(n_hit, dtype=np.int64)
        a = 0
        b = 0
        for s in hit_slots:
            if seg[s] == WINDOW:
                in_window[a] = s
                a += 1
            else:
                elsewhere[b] = s
                b += 1
        _place(in_window[:a], WINDOW, seg, stamps, sizes, ints)
        _place(elsewhere[:b], PROTECTED, seg, stamps, sizes, ints)
        _demote_protected_overflow(seg, stamps, sizes, pinned, ints, floats, capacity, share)
    if m == 0:
        return np.empty(0, dtype=np.int64), released
    _increment(sketch, miss_rows, sk_mult, sk_width, sk_sample, ints)

    # ghost hits move the window target (AdaptivePolicy._move_window)
    found = np.empty((2, m), dtype=np.bool_)
    _ghost_lookup(ghost_w, ghost_m, miss_rows.view(np.uint64), g_pos, g_fp, g_entries,
                  g_modulus, found)
    grow = 0
    shrink = 0
    for j in range(m):
        grow += found[0, j]
        shrink += found[1, j] and not found[0, j]
    if grow or shrink:
        wg = max(1, ints[OCCUPIED_W])
        mg = max(1, ints[OCCUPIED_M])
        up = grow * step * max(1.0, mg / wg)
        down = shrink * step * max(1.0, wg / mg)
        direction = 1 if up >= down else -1
        ints[RUN] = ints[RUN] + 1 if direction == ints[DIRECTION] else 1
        ints[DIRECTION] = direction
        moved = (up - down) * min(ints[RUN], momentum)
        floats[0] = min(max(floats[0] + moved, low), high)
        _demote_protected_overflow(seg, stamps, sizes, pinned, ints, floats, capacity, share)

    previous = np.empty(n_hit, dtype=np.bool_)
    for j in range(n_hit):
        previous[j] = pinned[hit_slots[j]]
        pinned[hit_slots[j]] = True

    # AdaptivePolicy._admit
    free, released = _take_free(m, pinned, released, ints, capacity)
    need = m - free.shape[0]
    leaving = max(0, sizes[WINDOW] + m - _window_target(floats))
    victims = oldest(stamps, seg, PROBATION, pinned, sizes[PROBATION], need)
    if victims.shape[0] < need:
        victims = _concat(victims, oldest(stamps, seg, PROTECTED, pinned, sizes[PROTECTED],
                                          need - victims.shape[0]))
    # the window's oldest rows: the candidates, then (one scan for both) the older window rows
    # that make up a shortfall of victims below
    window_oldest = oldest(stamps, seg, WINDOW, pinned, sizes[WINDOW],
                           leaving + max(0, need - victims.shape[0]))
    candidates = window_oldest[:leaving]
    n_duels = min(need, candidates.shape[0])
    n_ch = min(n_duels, victims.shape[0])
    keys = np.empty(2 * n_ch, dtype=np.int64)
    for j in range(n_ch):
        keys[j] = rows[candidates[j]]
        keys[n_ch + j] = rows[victims[j]]
    counts = np.empty(2 * n_ch, dtype=np.uint8)
    _estimate_batch(sketch, keys.view(np.uint64), sk_mult, sk_width, counts)
    rejected = np.empty(need + candidates.shape[0], dtype=np.int64)
    evicted = np.empty(need + n_ch, dtype=np.int64)
    promoted = np.empty(candidates.shape[0], dtype=np.int64)
    nr = 0
    ne = 0
    npro = 0
    for j in range(n_ch):  # TinyLFU's duel: the challenger was seen more often lately
        if counts[j] > counts[n_ch + j]:
            promoted[npro] = candidates[j]
            npro += 1
        else:
            rejected[nr] = candidates[j]
            nr += 1
    for j in range(n_ch, n_duels):
        rejected[nr] = candidates[j]
        nr += 1
    for j in range(n_ch):
        if counts[j] > counts[n_ch + j]:
            evicted[ne] = victims[j]
            ne += 1
    for j in range(n_duels, victims.shape[0]):
        evicted[ne] = victims[j]
        ne += 1
    for j in range(n_duels, candidates.shape[0]):
        promoted[npro] = candidates[j]
        npro += 1
    shortfall = need - nr - ne
    if shortfall > 0:  # main is empty or pinned: fall back to older window rows
        for j in range(candidates.shape[0],
                       min(window_oldest.shape[0], candidates.shape[0] + shortfall)):
            rejected[nr] = window_oldest[j]
            nr += 1
    for which in range(2):
        slots = rejected[:nr] if which == 0 else evicted[:ne]
        if slots.shape[0] == 0:
            continue
        gone = np.empty(slots.shape[0], dtype=np.int64)
        for j in range(slots.shape[0]):
            gone[j] = rows[slots[j]]
        table = ghost_w if which == 0 else ghost_m
        ints[OCCUPIED_W + which] += _ghost_add(table, gone.view(np.uint64), g_pos, g_fp,
                                               g_entries, g_modulus)
    _place(promoted[:npro], PROBATION, seg, stamps, sizes, ints)
    out = _concat(_concat(free, rejected[:nr]), evicted[:ne])

    for j in range(n_hit):
        pinned[hit_slots[j]] = previous[j]
    _place(out, WINDOW, seg, stamps, sizes, ints)
    if owns_rows:
        for j in range(out.shape[0]):
            rows[out[j]] = miss_rows[j]
    return out, released
