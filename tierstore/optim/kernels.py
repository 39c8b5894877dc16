"""Fused numba kernels for the sparse write path (float32 tables).

One call of :func:`apply_rows` = sort contributions by row + sum gradients per distinct row +
optimizer update + dirty mark, without materialising a dense gradient. Measured against the plain torch path in
benchmarks/bench_kernels.py.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True)
#: reassociation lets LLVM vectorize the row reductions; no approximate sqrt/division ("afn",
#: "arcp"): they cost up to 1e-4 relative error on Adagrad steps with gradients near eps.
_FASTMATH = {"reassoc", "contract", "nsz"}
#: slab rows ahead to prefetch in the update loop; random row updates are memory-latency bound
#: (prefetching measured 1.4-2.3x faster; 4-16 rows ahead measure within noise of each other)
PREFETCH_DISTANCE = 8


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hint the CPU to bring arr[index] (index: a tuple of ints) into cache for writing."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = [context.cast(builder, builder.extract_value(args[1], k), idxty[k], types.intp)
               for k in range(len(idxty))]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()
    return sig, codegen


@numba.njit(**_JIT)
def _prefetch_row(arr, row):
    """Prefetch every 64-byte line of row ``row`` of a 2-D array."""
    step = max(1, 64 // arr.itemsize)
    for c in range(0, arr.shape[1], step):
        _prefetch(arr, (row, c))


SGD, ROWWISE_ADAGRAD, ADAGRAD = 0, 1, 2


@numba.njit(inline="always", **_JIT)
def _update_row(kind, p, acc, w, state, lr, eps, weight_decay):
    """Optimizer step of slab row p with its summed gradient ``acc`` (float32[dim]; weight
    decay adds to it in place)."""
    dim = w.shape[1]
    if kind == SGD:
        for d in range(dim):
            w[p, d] -= lr * acc[d]
    elif kind == ROWWISE_ADAGRAD:
        if weight_decay != 0:
            for d in range(dim):
                acc[d] += weight_decay * w[p, d]
        g2 = np.float32(0.0)
        for d in range(dim):
            g2 += acc[d] * acc[d]
        st = state[p, 0] + g2 / np.float32(dim)
        state[p, 0] = st
        m = lr / (np.sqrt(st) + eps)
        for d in range(dim):
            w[p, d] -= m * acc[d]
    else:
        for d in range(dim):
            g = acc[d]
            st = state[p, d] + g * g
            state[p, d] = st
            w[p, d] -= lr * g / (np.sqrt(st) + eps)


#: most bits per pass of the contribution sort (a 2048-entry histogram stays in L1)
RADIX_BITS = 11


@numba.njit(**_JIT)
def sort_contributions(pos, src, scale, key_bits, keys):
    """Contributions sorted by slab position, stably (ties keep input order).

    Returns a view of ``keys`` (int64 scratch, at least 2 * len(pos)) holding
    ``pos[i] << 32 | payload`` in ascending position order, where payload is ``src[i]`` when
    ``scale`` is empty and ``i`` otherwise. Requires 0 <= pos[i] < 2**key_bits <= 2**31 and
    payloads in [0, 2**32). LSD radix sort, at most RADIX_BITS per pass (digits balanced):
    one pass builds every histogram, then one scatter pass per digit.
    """
    n = pos.shape[0]
    a = keys[:n]
    b = keys[n:2 * n]
    scaled = scale.shape[0] > 0
    passes = max(1, (key_bits + RADIX_BITS - 1) // RADIX_BITS)
    digit = (key_bits + passes - 1) // passes  # balanced: 17 bits sort as 9 + 8
    mask = (1 << digit) - 1
    hist = np.zeros((passes, 1 << digit), dtype=np.int64)
    for i in range(n):
        p = np.int64(pos[i])
        a[i] = (p << 32) | (np.int64(i) if scaled else np.int64(src[i]))
        for q in range(passes):
            hist[q, (p >> (q * digit)) & mask] += 1
    for q in range(passes):
        t = 0
        for c in range(1 << digit):
            h = hist[q, c]
            hist[q, c] = t
            t += h
        shift = 32 + q * digit
        for i in range(n):
            x = a[i]
            c = (x >> shift) & mask
            k = hist[q, c]
            b[k] = x
            hist[q, c] = k + 1
        a, b = b, a
    return a


@numba.njit(**_JIT)
def sort_payloads(keys, payload, key_bits):
    """``payload`` (int64 in [0, 2**32)) ordered by ``keys`` (ints in [0, 2**key_bits),
    key_bits <= 31), stably, as a new array: :func:`sort_contributions` with the payload
    as its source rows."""
    n = keys.shape[0]
    scratch = np.empty(2 * n, dtype=np.int64)
    v = sort_contributions(keys, payload, np.empty(0, dtype=np.float32), key_bits, scratch)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = v[i] & 0xFFFFFFFF
    return out


@numba.njit(**_JIT)
def bits_for(span):
    """Bits needed to hold ints in [0, span] (at least 1)."""
    b = 1
    while (np.int64(1) << b) <= span:
        b += 1
    return b


@numba.njit(inline="always", **_JIT)
def _prefetch_slab_row(w, state, p):
    _prefetch_row(w, p)
    if state.shape[1]:
        _prefetch(state, (p, 0))


@numba.njit(fastmath=_FASTMATH, **_JIT)
def apply_rows(kind, pos, src, scale, grad, w, state, dirty, modified, lr, eps, weight_decay,
               keys, first=0):
    """Sum contributions per slab row, then apply the optimizer to each distinct row.

    Contribution i adds ``scale[i] * grad[src[i]]`` (scale empty: 1) to slab row ``pos[i]``
    (0 <= pos[i] < len(w) <= 2**31; 0 <= src[i] < len(grad), len(pos) < 2**32); a row's
    contributions are summed in input order, in float32, before its one update; each updated
    row gets its ``dirty`` (write-back) and ``modified`` (checkpoint) flags set after its
    update. Contributions to positions below ``first`` are skipped (1: a DRAM slab's
    permanent zero row, where a batch's rows that are not resident point). Scratch: keys
    int64[>= 2 * len(pos)]. Returns the number of distinct rows updated.

    Like FBGEMM's CPU backward: the contributions are radix-sorted by position
    (:func:`sort_contributions`), then each run of one row sums its gradient rows (``grad`` is
    [B, dim], cache-resident) into a dim-float buffer and updates the row at once. Rows are
    visited in ascending slab order and prefetched PREFETCH_DISTANCE rows ahead. Against the
    earlier two-pass kernel (scatter into a [distinct rows, dim] accumulator, then update in
    first-occurrence order) this measured 1.3-1.8x faster at pooling 20
    (benchmarks/bench_kernels.py).
    """
    n = pos.shape[0]
    dim = grad.shape[1]
    scaled = scale.shape[0] > 0
    key_bits = 1
    while (1 << key_bits) < w.shape[0]:
        key_bits += 1
    v = sort_contributions(pos, src, scale, key_bits, keys)
    acc = np.empty(dim, dtype=np.float32)
    lr32, eps32, wd32 = np.float32(lr), np.float32(eps), np.float32(weight_decay)
    low = np.int64(0xFFFFFFFF)
    k = 0
    while k < n and (v[k] >> 32) < first:
        k += 1
    pf = k  # prefetch cursor: start of the first run not prefetched yet
    for _ in range(PREFETCH_DISTANCE + 1):
        if pf < n:
            q = v[pf] >> 32
            _prefetch_slab_row(w, state, q)
            while pf < n and (v[pf] >> 32) == q:
                pf += 1
    u = 0
    while k < n:
        p = v[k] >> 32
        x = v[k] & low
        c = scale[x] if scaled else np.float32(1.0)
        r = src[x] if scaled else x
        for d in range(dim):
            acc[d] = c * grad[r, d]
        k += 1
        while k < n and (v[k] >> 32) == p:
            x = v[k] & low
            c = scale[x] if scaled else np.float32(1.0)
            r = src[x] if scaled else x
            for d in range(dim):
                acc[d] += c * grad[r, d]
            k += 1
        _update_row(kind, p, acc, w, state, lr32, eps32, wd32)
        dirty[p] = 1  # after the row: a concurrent write-back clears, then reads (pins.py)
        modified[p] = 1
        u += 1
        if pf < n:
            q = v[pf] >> 32
            _prefetch_slab_row(w, state, q)
            while pf < n and (v[pf] >> 32) == q:
                pf += 1
    return u


@numba.njit(**_JIT)
def distinct_positions(pos, mark, out):
    """Distinct values of ``pos`` (ints in [0, 8 * len(mark))) in first-occurrence order into
    out; returns how many. ``mark`` (uint8, a bit per value) is all 0 on entry and on return."""
    u = 0
    for i in range(pos.shape[0]):
        p = pos[i]
        if _first_time(mark, p):
            out[u] = p
            u += 1
    for j in range(u):
        mark[out[j] >> 3] = 0
    return u


ALL_RESIDENT, SOME_MISSING, OUT_OF_RANGE = 0, 1, 2


@numba.njit(**_JIT)
def gather_positions(ids, index, out):
    """out[i] = index[ids[i]] in one pass. Returns ALL_RESIDENT (every value non-zero),
    SOME_MISSING, or OUT_OF_RANGE (an id outside [0, len(index)); out is then incomplete)."""
    status = ALL_RESIDENT
    n = index.shape[0]
    for i in range(ids.shape[0]):
        r = ids[i]
        if r < 0 or r >= n:
            return OUT_OF_RANGE
        p = index[r]
        out[i] = p
        if p == 0:
            status = SOME_MISSING
    return status


@numba.njit(**_JIT)
def offsets_status(offsets, n):
    """0 if offsets are B + 1 non-decreasing boundaries from 0 to n; else 1 (first is not 0),
    2 (decreasing somewhere) or 3 (last is not n)."""
    if offsets[0] != 0:
        return 1
    for i in range(1, offsets.shape[0]):
        if offsets[i] < offsets[i - 1]:
            return 2
    if offsets[offsets.shape[0] - 1] != n:
        return 3
    return 0


@numba.njit(inline="always", **_JIT)
def _index_of(r, mark, rows, u):
    """Index of id ``r`` among the distinct ids ``rows[:u]`` met so far, listing it when new
    (``mark[r]`` holds index + 1, 0 = not met). Returns (index, new u)."""
    m = mark[r]
    if m == 0:
        rows[u] = r
        u += 1
        mark[r] = u
        return u - 1, u
    return m - 1, u


@numba.njit(inline="always", **_JIT)
def _unmark(mark, rows, u):
    """Zero ``mark`` again at the ids ``rows[:u]``."""
    for j in range(u):
        mark[rows[j]] = 0


@numba.njit(inline="always", **_JIT)
def _first_time(bits, p):
    """Set bit ``p`` of ``bits`` (uint8, a bit per value); True if it was clear."""
    bit = np.uint8(1) << np.uint8(p & 7)
    if bits[p >> 3] & bit:
        return False
    bits[p >> 3] |= bit
    return True


@numba.njit(**_JIT)
def first_occurrence(ids, mark, out_rows, out_idx):
    """Distinct ``ids`` in first-occurrence order into out_rows (returns how many) and, for
    each id, its index in them into out_idx. ``mark`` (int32, one per possible id) is all 0 on
    entry and on return."""
    u = 0
    for i in range(ids.shape[0]):
        out_idx[i], u = _index_of(ids[i], mark, out_rows, u)
    _unmark(mark, out_rows, u)
    return u


@numba.njit(**_JIT)
def split_misses(ids, pos, row_mark, slot_mark, track_hits, miss_at, miss_rows, where,
                 hit_slots):
    """One pass over a batch's slab positions ``pos`` (0 = not resident) splitting it for the
    policy: ``miss_at`` the batch indices of missing ids; ``miss_rows`` their distinct ids in
    first-occurrence order, ``where`` each missing id's index in them; if ``track_hits``,
    ``hit_slots`` the distinct slots (position - 1) hit, first-occurrence order. Returns the
    three counts. ``row_mark`` (int32, one per id) and ``slot_mark`` (uint8, a bit per
    position) are all 0 on entry and on return."""
    n_at = 0
    n_rows = 0
    n_hit = 0
    for i in range(ids.shape[0]):
        p = pos[i]
        if p == 0:
            miss_at[n_at] = i
            where[n_at], n_rows = _index_of(ids[i], row_mark, miss_rows, n_rows)
            n_at += 1
        elif track_hits and _first_time(slot_mark, p):
            hit_slots[n_hit] = p - 1
            n_hit += 1
    _unmark(row_mark, miss_rows, n_rows)
    for j in range(n_hit):
        slot_mark[(hit_slots[j] + 1) >> 3] = 0
    return n_at, n_rows, n_hit


@numba.njit(**_JIT)
def away_updates(ids, pos, src, scale, row_mark, away_rows, away_at, away_src, away_scale):
    """One pass picking a batch's update contributions to rows not resident (contribution i:
    ``scale[i]`` times gradient row ``src[i]`` to id ``ids[i]`` at slab position ``pos[i]``,
    0 = not resident; ``scale`` empty: 1): ``away_rows`` their distinct ids in
    first-occurrence order and, per contribution, ``away_at`` its row's index there,
    ``away_src`` and (when given) ``away_scale``. Returns (contributions, distinct rows).
    ``row_mark`` (int32, one per id) is all 0 on entry and on return."""
    scaled = scale.shape[0] > 0
    n_away = 0
    n_rows = 0
    for i in range(ids.shape[0]):
        if pos[i] == 0:
            away_at[n_away], n_rows = _index_of(ids[i], row_mark, away_rows, n_rows)
            away_src[n_away] = src[i]
            if scaled:
                away_scale[n_away] = scale[i]
            n_away += 1
    _unmark(row_mark, away_rows, n_rows)
    return n_away, n_rows


@numba.njit(**_JIT)
def sum_at(at, src, scale, g, out):
    """out[at[i]] += scale[i] * g[src[i]] for every i in input order (scale empty: 1); out is
    float32 [k, dim], zero on entry. The float32 arithmetic of torch's index_select + mul +
    index_add_ (one multiply, then the adds in input order), in one pass."""
    scaled = scale.shape[0] > 0
    for i in range(at.shape[0]):
        r = at[i]
        s = src[i]
        if scaled:
            c = scale[i]
            for d in range(out.shape[1]):
                out[r, d] += c * g[s, d]
        else:
            for d in range(out.shape[1]):
                out[r, d] += g[s, d]


# -- row flags (modified-row records and checkpoint snapshots) ---------------------------------

@numba.njit(**_JIT)
def fold_modified(modified, row_of_pos, flags):
    """For every slab position p whose ``modified`` flag is set: clear it and set
    ``flags[row_of_pos[p]]`` (per-row flags of a dense table). Returns how many."""
    n = 0
    for p in range(modified.shape[0]):
        if modified[p]:
            modified[p] = 0
            flags[row_of_pos[p]] = 1
            n += 1
    return n


@numba.njit(**_JIT)
def mark_rows(flags, rows):
    """flags[rows] = 1; returns how many of them were 0 before (the count is exact when rows
    are distinct)."""
    n = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        n += flags[r] == 0
        flags[r] = 1
    return n


@numba.njit(**_JIT)
def flagged_rows(flags, out, clear):
    """Indices of the non-zero ``flags``, ascending, into ``out`` (at least their count + 1
    long: the loop is branchless); clears those flags if ``clear`` (and only those, so pages
    never marked stay untouched). Returns how many."""
    n = 0
    for r in range(flags.shape[0]):
        out[n] = r
        n += flags[r] != 0
    if clear:
        for j in range(n):
            flags[out[j]] = 0
    return n


@numba.njit(**_JIT)
def strictly_increasing(rows):
    """True if ``rows`` is sorted with no duplicates."""
    for i in range(1, rows.shape[0]):
        if rows[i] <= rows[i - 1]:
            return False
    return True


@numba.njit(**_JIT)
def any_flagged(flags, ids, flagged=True):
    """True if some ``flags[ids[i]]`` is set (``flagged``) or clear (not ``flagged``); stops
    at the first."""
    for i in range(ids.shape[0]):
        if (flags[ids[i]] != 0) == flagged:
            return True
    return False


@numba.njit(**_JIT)
def take_flagged(flags, ids, out, flagged=True):
    """The distinct ``ids`` whose flag is set (``flagged``) or clear (not ``flagged``), in
    first-occurrence order, into ``out`` (len >= len(ids)); flips their flags (clears, or
    sets to 1). Returns how many."""
    n = 0
    for i in range(ids.shape[0]):
        r = ids[i]
        if (flags[r] != 0) == flagged:
            flags[r] = 0 if flagged else 1
            out[n] = r
            n += 1
    return n


@numba.njit(**_JIT)
def copy_flagged_rows(flags, rows, lo, hi, index, weights, state, w_out, s_out, base, copied,
                      missing):
    """Copy-on-write snapshots, the writer's chunk: for each k in [lo, hi) whose row
    ``rows[k]`` is flagged, copy the row from the slab (``weights/state[index[row]]``) to
    ``w_out/s_out[k - base]`` and list k in ``copied``; rows not resident (index 0) are listed
    in ``missing`` instead. Flags are left as they are: the caller clears those of the copied
    rows after a fence. Returns (copied, missing)."""
    n = 0
    m = 0
    dim = weights.shape[1]
    sdim = state.shape[1]
    for k in range(lo, hi):
        r = rows[k]
        if flags[r] == 0:
            continue
        p = index[r]
        if p == 0:
            missing[m] = k
            m += 1
            continue
        j = k - base
        for d in range(dim):
            w_out[j, d] = weights[p, d]
        for d in range(sdim):
            s_out[j, d] = state[p, d]
        copied[n] = k
        n += 1
    return n, m
