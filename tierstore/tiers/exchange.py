"""A batch's admissions into a dense table's slab, with the evictions they cause, in one call.

The DRAM tier admits a batch's missing rows into the slots the policy chose. Each slot's old
row (if any) leaves: its values are packed for the row file when dirty, its modified flag
moves to the checkpoint tracker, its index entry is cleared. The new row's record is then
copied from the row file's mapping into the slot, and the slot's metadata and the index
point at it. As numpy steps that is some twenty calls per table and batch, and a third of
the tier's cost at pooling 1 beyond the copies themselves (26 tables x 4096 lookups, 10% of
rows in DRAM: admission 6.8 -> 4.3 ms per step with this kernel).

:func:`exchange_rows` makes two passes, evictions then admissions, each one stream of random
reads prefetched a few rows ahead (as the row file's own gather and pack kernels). One
interleaved pass was slower where the reads miss the cache most (8 x 1M rows, pooling 20:
20.4 against 15.6 ms of kernel time per step): each row then has two far reads and three index or flag
writes in flight at once.
"""

from __future__ import annotations

import numba
import numpy as np

from tierstore.optim.kernels import PREFETCH_DISTANCE, _prefetch, _prefetch_row
from tierstore.tiers.rowfile import record_to_slab, slab_to_record, unwritten

EVICTED, WRITTEN, FRESH = range(3)  # counts[] of exchange_rows


@numba.njit(nogil=True, cache=True)
def exchange_rows(records, rows, pos, soff, flag, w, s, row_of_pos, dirty, modified,
                  row_flags, index, rec, out_rows, fresh, counts):  # pragma: no cover
    """Admit ``rows`` (int64, distinct, not resident) into slab positions ``pos`` (int64,
    distinct, slot + 1).

    records: the row file's records (uint8 [num_rows, record_bytes]; the row's bytes at 0,
    its state at ``soff``, its written flag at ``flag``); w, s: uint8 views of the weights and
    state slabs; row_of_pos, dirty, modified: the slab's per-position metadata; row_flags: the
    tracker's per-row modified flags; index: the dense slot_of_row (int32, position or 0).

    First the row held at each pos[i] (if any) is evicted: packed into ``rec[k]`` (record
    layout, written flag set, padding zero) with its id in ``out_rows[k]`` when dirty, its
    modified flag moved to row_flags, its index entry cleared. Then each rows[i] is copied
    in from its record, unless the record was never written: those i are listed in
    ``fresh`` and their slab rows left for the caller to initialise. counts[EVICTED],
    counts[WRITTEN] (rows packed into rec) and counts[FRESH] are set.
    """
    n = rows.shape[0]
    ne = 0
    nw = 0
    for i in range(n):  # out: one stream of slab reads
        if i + PREFETCH_DISTANCE < n:
            q = pos[i + PREFETCH_DISTANCE]
            _prefetch_row(w, q)
            _prefetch(s, (q, 0))
        p = pos[i]
        old = np.int64(row_of_pos[p])
        if old < 0:
            continue
        ne += 1
        if dirty[p]:
            slab_to_record(w, s, p, soff, flag, rec[nw])
            out_rows[nw] = old
            nw += 1
        if modified[p]:
            modified[p] = 0
            row_flags[old] = 1
        index[old] = 0
    nf = 0
    for i in range(n):  # in: one stream of record reads
        if i + PREFETCH_DISTANCE < n:
            _prefetch(records, (rows[i + PREFETCH_DISTANCE], 0))
        p = pos[i]
        r = rows[i]
        src = records[r]
        if unwritten(src, flag):
            fresh[nf] = i
            nf += 1
        else:
            record_to_slab(src, w, s, p, soff)
        row_of_pos[p] = r
        dirty[p] = 0
        index[r] = p
    counts[EVICTED] = ne
    counts[WRITTEN] = nw
    counts[FRESH] = nf
