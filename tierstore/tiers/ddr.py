"""DRAM tier of one table: a row slab plus optimizer state in shared memory, an index, per-slot
metadata, and a cache policy that decides admissions and evictions once per batch.

Slab layout (each a shared-memory segment, so the daemon can share them with clients):
  weights: [capacity + 1, dim] of the table dtype. Row 0 is a permanent zero row; the row held
           by slot k lives at weights[k + 1]. The index stores k + 1 (0 = not resident), so
           ``weights[index[ids]]`` is a lookup with no translation step, and non-resident ids
           read the zero row.
  state:   [capacity + 1, state_dim] float32, same rows.
  row_of_pos: [capacity + 1] row ids (-1 = free; int32 for dense tables below 2**31 rows,
           else int64), dirty: uint8 [capacity + 1], indexed like the slab (entry 0 unused).
Inside this module a "position" is a slab row (slot + 1); the policy sees slots (position - 1).
Per cached row the tier spends 6 bytes of metadata (row id, dirty and modified flags; 10 for
sparse or huge tables) and a scratch bit, plus the policy's own (see dram_bytes()).

Rows the policy declines to admit are served from SCM for this batch ("bypass"). Dirty rows are
written back to SCM when evicted and on flush().
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tierstore.cache.base import CachePolicy
from tierstore.ckpt import kernels as ck
from tierstore.ckpt.tracker import ModifiedRows
from tierstore.config import TableSpec
from tierstore.optim import kernels
from tierstore.optim.sparse import Adagrad, RowWiseAdagrad, SGD
from tierstore.tiers import pins, shm
from tierstore.rowinit import initial_rows
from tierstore.tiers.index import IN_RANGE, DenseIndex, HashIndex, identity_positions
from tierstore.tiers.marks import RowMarks
from tierstore.tiers.exchange import EVICTED, FRESH, WRITTEN, exchange_rows
from tierstore.tiers import write_behind
from tierstore.tiers.rowfile import as_bytes

_EMPTY = np.empty(0, dtype=np.int64)
#: a table that fits in DRAM is loaded whole (row r in slot r) at open if its rows take at most
#: this many bytes of slab (loading runs at about 1 GB/s); a larger one fills its identity slots
#: as rows are first used, and the fast path reads the index
PRELOAD_MAX_BYTES = 4 << 30
#: whole-table loads at least this large show a progress bar (on a terminal)
PRELOAD_BAR_BYTES = 1 << 30
_KERNEL_KIND = {SGD: kernels.SGD, RowWiseAdagrad: kernels.ROWWISE_ADAGRAD,
                Adagrad: kernels.ADAGRAD}


def _sum_contributions(keys: np.ndarray, src: np.ndarray, scale: np.ndarray,
                      g: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """(distinct keys, float32 [k, dim] sums of ``scale[i] * g[src[i]]`` per key)."""
    u, inv = torch.unique(torch.from_numpy(keys), return_inverse=True)
    return u.numpy(), sum_at(inv.numpy(), len(u), src, scale, g)


def sum_at(at: np.ndarray, k: int, src: np.ndarray, scale: np.ndarray,
           g: np.ndarray) -> torch.Tensor:
    """float32 [k, dim]: row j sums ``scale[i] * g[src[i]]`` over the i with ``at[i] == j``,
    in input order (scale empty: 1; g float32 [B, dim]). One numba pass (kernels.sum_at)."""
    out = np.zeros((k, g.shape[1]), dtype=np.float32)
    kernels.sum_at(np.ascontiguousarray(at, dtype=np.int64),
                   np.ascontiguousarray(src, dtype=np.int64),
                   np.ascontiguousarray(scale, dtype=np.float32),
                   np.ascontiguousarray(g, dtype=np.float32), out)
    return torch.from_numpy(out)


@dataclass
class Bypass:
    """Rows of a batch served from SCM without being cached (distinct, with their data)."""

    rows: np.ndarray
    w: np.ndarray
    s: np.ndarray
    #: precomputed result of :meth:`positions` when the producer already knows it
    where: np.ndarray | None = None
    k: np.ndarray | None = None

    def positions(self, ids: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the batch that read a bypass row, ascending; index of that row in
        self.rows)."""
        if self.where is not None:
            return self.where, self.k
        where = np.flatnonzero(pos == 0)
        order = np.argsort(self.rows)
        k = order[np.searchsorted(self.rows, ids[where], sorter=order)]
        return where, k



def bypass_map(got: np.ndarray, where: np.ndarray, miss_at: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """For a batch whose distinct missing rows got positions ``got`` (0 = not admitted, in the
    order the bypass rows are listed), ``where`` (index of each missing id among the distinct
    rows) and ``miss_at`` (batch positions of the missing ids): the (batch positions, bypass
    row index) pairs of :meth:`Bypass.positions`."""
    k_of_row = np.full(len(got), -1, dtype=np.int64)
    out = got == 0
    k_of_row[out] = np.arange(int(out.sum()))
    k = k_of_row[where]
    sel = k >= 0
    return miss_at[sel], k[sel]


class CowSnapshot:
    """A copy-on-write snapshot of some rows of one table: their values at the moment it was
    taken, copied later (checkpoints, ``tierstore/ckpt/writer.py``).

    Taking it only marks the rows *pending* (dense tables: a byte per table row, zero pages
    cost nothing; sparse tables: a flag per snapshot row, found by binary search). The
    checkpoint's writer thread then copies them a chunk at a time (:meth:`copy_range`) into
    its own buffers, and every path that changes row values first calls
    :meth:`copy_before_write` with the rows it is about to change, which copies those still
    pending into a compact side list (:meth:`merge_copied` hands them to the writer). Either
    way a copied row stops being pending, so each row is copied exactly once, with its value
    at snapshot time. ``lock`` serializes the copies with each other and, while the snapshot is
    attached to its tier, with admissions and evictions (a row moving between DRAM and SCM),
    so a copy never reads a slot being refilled. Flags only go from pending to copied, and a
    flag is cleared only after its row's copy is complete (a memory fence in between), so the
    write path may test them without the lock: a row it sees as not pending can be changed
    right away.

    **Open snapshots** (``rows=None``; a checkpoint's default): the rows to save are not known
    yet, so taking the snapshot costs O(1) plus two copies of a byte per slot: it *takes the
    tier's modified-row record* (the slots' modified flags are copied and cleared, the
    tracker's per-row record is swapped for an empty one) and the dirty flags, and every row
    of the table is pending. The writer thread then enumerates what was taken
    (:meth:`take_modified`, :meth:`written_rows`), decides which rows to save and narrows the
    snapshot to them (:meth:`fix`); until then the write path copies every row it changes
    the first time (a byte per table row says which were copied; ``_side`` keeps only those
    of the fixed set). Evictions meanwhile hand the taken flags of the slots they empty to
    :meth:`slots_leaving`, so a refilled slot never lends its flag to another row.
    :meth:`drain` of an open snapshot first waits for :meth:`fix`, which needs nothing from
    the thread that calls it.

    Not covered: updates that bypass :class:`DDRCache` (clients of the service writing the
    shared slab directly); the service therefore snapshots synchronously.
    """

    #: slab positions folded per hold of the lock (open snapshots)
    FOLD_CHUNK = 1 << 18

    def __init__(self, cache: "DDRCache", rows: np.ndarray | None) -> None:
        self.cache: DDRCache | None = cache
        self.dim = cache.spec.dim
        self.dtype = cache.weights.dtype
        self.state_dim = cache.state.shape[1]
        self.lock = threading.Lock()
        self.dense = cache.spec.id_space == "dense"
        self.num_rows = cache.spec.num_rows
        self._flags: np.ndarray | None = None   # dense: 1 = pending (fixed snapshots)
        self._still: np.ndarray | None = None   # sparse: per snapshot row, True = pending
        #: rows copied by the write path: (row ids, any order; weights; state)
        self._side: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        #: rows copied by the write path (the rest were copied by the writer)
        self.copied_on_write = 0
        #: set once the row set is known (at once unless open)
        self.fixed = threading.Event()
        # open snapshots: which rows the write path copied, and the record taken
        self._copied: np.ndarray | None = None      # dense: 1 = copied
        self._copied_ids: np.ndarray | None = None  # sparse: sorted ids copied
        self._slot_mod: np.ndarray | None = None
        self._slot_dirty: np.ndarray | None = None
        self._row_mod: Any = None  # dense: uint8 flags per row; sparse: list of id arrays
        if rows is None:
            self.rows: np.ndarray | None = None
            #: rows not copied yet (changed under the lock only); -1 while open
            self.left = -1
            if self.dense:
                self._copied = np.zeros(self.num_rows, dtype=np.uint8)
            else:
                self._copied_ids = np.empty(0, dtype=np.int64)
            self._slot_mod = cache.modified.copy()
            cache.modified.fill(0)
            pins.fence()
            self._slot_dirty = cache.dirty.copy()
            self._row_mod = cache.tracker.freeze()
        else:
            self._set_rows(rows, None)
            self.fixed.set()

    def _set_rows(self, rows: np.ndarray, copied: Any) -> None:
        """Pending := ``rows`` (sorted distinct int64) minus those in ``copied``."""
        if self.dense:
            flags = np.zeros(self.num_rows, dtype=np.uint8)
            if copied is None:
                left = int(kernels.mark_rows(flags, rows))
            else:
                left = int(ck.mark_unflagged(flags, rows, copied))
            self._flags = flags
        else:
            still = np.ones(len(rows), dtype=bool)
            if copied is not None and len(copied) and len(rows):
                k = np.minimum(np.searchsorted(copied, rows), len(copied) - 1)
                still &= copied[k] != rows
            self._still = still
            left = int(still.sum())
        self.left = left
        pins.fence()
        self.rows = rows

    # -- open snapshots: the writer thread -------------------------------------------------
    def _fold_slots(self, slot_flags: np.ndarray, into: Any) -> None:
        """Fold taken per-slot flags into rows (by the slots' current rows), a chunk of
        positions per hold of the lock. ``into``: dense uint8 row flags, or a list."""
        for lo in range(0, len(slot_flags), self.FOLD_CHUNK):
            hi = min(len(slot_flags), lo + self.FOLD_CHUNK)
            with self.lock:
                c = self.cache
                if c is None:
                    raise RuntimeError("the snapshot was released")
                if isinstance(into, np.ndarray):
                    ck.fold_slots(slot_flags, c.row_of_pos, into, lo, hi)
                else:
                    p = lo + np.flatnonzero(slot_flags[lo:hi])
                    if len(p):
                        into.append(c.row_of_pos[p].astype(np.int64))
                        slot_flags[p] = 0

    def take_modified(self) -> np.ndarray:
        """Open snapshot, writer thread: sorted distinct rows of the modified-row record it
        took (what ``DDRCache.take_modified`` would have returned when it was taken). Once."""
        if self._slot_mod is None or self._row_mod is None:
            raise RuntimeError("take_modified: not an open snapshot, or already taken")
        self._fold_slots(self._slot_mod, self._row_mod)
        with self.lock:
            self._slot_mod = None  # evictions stop looking
            rec, self._row_mod = self._row_mod, None
        if self.dense:
            return ck.rows_of(rec)
        return np.unique(np.concatenate(rec)) if rec else np.empty(0, np.int64)

    def written_rows(self) -> np.ndarray:
        """Open snapshot, writer thread: sorted ids of every row whose value may have
        differed from its initial value when the snapshot was taken (dirty in DRAM then, or
        written on SCM: rows written there since are included too). Once."""
        if self._slot_dirty is None:
            raise RuntimeError("written_rows: not an open snapshot, or already taken")
        c = self.cache
        if self.dense:
            flags = np.zeros(self.num_rows, dtype=np.uint8)
            self._fold_slots(self._slot_dirty, flags)
            self._slot_dirty = None
            # after the slots: an evicted dirty row reaches SCM before its slot is reused
            mark = getattr(c.backing, "mark_written", None)
            if mark is not None:
                mark(flags)
            else:
                ck.mark(flags, np.asarray(c.backing.written_rows(), dtype=np.int64))
            return ck.rows_of(flags)
        parts: list[np.ndarray] = []
        self._fold_slots(self._slot_dirty, parts)
        self._slot_dirty = None
        parts.append(np.asarray(c.backing.written_rows(), dtype=np.int64))
        return np.unique(np.concatenate(parts))

    def fix(self, rows: np.ndarray) -> None:
        """Open snapshot, writer thread: the rows to save are ``rows`` (sorted distinct
        int64); rows the write path copied meanwhile count as copied, the others become
        pending. A snapshot of no rows detaches."""
        with self.lock:
            if self.cache is None:
                raise RuntimeError("fix: the snapshot was released")
            if self.dense:
                copied = self._copied
                side = []
                for r, w, s in self._side:  # keep the copies of rows in the set
                    k = np.minimum(np.searchsorted(rows, r), max(0, len(rows) - 1))
                    keep = rows[k] == r if len(rows) else np.zeros(len(r), bool)
                    if keep.any():
                        side.append((r[keep], w[keep], s[keep]))
            else:
                copied = self._copied_ids
                side = []
                for r, w, s in self._side:
                    keep = np.isin(r, rows)
                    if keep.any():
                        side.append((r[keep], w[keep], s[keep]))
            self._side = side
            self._set_rows(rows, copied)
            self._copied = self._copied_ids = None
            self._slot_mod = self._slot_dirty = self._row_mod = None
            self.fixed.set()
            if len(rows) == 0:
                self._detach()

    def slots_leaving(self, pos: np.ndarray, rows: np.ndarray) -> None:
        """Evictions (caller holds the lock): slab positions ``pos`` holding ``rows`` are
        about to be refilled; the modified flags this open snapshot took for them go to their
        rows now. (Their taken dirty flags need nothing: a dirty row is written to SCM before
        its slot is reused, and :meth:`written_rows` reads SCM after the slots.)"""
        sm = self._slot_mod
        rec = self._row_mod
        if sm is None or rec is None or len(pos) == 0:
            return
        if isinstance(rec, np.ndarray):
            ck.clear_slots(sm, np.ascontiguousarray(pos, dtype=np.int64),
                           np.ascontiguousarray(rows, dtype=np.int64), rec)
        else:
            m = sm[pos] != 0
            if m.any():
                rec.append(np.asarray(rows[m], dtype=np.int64))
                sm[pos[m]] = 0

    def _copy_open(self, ids: np.ndarray) -> None:
        """Open snapshot, lock held: copy the rows among ``ids`` not copied yet."""
        if self._copied is not None:
            out = np.empty(len(ids), dtype=np.int64)
            rows = out[:kernels.take_flagged(self._copied, ids, out, False)]
        else:
            u = np.unique(ids)
            c = self._copied_ids
            if len(c):
                k = np.minimum(np.searchsorted(c, u), len(c) - 1)
                u = u[c[k] != u]
            rows = u
            if len(rows):
                self._copied_ids = np.union1d(c, rows)
        if len(rows) == 0:
            return
        w, s = self.cache.read_rows(rows)
        self._side.append((rows, w, s))
        self.copied_on_write += len(rows)

    # -- fixed snapshots -------------------------------------------------------------------
    def _take_pending(self, k: np.ndarray):
        """Read the still-pending snapshot rows among ``k`` (indices, ascending) and mark them
        copied; caller holds the lock. Returns (indices, weights, state) or None."""
        if self.cache is None or self.left <= 0 or len(k) == 0:
            return None
        if self._flags is not None:
            k = k[self._flags[self.rows[k]] != 0]
        else:
            k = k[self._still[k]]
        if len(k) == 0:
            return None
        w, s = self.cache.read_rows(self.rows[k])
        pins.fence()  # the copies are done before a flag says so (see the class doc)
        if self._flags is not None:
            self._flags[self.rows[k]] = 0
        else:
            self._still[k] = False
        self.left -= len(k)
        return k, w, s

    def copy_before_write(self, ids: np.ndarray) -> None:
        """The write path: copy the pending rows among ``ids`` (valid int64 ids, duplicates
        allowed) before they change. When none of them is pending this costs one pass over
        ``ids`` (dense: a numba scan of their flags; sparse: a binary search)."""
        if self.left == 0 or len(ids) == 0:
            return
        if self.rows is None:  # open: every row not copied yet is pending
            copied = self._copied
            if copied is not None and not kernels.any_flagged(copied, ids, False):
                return
            with self.lock:
                if self.cache is None:
                    return
                if self.rows is None:
                    self._copy_open(ids)
                    return
            # fixed meanwhile: go on as a fixed snapshot
        if self._flags is not None:
            if not kernels.any_flagged(self._flags, ids):
                return
            with self.lock:
                if self.cache is None or self.left <= 0:
                    return
                out = np.empty(len(ids), dtype=np.int64)
                rows = out[:kernels.take_flagged(self._flags, ids, out)]
                if len(rows) == 0:
                    return
                w, s = self.cache.read_rows(rows)
                self._side.append((rows, w, s))  # unsorted: merge_copied places them
                self.left -= len(rows)
                self.copied_on_write += len(rows)
            return
        if self._still is None or self.rows is None or len(self.rows) == 0:
            return
        k = np.searchsorted(self.rows, ids)
        k[k == len(self.rows)] = 0
        hit = (self.rows[k] == ids) & self._still[k]
        if not hit.any():
            return
        with self.lock:
            got = self._take_pending(np.unique(k[hit]))
            if got is not None:
                self._side.append((self.rows[got[0]], got[1], got[2]))
                self.copied_on_write += len(got[0])

    def copy_range(self, lo: int, hi: int, w_out: np.ndarray, s_out: np.ndarray,
                   base: int) -> int:
        """The writer: copy the pending rows among snapshot rows [lo, hi) to
        ``w_out[k - base]`` / ``s_out[k - base]`` (one lock hold). Returns how many. Rows in
        DRAM of a dense float32 table are copied by one numba call that releases the GIL, so
        the training thread is not held up by the writer's Python."""
        hi = min(hi, len(self.rows))
        done = 0
        with self.lock:
            c = self.cache
            if c is None or self.left <= 0 or hi <= lo:
                return 0
            if self._flags is not None and c._dense is not None \
                    and c.weights.dtype == w_out.dtype == np.float32:
                copied = np.empty(hi - lo, dtype=np.int64)
                missing = np.empty(hi - lo, dtype=np.int64)
                done, m = kernels.copy_flagged_rows(self._flags, self.rows, lo, hi, c._dense,
                                                    c.weights, c.state, w_out, s_out, base,
                                                    copied, missing)
                pins.fence()  # the copies are done before a flag says so (see the class doc)
                self._flags[self.rows[copied[:done]]] = 0
                self.left -= done
                got = self._take_pending(missing[:m]) if m else None  # from SCM
            else:
                got = self._take_pending(np.arange(lo, hi, dtype=np.int64))
        if got is not None:
            k, w, s = got
            w_out[k - base] = w
            s_out[k - base] = s
            done += len(k)
        return done

    def merge_copied(self, lo: int, hi: int, w_out: np.ndarray, s_out: np.ndarray) -> None:
        """The writer, after :meth:`copy_range` has covered [lo, hi): the rows of [lo, hi) the
        write path copied before, to ``w_out[k - lo]`` / ``s_out[k - lo]``. (No row of the
        range is pending any more, so no copy of one can be added meanwhile.)"""
        if hi <= lo:
            return
        with self.lock:
            side = list(self._side)
        part = self.rows[lo:hi]
        first, last = part[0], part[-1]
        for rows, w, s in side:
            sel = np.flatnonzero((rows >= first) & (rows <= last))
            if len(sel):
                j = np.searchsorted(part, rows[sel])
                w_out[j] = w[sel]
                s_out[j] = s[sel]

    def drain(self) -> None:
        """Copy every pending row now (to the side list) and detach: the tier is going away.
        An open snapshot first waits for the writer to :meth:`fix` its rows."""
        self.fixed.wait()
        with self.lock:
            if self.rows is not None and self.cache is not None:
                got = self._take_pending(np.arange(len(self.rows), dtype=np.int64))
                if got is not None:
                    self._side.append((self.rows[got[0]], got[1], got[2]))
            self._detach()

    def release(self) -> None:
        """Detach from the tier (the snapshot is written, or abandoned): rows still pending
        are no longer copied."""
        with self.lock:
            self._detach()

    def _detach(self) -> None:
        if self.cache is not None and self.cache.cow is self:
            self.cache.cow = None
        self.cache = None
        self.left = 0
        self._copied = self._copied_ids = None
        self._slot_mod = self._slot_dirty = self._row_mod = None
        self.fixed.set()


class SlabWriter:
    """The in-place write path on slab positions, shared by the DRAM tier (in the owner
    process) and a client attached to the service's slab. Needs ``spec``, ``weights``,
    ``state``, ``dirty`` (numpy views of the slab) and calls :meth:`_init_scratch` once."""

    spec: TableSpec
    weights: np.ndarray
    state: np.ndarray
    dirty: np.ndarray
    modified: np.ndarray

    def _init_scratch(self) -> None:
        #: a bit per slab position, zero between calls (distinct positions of a batch)
        self._mark = np.zeros((self.weights.shape[0] + 7) // 8, dtype=np.uint8)
        #: the fused kernel's sort buffers (two int64 per contribution), reused between calls
        self._keys = np.empty(0, dtype=np.int64)
        #: True: fused numba kernels on float32 tables; False: the plain torch path.
        self.fused = True

    def _apply_resident(self, pos, src, scale, g) -> None:
        """The optimizer on resident slab rows: contribution i is ``scale[i] * g[src[i]]``
        (scale empty: 1) to position ``pos[i]``; contributions at position 0 (rows not
        resident) are skipped; duplicates summed first, rows flagged dirty and
        modified after their update. Fused numba kernel for float32 slabs (its packed sort
        keys need positions below 2**31 and fewer than 2**32 contributions), torch otherwise."""
        if not self._fused_update(pos, src, scale, g, self.weights, self.state, self.dirty,
                                  self.modified, first=1):
            keep = pos != 0
            if not keep.all():
                pos, src = pos[keep], src[keep]
                scale = scale[keep] if len(scale) else scale
            self._apply_resident_torch(pos, src, scale, g)

    def _fused_update(self, pos, src, scale, g, w, state, dirty, modified, first=0,
                      scratch=None) -> bool:
        """The fused kernel (kernels.apply_rows) on rows ``pos`` of the slab ``w``/``state``
        (flags ``dirty``/``modified`` set per updated row; positions below ``first``
        skipped; ``scratch``: int64[>= 2 len(pos)] sort buffer, default this object's);
        False, with nothing done, where it does not apply (:meth:`_fusable`)."""
        if not self._fusable(w, len(pos), len(g)):
            return False
        opt = self.spec.optimizer
        kernels.apply_rows(_KERNEL_KIND[type(opt)], pos, src, scale, g, w, state, dirty,
                           modified, opt.lr, getattr(opt, "eps", 0.0),
                           getattr(opt, "weight_decay", 0.0),
                           self._scratch(len(pos)) if scratch is None else scratch, first)
        return True

    def _fusable(self, w: np.ndarray, n_pos: int, n_grad: int) -> bool:
        """Whether the fused kernel applies: float32 slabs only, and its packed sort keys need
        positions below 2**31 and fewer than 2**32 contributions."""
        return (self.fused and type(self.spec.optimizer) in _KERNEL_KIND
                and w.dtype == np.float32 and len(w) <= 2**31 and max(n_pos, n_grad) < 2**32)

    def _distinct_slots(self, pos: np.ndarray) -> np.ndarray:
        """Distinct policy slots (position - 1) of resident positions, first-occurrence order."""
        out = np.empty(len(pos), dtype=np.int64)
        u = kernels.distinct_positions(pos, self._mark, out)
        return out[:u] - 1

    def _scratch(self, n: int) -> np.ndarray:
        """The fused kernel's sort buffer for n contributions (int64[>= 2n]), grown
        geometrically and reused."""
        if len(self._keys) < 2 * n:
            self._keys = np.empty(max(2 * n, 2 * len(self._keys)), dtype=np.int64)
        return self._keys

    def _apply_resident_torch(self, pos, src, scale, g) -> None:
        """The same update with plain torch ops (sort-based dedupe, index_add, gather/scatter);
        the path of float16 tables, and the measured alternative to the fused kernel
        (benchmarks/bench_kernels.py)."""
        upos, summed = _sum_contributions(pos, src, scale, g)
        w = torch.from_numpy(self.weights[upos].astype(np.float32))
        s = torch.from_numpy(self.state[upos])
        self.spec.optimizer.update(w, s, summed)
        self.weights[upos] = w.numpy().astype(self.weights.dtype)
        self.state[upos] = s.numpy()
        self.dirty[upos] = 1
        self.modified[upos] = 1


class DDRCache(SlabWriter):
    """The DRAM tier of one table. One owner process mutates it; see module docstring."""

    def __init__(self, spec: TableSpec, capacity: int, backing, policy: CachePolicy,
                 shm_prefix: str, *, unlink: bool = True,
                 tracker: ModifiedRows | None = None) -> None:
        self.spec = spec
        #: rows modified since the last checkpoint that are no longer (or never were) in a slot
        self.tracker = tracker or ModifiedRows(spec.num_rows, spec.id_space == "dense")
        self.layout = spec.layout
        self.capacity = int(capacity)
        self.backing = backing
        self.policy = policy
        cap1 = self.capacity + 1
        id_type = np.dtype(np.int32 if spec.id_space == "dense" and spec.num_rows < 2**31
                           else np.int64)
        self._segments = [
            shm.create(f"{shm_prefix}.w", (cap1, spec.dim), self.layout.np_dtype, unlink=unlink,
                       huge=True),
            shm.create(f"{shm_prefix}.s", (cap1, self.layout.state_dim), np.float32, unlink=unlink,
                       huge=True),
            shm.create(f"{shm_prefix}.meta", (cap1, id_type.itemsize + 2), np.uint8,
                       unlink=unlink),
            shm.create(f"{shm_prefix}.ctrl", (pins.CTRL_WORDS,), np.int64, unlink=unlink),
        ]
        self._unlink_on_close = not unlink
        self.id_dtype = id_type
        #: control words of the client protocol (tiers/pins.py): eviction generation, retired
        self.ctrl = self._segments[3].array
        self.weights = self._segments[0].array
        self.state = self._segments[1].array
        meta = self._segments[2].array.reshape(-1)
        self.row_of_pos = meta[: id_type.itemsize * cap1].view(id_type)
        self.row_of_pos[:] = -1
        self.dirty = meta[id_type.itemsize * cap1: (id_type.itemsize + 1) * cap1]
        #: 1 = updated since the last checkpoint (folded into ``tracker`` on eviction)
        self.modified = meta[(id_type.itemsize + 1) * cap1:]
        self.weights_t = torch.from_numpy(self.weights)
        if spec.id_space == "dense":
            self.index: DenseIndex | HashIndex = DenseIndex(spec.num_rows, f"{shm_prefix}.idx",
                                                            unlink=unlink)
        else:
            self.index = HashIndex(self.capacity)
        bind = getattr(policy, "bind_rows", None)
        if bind is not None:  # the policy reads slot -> row from our array (no copy)
            bind(self.row_of_pos[1:])
        self._dense = self.index.array if isinstance(self.index, DenseIndex) else None
        #: the row file :meth:`_exchange` admits from (dense tables on a row file), else None
        self._exchange_file = (backing if self._dense is not None and self.tracker.flags
                               is not None and hasattr(backing, "write_records") else None)
        #: admit batches with the one-call kernel where it applies (:meth:`_exchange`); the
        #: numpy steps otherwise, which tests compare it with
        self.exchange_kernel = True
        self._track_hits = policy.tracks_hits
        self.resident = 0
        self.counters = dict(lookups=0, hits=0, misses=0, evictions=0, writebacks=0, bypassed=0)
        self._init_scratch()
        #: bumped whenever a row enters or leaves the slab: positions read at an epoch stay
        #: valid while it lasts (a batch's positions are reused from its fast-path gather and
        #: by its backward)
        self._epoch = 0
        self._gathered: tuple[int, int, int, np.ndarray] | None = None
        self._resolved: tuple[np.ndarray, np.ndarray, int] | None = None
        self._rows = RowMarks(spec.num_rows, spec.id_space == "dense")
        #: the copy-on-write snapshot in progress (a checkpoint being written), if any
        self.cow: CowSnapshot | None = None
        #: the last bypass read (backing generation, rows, weights, state): the backward of
        #: the same batch updates those rows on SCM and reuses it while current
        self._bypass_read: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        #: a batch resolved ahead of its forward (:meth:`prefetch`): ids, positions, bypass
        #: rows and the epoch they are valid at
        self._prefetched: tuple[np.ndarray, np.ndarray, Bypass | None, int] | None = None
        #: the whole (dense) table fits: every row is loaded now, row r in slot r, and never
        #: evicted, so a batch's positions are its ids + 1 (no index read on the fast path)
        self.full_table = (spec.id_space == "dense" and self.capacity >= spec.num_rows
                           and spec.num_rows * self.layout.payload_bytes <= PRELOAD_MAX_BYTES)
        if self.full_table:
            self._preload()
        pins.fence()  # load the compiled fence now, not inside a checkpoint's stall (~3 ms)

    def _preload(self, chunk: int = 1 << 16) -> None:
        """Load every row of the table into slot = row id (SCM values, or initial values for
        rows never written). Not counted as lookups."""
        from tqdm import tqdm
        fresh = self.backing.rows_written() == 0
        big = self.spec.num_rows * self.layout.payload_bytes >= PRELOAD_BAR_BYTES
        for lo in tqdm(range(0, self.spec.num_rows, chunk), unit="chunk", leave=False,
                       desc=f"loading table {self.spec.name!r} into DRAM",
                       disable=None if big else True):
            rows = np.arange(lo, min(lo + chunk, self.spec.num_rows), dtype=np.int64)
            pos = rows + 1
            if fresh:  # nothing on SCM yet: skip reading a file of zeros
                self.weights[pos] = initial_rows(self.spec.init, self.spec.seed, rows,
                                                 self.spec.dim, self.layout.np_dtype)
                self.state[pos] = 0.0
            else:
                self._read_into_slots(rows, pos)
            self._install(rows, pos)

    # -- residency -------------------------------------------------------------------------
    def end_op(self) -> None:
        """Nothing to release in the owner process (clients unpin here)."""

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Slab rows (slot + 1) of ``ids`` (int64, in range); 0 where not resident. No side
        effects."""
        if self.full_table:
            return ids.astype(np.int64, copy=False) + 1
        if self._dense is not None:
            pos = np.empty(len(ids), dtype=np.int64)
            kernels.gather_positions(np.ascontiguousarray(ids, dtype=np.int64), self._dense, pos)
            return pos
        return self.index.get(ids)

    def resident_positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Fast path of :meth:`resolve` for a dense table: if every id is in range and resident,
        count the batch as hits and return its positions (int64 tensor); otherwise None (no
        side effects; the caller range-checks and takes the slow path).
        """
        if self._dense is None:
            return None
        n = ids.shape[0]
        pos = np.empty(n, dtype=np.int64)  # torch's embedding_bag: int64 is ~7% faster
        if self.full_table:
            if identity_positions(ids.numpy(), self.spec.num_rows, pos) != IN_RANGE:
                return None
        else:
            ids_np = ids.numpy()
            status = kernels.gather_positions(ids_np, self._dense, pos)
            if status != kernels.ALL_RESIDENT:
                # resolve() of this batch, called next, starts from these positions
                self._gathered = ((ids_np.ctypes.data, n, self._epoch, pos)
                                  if status == kernels.SOME_MISSING else None)
                return None
        self._gathered = None
        self._record_all_hits(pos)
        return torch.from_numpy(pos)

    def _record_all_hits(self, pos: np.ndarray) -> None:
        """Count a batch whose rows are all resident and tell the policy (if it tracks hits)."""
        n = len(pos)
        self.counters["lookups"] += n
        self.counters["hits"] += n
        if self._track_hits and n:
            self.policy.access(self._distinct_slots(pos), _EMPTY)

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, Bypass | None]:
        """Make the rows of one batch resident as far as the policy admits them.

        ids: int64 [n] (validated by the caller). Returns slab positions [n] (0 for rows served
        from the returned Bypass) and the bypass rows, if any. Counts lookups/hits/misses with
        first-occurrence semantics: a distinct missing row is one miss however often it appears.
        """
        pos = self._gathered_positions(ids)
        n = len(ids)
        m = self._rows.split_misses(ids, pos, self._mark, self._track_hits)
        self.counters["lookups"] += n
        self.counters["misses"] += len(m.rows)
        self.counters["hits"] += n - len(m.rows)
        if not len(m.rows):
            if len(m.hit_slots):
                self.policy.access(m.hit_slots, _EMPTY)
            self._remember_positions(ids, pos)
            return pos, None
        adm = self.policy.access(m.hit_slots, m.rows)
        admitted = np.asarray(adm.slots, dtype=np.int64) + 1
        if len(admitted) == len(m.rows):  # all admitted: their positions are the slots
            self._admit(m.rows, admitted)
            got, rest = admitted, _EMPTY
        else:
            self._admit(m.rows[adm.admit], admitted)
            got, rest = self.positions(m.rows), m.rows[~adm.admit]
        pos[m.at] = got[m.where]
        self._remember_positions(ids, pos)
        if len(rest) == 0:
            return pos, None
        self.counters["bypassed"] += len(rest)
        w, s = self._read_bypass(rest)
        return pos, Bypass(rest, w, s, *bypass_map(got, m.where, m.at))

    def prefetch(self, ids: np.ndarray) -> None:
        """Resolve a coming batch now (``Store.prefetch``): its lookups are counted, the policy
        decides its misses and admits them, its bypassed rows are read, all as that batch's
        own :meth:`resolve` would; :meth:`take_prefetched` then hands the result to the
        batch's forward. ids: int64 [n], in range, not changed by the caller afterwards."""
        pos = self.resident_positions(torch.from_numpy(ids))
        if pos is not None:
            pos_np, bypass = pos.numpy(), None
        else:
            pos_np, bypass = self.resolve(ids)
        self._prefetched = (ids, pos_np, bypass, self._epoch)

    def take_prefetched(self, ids: torch.Tensor) -> tuple[np.ndarray, Bypass | None] | None:
        """The positions and bypass rows :meth:`prefetch` found for exactly ``ids`` (int64
        tensor), if no row entered or left DRAM since; else None. Either way the prefetched
        batch is forgotten (it is used once)."""
        saved, self._prefetched = self._prefetched, None
        if (saved is None or saved[3] != self._epoch
                or not np.array_equal(saved[0], ids.numpy())):
            return None
        return saved[1], saved[2]

    def _gathered_positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``: those :meth:`resident_positions` just gathered for this very
        batch (same buffer and length, no admission or eviction since), else read now."""
        saved, self._gathered = self._gathered, None
        if (saved is not None and saved[0] == ids.ctypes.data and saved[1] == len(ids)
                and saved[2] == self._epoch):
            return saved[3]
        return self.positions(ids)

    def _remember_positions(self, ids: np.ndarray, pos: np.ndarray) -> None:
        """Keep a resolved batch's positions for its backward (:meth:`_batch_positions`)."""
        if self._dense is not None and not self.full_table:
            self._resolved = (ids.copy(), pos, self._epoch)

    def _batch_positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids``: the last resolved batch's when ``ids`` equal its ids and no
        row was admitted or evicted since (a backward after its forward: one sequential
        compare instead of a random gather from the index), else read now."""
        saved = self._resolved
        if (saved is not None and saved[2] == self._epoch and len(saved[0]) == len(ids)
                and np.array_equal(saved[0], ids)):
            return saved[1]
        return self.positions(ids)

    def count_distinct_rows(self, rows: np.ndarray) -> int:
        """How many distinct ids ``rows`` (int64, in range) holds: one linear pass with the
        table's marks (a sort for sparse or huge tables)."""
        return len(self._rows.first_occurrence(rows)[0])

    def count_distinct_slots(self, slots: np.ndarray) -> int:
        """How many distinct slots ``slots`` (int64 in [0, capacity)) holds: one linear pass."""
        return len(self._distinct_slots(slots + 1))

    def _admit(self, rows: np.ndarray, pos: np.ndarray) -> None:
        if len(rows) == 0:
            return
        cow = self.cow
        if cow is None:
            self._admit_rows(rows, pos)
            return
        with cow.lock:  # a snapshot copy must not read a slot being evicted and refilled
            self._admit_rows(rows, pos)

    def _admit_rows(self, rows: np.ndarray, pos: np.ndarray) -> None:
        if self.exchange_kernel and self._exchange_file is not None and self.cow is None:
            self._exchange(rows, pos)
            return
        old = self.row_of_pos[pos]
        occupied = old >= 0
        if occupied.any():
            self._evict(pos[occupied], old[occupied])
            self.resident -= int(occupied.sum())
        self._read_into_slots(rows, pos)
        self._install(rows, pos)

    def _exchange(self, rows: np.ndarray, pos: np.ndarray) -> None:
        """:meth:`_admit_rows` (evict what ``pos`` holds, read ``rows`` in) in one kernel call
        over the slab and the row file's records (tiers/exchange.py): dense tables on a row file, no
        snapshot open. Same effects, counters and writes."""
        rf = self._exchange_file
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        rf.wait_for(rows)
        n = len(rows)
        rec = np.empty((n, self.layout.record_bytes), dtype=np.uint8)
        out_rows = np.empty(n, dtype=np.int64)
        fresh = np.empty(n, dtype=np.int64)
        counts = np.zeros(3, dtype=np.int64)
        exchange_rows(rf.records, rows, pos, self.layout.state_offset, self.layout.flag_offset,
                      as_bytes(self.weights), as_bytes(self.state), self.row_of_pos, self.dirty,
                      self.modified, self.tracker.flags, self._dense, rec, out_rows, fresh,
                      counts)
        evicted, written, nf = int(counts[EVICTED]), int(counts[WRITTEN]), int(counts[FRESH])
        rf.write_records(out_rows[:written], rec[:written])
        if nf:
            f = fresh[:nf]
            self.weights[pos[f]] = initial_rows(self.spec.init, self.spec.seed, rows[f],
                                                self.spec.dim, self.layout.np_dtype)
            self.state[pos[f]] = 0.0
        self.counters["evictions"] += evicted
        self.counters["writebacks"] += written
        self.resident += n - evicted
        self._epoch += 1

    def _read_into_slots(self, rows: np.ndarray, pos: np.ndarray) -> None:
        """Copy ``rows`` from SCM into the slab rows ``pos`` (the twin of :meth:`_write_back`):
        straight from the row file's mapping where the backing can (RowFile.read_into)."""
        read_into = getattr(self.backing, "read_into", None)
        if read_into is None:
            self.weights[pos], self.state[pos] = self.backing.read(rows)
        else:
            read_into(rows, self.weights, self.state, pos)

    def _install(self, rows: np.ndarray, pos: np.ndarray) -> None:
        """Make the free slots ``pos``, whose slab rows already hold ``rows``' values, hold
        ``rows`` (clean)."""
        self.row_of_pos[pos] = rows
        self.dirty[pos] = 0
        self.index.put(rows, pos)
        self._epoch += 1
        self.resident += len(rows)

    def _evict(self, pos: np.ndarray, rows: np.ndarray) -> None:
        dirty = self.dirty[pos] != 0
        if dirty.any():
            dp = pos[dirty]
            self._write_back(rows[dirty], dp)
            self.counters["writebacks"] += len(dp)
        self._fold_modified(pos, rows)
        self.index.remove(rows)
        self._epoch += 1
        self.row_of_pos[pos] = -1
        self.counters["evictions"] += len(rows)

    def _fold_modified(self, pos: np.ndarray, rows: np.ndarray) -> None:
        """Slots ``pos`` (holding ``rows``) are being evicted: move their modified flags into
        the tracker, and those an open snapshot took into its record (the caller holds the
        snapshot's lock)."""
        cow = self.cow
        if cow is not None:
            cow.slots_leaving(pos, rows)
        flags = self.tracker.flags
        if flags is not None:
            ck.clear_slots(self.modified, pos, rows, flags)
            return
        mod = self.modified[pos] != 0
        if mod.any():
            self.tracker.add(rows[mod])
            self.modified[pos[mod]] = 0

    # -- writes ----------------------------------------------------------------------------
    def apply(self, ids: np.ndarray, src: np.ndarray, scale: np.ndarray | None,
              grad: torch.Tensor) -> None:
        """Apply the table's optimizer: contribution i is ``scale[i] * grad[src[i]]`` to row
        ``ids[i]``; contributions to one row are summed first. Resident rows are updated in the
        slab (and marked dirty); other rows are read, updated and written on SCM."""
        cow = self.cow
        if cow is not None:
            cow.copy_before_write(ids)
        pos = self._batch_positions(ids)
        g = grad.detach().to(torch.float32).contiguous().numpy()
        if scale is None:
            scale = np.empty(0, dtype=np.float32)
        if self.full_table:  # every row resident
            self._apply_resident(pos, src, scale, g)
            return
        away = self._rows.away_updates(ids, pos, src, scale)
        if len(away.rows):
            self._apply_on_scm(away.rows, away.at, away.src, away.scale, g)
        self._apply_resident(pos, src, scale, g)

    def _apply_on_scm(self, rows, at, src, scale, g) -> None:
        """The optimizer on ``rows`` (distinct, not resident; contribution i goes to
        ``rows[at[i]]``): read them (or reuse the forward's read), update, write back to SCM.
        float32 tables use the fused kernel on the read rows as a small slab of their own, so
        these rows get exactly the resident rows' arithmetic."""
        w, s = self._read_scm(rows)  # arrays of our own, to update
        w, s = np.ascontiguousarray(w), np.ascontiguousarray(s)
        flags = np.zeros(len(rows), dtype=np.uint8)
        update = getattr(self.backing, "update", None)
        if update is not None and self._fusable(w, len(at), len(g)) and not write_behind.busy():
            # on the row file's background thread (idle now): the caller's gradient may
            # change once we return, so the job gets a copy (the other arrays are our own)
            g = g.copy()
            update(rows, w, s, lambda w, s: self._fused_update(
                at, src, scale, g, w, s, flags, flags, scratch=np.empty(2 * len(at), np.int64)))
            self.tracker.add(rows)
            return
        if not self._fused_update(at, src, scale, g, w, s, flags, flags):
            wt, st = torch.from_numpy(w.astype(np.float32)), torch.from_numpy(s)
            self.spec.optimizer.update(wt, st, sum_at(at, len(rows), src, scale, g))
            w, s = wt.numpy().astype(self.layout.np_dtype), st.numpy()
        self.backing.write(rows, w, s)
        self.tracker.add(rows)

    def _read_bypass(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read rows the policy did not admit, and remember the read for :meth:`_read_scm`
        (the arrays are shared with the Bypass, which only reads them)."""
        w, s = self.backing.read(rows)
        gen = getattr(self.backing, "generation", None)
        if gen is not None:
            self._bypass_read = (gen, rows, w, s)
        return w, s

    def _read_scm(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights and state of non-resident ``rows`` (distinct) as SCM holds them, in arrays
        the caller may update: from the last bypass read where the row file has not changed
        since (a batch's backward after its forward), the rest from the file. When ``rows``
        are exactly the bypass read's rows in its order (the usual backward), its arrays are
        handed over as they are and forgotten here."""
        saved = self._bypass_read
        if saved is None or saved[0] != getattr(self.backing, "generation", None):
            return self.backing.read(rows)
        _, brows, sw, ss = saved
        if len(brows) == len(rows) and np.array_equal(brows, rows):
            self._bypass_read = None
            return sw, ss
        order = np.argsort(brows)
        srows = brows[order]
        k = np.minimum(np.searchsorted(srows, rows), len(srows) - 1)
        have = srows[k] == rows
        if have.all():
            i = order[k]
            return sw[i], ss[i]
        w = np.empty((len(rows), sw.shape[1]), dtype=sw.dtype)
        s = np.empty((len(rows), ss.shape[1]), dtype=ss.dtype)
        i = order[k[have]]
        w[have], s[have] = sw[i], ss[i]
        w[~have], s[~have] = self.backing.read(rows[~have])
        return w, s

    # -- durability ------------------------------------------------------------------------
    def flush_dirty(self) -> int:
        """Write every dirty resident row back to SCM; returns how many."""
        pos = np.flatnonzero(self.dirty)
        if len(pos):
            # Clear first: a client writing one of these rows meanwhile sets its bit again
            # after its write, so the row goes out on the next flush (see tiers/pins.py).
            self.dirty[pos] = 0
            pins.fence()
            self._write_back(self.row_of_pos[pos], pos)
            self.counters["writebacks"] += len(pos)
        return len(pos)

    def _write_back(self, rows: np.ndarray, pos: np.ndarray) -> None:
        """Write the slab rows ``pos`` (holding ``rows``) to SCM."""
        write_slots = getattr(self.backing, "write_slots", None)
        if write_slots is None:
            self.backing.write(rows, self.weights[pos], self.state[pos])
        else:
            write_slots(rows, self.weights, self.state, pos)

    def take_modified(self) -> np.ndarray:
        """Sorted distinct rows modified since the last call (or since open); clears the
        record. Flags are cleared before the caller reads the rows, so a concurrent update
        (a client writing the slab) is either read now or marked again for next time.

        It is part of a checkpoint's stall: for dense tables one numba pass over the slots
        and one over the tracker's per-row flags (about 5x numpy's nonzero/scatter/nonzero)."""
        flags = self.tracker.flags
        if flags is not None:
            kernels.fold_modified(self.modified, self.row_of_pos, flags)
            pins.fence()
            out = np.empty(np.count_nonzero(flags) + 1, dtype=np.int64)
            return out[:kernels.flagged_rows(flags, out, True)]
        pos = np.flatnonzero(self.modified)
        if len(pos):
            self.modified[pos] = 0
            pins.fence()
            self.tracker.add(self.row_of_pos[pos].astype(np.int64))
        return self.tracker.take()

    def fold_all_modified(self) -> None:
        """Before this tier is closed: keep every slot's modified flag in the tracker. (The
        flags an open snapshot took are its writer's to fold: closing waits for that.)"""
        pos = np.flatnonzero(self.modified)
        if len(pos):
            self.tracker.add(self.row_of_pos[pos].astype(np.int64))
            self.modified[pos] = 0

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Current weights and state of ``rows`` (DRAM if resident, else SCM), without
        admitting anything or counting lookups. SCM is read only for the rows not resident
        (reading a never-written row there means generating it)."""
        pos = self.positions(rows)
        res = pos > 0
        if res.all():
            return self.weights[pos], self.state[pos]
        if not res.any():
            return self.backing.read(rows)
        w = np.empty((len(rows), self.spec.dim), dtype=self.weights.dtype)
        s = np.empty((len(rows), self.state.shape[1]), dtype=np.float32)
        out = ~res
        w[out], s[out] = self.backing.read(rows[out])
        p = pos[res]
        w[res] = self.weights[p]
        s[res] = self.state[p]
        return w, s

    def snapshot_rows(self, rows: np.ndarray | None) -> CowSnapshot:
        """Start a copy-on-write snapshot of ``rows`` (sorted distinct int64 ids), or, with
        None, an open one that takes the modified-row record (as :meth:`take_modified`, but
        enumerated later by the snapshot's owner) and keeps every row until ``fix``: see
        :class:`CowSnapshot`. One at a time per tier."""
        if self.cow is not None:
            raise RuntimeError(f"table {self.spec.name!r}: a snapshot is already in progress")
        snap = CowSnapshot(self, rows)
        if rows is None or len(rows):
            self.cow = snap
        else:
            snap.release()
        return snap

    def dirty_rows(self) -> int:
        return int(np.count_nonzero(self.dirty))

    # -- accounting ------------------------------------------------------------------------
    def dram_bytes(self) -> dict[str, int]:
        return {
            "slab": self.weights.nbytes + self.state.nbytes,
            "slot_metadata": (self.row_of_pos.nbytes + self.dirty.nbytes
                              + self.modified.nbytes + self._mark.nbytes),
            "policy": self.policy.metadata_bytes(),
            "index": self.index.resident_bytes(),
        }

    def close(self) -> None:
        if self.cow is not None:  # the snapshot in progress copies its rows before they go
            self.cow.drain()
        self.weights_t = None
        self.index.close()
        for seg in self._segments:
            seg.close()
            if self._unlink_on_close:
                shm.unlink(seg.name)
        if self._unlink_on_close and isinstance(self.index, DenseIndex):
            shm.unlink(self.index.segment.name)

    # -- sharing with clients (the service side of tiers/pins.py) ----------------------------
    def shared_layout(self) -> dict:
        """What a client needs to map this tier: segment names, shapes and dtypes (JSON-able).
        Only dense tables expose their index (sparse tables resolve every batch through the
        service)."""
        cap1 = self.capacity + 1
        return {
            "capacity": self.capacity,
            "weights": [self._segments[0].name, [cap1, self.spec.dim], self.layout.np_dtype.str],
            "state": [self._segments[1].name, [cap1, self.layout.state_dim], "<f4"],
            "meta": [self._segments[2].name, [cap1, self.id_dtype.itemsize + 2], "|u1"],
            "ctrl": [self._segments[3].name, [pins.CTRL_WORDS], "<i8"],
            "index": ([self.index.segment.name, [self.spec.num_rows], "<i4"]
                      if isinstance(self.index, DenseIndex) else None),
            "id_dtype": self.id_dtype.str,
            "tracks_hits": bool(self._track_hits),
            "full_table": bool(self.full_table),
        }

    def resolve_for_client(self, rows: np.ndarray, hit_slots: np.ndarray, lookups: int,
                           client_pins) -> tuple[np.ndarray, Bypass | None]:
        """Service side of a client's miss: make distinct ``rows`` resident as far as the policy
        admits them, never evicting a slot pinned by any client.

        rows: distinct int64 ids the client could not serve from DRAM (some may have become
        resident meanwhile: they count as hits); hit_slots: distinct slots the client's batch
        hit (for the policy); lookups: ids in the client's batch (for the counters);
        client_pins: callable returning bool[capacity], read between the fences.
        Returns positions for ``rows`` (0 = served from the Bypass) and the bypass rows.
        """
        self.ctrl[pins.GEN] += 1
        pins.fence()
        try:
            pos = self.positions(rows)
            missing = pos == 0
            miss_rows = rows[missing]
            now_hit = pos[~missing] - 1
            hit_slots = np.unique(np.concatenate([hit_slots, now_hit])) if len(now_hit) \
                else hit_slots
            self.counters["lookups"] += lookups
            self.counters["misses"] += len(miss_rows)
            self.counters["hits"] += lookups - len(miss_rows)
            if not len(miss_rows):
                if self._track_hits and len(hit_slots):
                    self.policy.access(hit_slots, _EMPTY)
                return pos, None
            saved = self.policy.pinned.copy()
            self.policy.pinned |= client_pins()
            try:
                adm = self.policy.access(hit_slots if self._track_hits else _EMPTY, miss_rows)
            finally:
                self.policy.pinned[:] = saved
            self._admit(miss_rows[adm.admit], np.asarray(adm.slots, dtype=np.int64) + 1)
            pos[missing] = self.positions(miss_rows)
        finally:
            pins.fence()
            self.ctrl[pins.GEN] += 1
        rest = miss_rows[~adm.admit]
        if len(rest) == 0:
            return pos, None
        self.counters["bypassed"] += len(rest)
        w, s = self._read_bypass(rest)
        return pos, Bypass(rest, w, s)

    def retire(self) -> None:
        """Tell attached clients this slab is being replaced (they attach again)."""
        self.ctrl[pins.RETIRED] = 1
        pins.fence()
