"""The read and write operations on one table's DRAM tier, shared by the embedded
:class:`tierstore.Store` and the service client (:mod:`tierstore.client`).

``cache`` is the table's DRAM tier as this process sees it: the owner's
:class:`~tierstore.tiers.ddr.DDRCache` or a client's view of the service's slab. It provides
``weights_t`` (the slab as a tensor, row 0 zero), ``resident_positions(ids)`` (fast path: all
rows resident, or None), ``resolve(ids)`` (positions plus rows served from SCM),
``take_prefetched(ids)`` (the same for a batch ``prefetch`` resolved ahead, or None) and
``apply(ids, src, scale, grad)`` (optimizer update); ``end_op()`` is called when an operation is
done with the slab.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tierstore import checks
from tierstore.config import TableSpec
from tierstore.errors import InvalidInput

_MODES = {"sum": 0, "mean": 1}  # torch.embedding_bag's mode codes


def lookup(cache, spec: TableSpec, ids: Any) -> torch.Tensor:
    """Rows of ``ids`` as Tensor [n, dim] (see Store.lookup)."""
    rows = checks.ids(ids, spec, check_range=False)
    try:
        got = cache.take_prefetched(rows)
        if got is None:
            pos = cache.resident_positions(rows)
            if pos is not None:
                return cache.weights_t.index_select(0, pos)
            checks.id_range(rows, spec)
            got = cache.resolve(rows.numpy())
        pos_np, bypass = got
        out = cache.weights_t.index_select(0, torch.from_numpy(pos_np))
        if bypass is not None:
            where, k = bypass.positions(rows.numpy(), pos_np)
            out[torch.from_numpy(where)] = torch.from_numpy(bypass.w[k])
        return out
    finally:
        cache.end_op()


def pooled(cache, spec: TableSpec, indices: Any, offsets: Any, mode: str = "sum",
           per_sample_weights: Any = None, include_last_offset: bool = False) -> torch.Tensor:
    """Pooled rows per bag as Tensor [B, dim] (see Store.pooled)."""
    rows, off, psw = _pooled_inputs(spec, indices, offsets, mode, per_sample_weights,
                                    include_last_offset)
    try:
        got = cache.take_prefetched(rows)
        if got is None:
            pos = cache.resident_positions(rows)
            if pos is not None:  # every row in DRAM: one fused gather-and-pool
                return _pool_resident(cache.weights_t, pos, off, mode, psw)
            checks.id_range(rows, spec, "indices")
            got = cache.resolve(rows.numpy())
        pos_np, bypass = got
        return _pool(cache.weights_t, torch.from_numpy(pos_np), off, mode, psw, rows, bypass)
    finally:
        cache.end_op()


def weights_per_table(tables: Any, indices: Any, offsets: Any,
                      per_sample_weights: Any) -> list[Any]:
    """pooled_many's per-table weights (None each when not given), after checking that every
    argument has one entry per table. Raises InvalidInput."""
    n = len(tables)
    psws = [None] * n if per_sample_weights is None else list(per_sample_weights)
    if len(indices) != n or len(offsets) != n or len(psws) != n:
        raise InvalidInput(f"pooled_many: {n} tables, {len(indices)} indices, "
                           f"{len(offsets)} offsets, {len(psws)} per_sample_weights")
    return psws


class PendingPool:
    """A client's :func:`pooled` waiting for the service to resolve its misses: the checked
    inputs, the pinned positions and the misses (``AttachedTable.pin_batch``)."""

    def __init__(self, rows, off, mode, psw, pos, misses) -> None:
        self.rows, self.off, self.mode, self.psw = rows, off, mode, psw
        self.pos, self.misses = pos, misses


def pooled_begin(cache, spec: TableSpec, indices: Any, offsets: Any, mode: str = "sum",
                 per_sample_weights: Any = None,
                 include_last_offset: bool = False) -> "torch.Tensor | PendingPool":
    """The first half of :func:`pooled` on a client's table (``AttachedTable``): the output
    when every row is in DRAM (the operation is then over), else a :class:`PendingPool` whose
    misses the caller gets resolved (``misses.rows``, ``misses.hit_slots``) before
    :func:`pooled_end`. Raises what pooled raises (InvalidInput, Retry, Stale); a PendingPool
    holds pins until pooled_end or ``cache.end_op()``."""
    rows, off, psw = _pooled_inputs(spec, indices, offsets, mode, per_sample_weights,
                                    include_last_offset)
    pending = None
    try:
        got = cache.take_prefetched(rows)
        if got is None:
            pos = cache.resident_positions(rows)
            if pos is not None:
                return _pool_resident(cache.weights_t, pos, off, mode, psw)
            checks.id_range(rows, spec, "indices")
            pos_np, m = cache.pin_batch(rows.numpy())
            if m is not None:
                pending = PendingPool(rows, off, mode, psw, pos_np, m)
                return pending
            got = pos_np, None
        return _pool(cache.weights_t, torch.from_numpy(got[0]), off, mode, psw, rows, got[1])
    finally:
        if pending is None:  # the operation is over (or failed)
            cache.end_op()


def pooled_end(cache, p: PendingPool, got: np.ndarray, bypass: Any) -> torch.Tensor:
    """The output of ``p`` given the service's answer for its misses (positions ``got`` of
    ``p.misses.rows``, 0 = read from ``bypass``); ends the operation."""
    try:
        pos_np, bypass = cache.fill(p.pos, p.misses, got, bypass)
        return _pool(cache.weights_t, torch.from_numpy(pos_np), p.off, p.mode, p.psw, p.rows,
                     bypass)
    finally:
        cache.end_op()


def _pooled_inputs(spec, indices, offsets, mode, per_sample_weights, include_last_offset):
    """pooled's checked inputs: ids (range not checked yet), B + 1 offsets, weights or None."""
    rows = checks.ids(indices, spec, "indices", check_range=False)
    n = rows.shape[0]
    checks.mode(mode, spec)
    off = checks.offsets(offsets, n, include_last_offset, spec)
    return rows, off, checks.per_sample_weights(per_sample_weights, n, mode, spec)


def _pool_resident(weights, pos, off, mode, psw) -> torch.Tensor:
    """Every row in DRAM: one fused gather-and-pool."""
    return torch.embedding_bag(weights, pos, off, False, _MODES[mode], False, psw, True)[0]


def _pool(weights, pos, off, mode, psw, rows, bypass) -> torch.Tensor:
    """Pool slab positions ``pos`` (0: the zero row, or a row of ``bypass``)."""
    if bypass is None:
        return F.embedding_bag(pos, weights, off, mode=mode, per_sample_weights=psw,
                               include_last_offset=True)
    return _pooled_with_bypass(weights, pos, off, mode, psw, rows, bypass)


def _pooled_with_bypass(weights, pos, off, mode, psw, rows, bypass) -> torch.Tensor:
    """Rows the policy did not admit read the zero row; add their values from SCM."""
    out = F.embedding_bag(pos, weights, off, mode="sum", per_sample_weights=psw,
                          include_last_offset=True)
    off_np = off.numpy()
    where, k = bypass.positions(rows.numpy(), pos.numpy())
    # the bypass rows pooled per bag by a second embedding_bag over the rows read from SCM:
    # ``where`` is ascending, so bag b's entries are where[side_off[b]:side_off[b + 1]]
    side_off = torch.from_numpy(np.searchsorted(where, off_np))
    side_w = torch.from_numpy(bypass.w)
    side_psw = None if psw is None else psw[torch.from_numpy(where)].to(side_w.dtype)
    out += F.embedding_bag(torch.from_numpy(k), side_w, side_off, mode="sum",
                           per_sample_weights=side_psw, include_last_offset=True).to(out.dtype)
    if mode == "mean":
        lengths = torch.from_numpy(np.diff(off_np)).clamp(min=1).unsqueeze(1)
        out = out / lengths.to(out.dtype)
    return out


def apply_gradients(cache, spec: TableSpec, ids: Any, grads: Any) -> None:
    """Per-id gradients [n, dim] through the table's optimizer (see Store.apply_gradients)."""
    rows = checks.ids(ids, spec).numpy()
    g = checks.grads(grads, len(rows), spec)
    if len(rows):
        try:
            cache.apply(rows, np.arange(len(rows), dtype=np.int64), None, g)
        finally:
            cache.end_op()


def apply_pooled_gradients(cache, spec: TableSpec, indices: Any, offsets: Any,
                           grad_output: Any, mode: str = "sum", per_sample_weights: Any = None,
                           include_last_offset: bool = False) -> None:
    """Backward of :func:`pooled` fused with the optimizer (see Store.apply_pooled_gradients)."""
    rows = checks.ids(indices, spec, "indices").numpy()
    checks.mode(mode, spec)
    off = checks.offsets(offsets, len(rows), include_last_offset, spec).numpy()
    psw = checks.per_sample_weights(per_sample_weights, len(rows), mode, spec)
    g = checks.grads(grad_output, len(off) - 1, spec, "grad_output")
    if not len(rows):
        return
    lengths = np.diff(off)
    bag = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    scale = None
    if psw is not None:
        scale = psw.numpy()
    elif mode == "mean":
        scale = (1.0 / np.maximum(lengths, 1)).astype(np.float32)[bag]
    try:
        cache.apply(rows, bag, scale, g)
    finally:
        cache.end_op()
