"""A client's view of one table held by ``tierstored``: the shared slab mapped into this process.

Rows resident in DRAM are read (and, by the table's writer, updated) in place, with no round
trip; misses and updates of rows not in DRAM go to the service through the connection. The pin
protocol that makes this safe against concurrent eviction is in :mod:`tierstore.tiers.pins`.

Implements the tier interface of :mod:`tierstore.ops` (``weights_t``, ``resident_positions``,
``resolve``, ``apply``, ``end_op``), so the embedded store and the client share one
implementation of lookup, pooling and the fused backward.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tierstore import checks
from tierstore.config import TableSpec
from tierstore.errors import InvalidInput
from tierstore.optim import kernels
from tierstore.tiers import pins, shm
from tierstore.tiers.index import IN_RANGE, identity_positions
from tierstore.tiers.marks import Misses, RowMarks
from tierstore.tiers.ddr import Bypass, SlabWriter, bypass_map, sum_at

if TYPE_CHECKING:
    from tierstore.client.connection import Connection

_EMPTY = np.empty(0, dtype=np.int64)
RECENT_MAX = 1 << 20  # as the service's limit: slots of all-hit batches reported per request


class Stale(Exception):
    """The service replaced this table's slab (DRAM re-planned); attach again and retry."""


class Retry(Exception):
    """An unpinned read overlapped an eviction; take the batch again (pinned)."""


def _map(desc: list, writable: bool) -> tuple[shm.Segment, np.ndarray]:
    name, shape, dtype = desc
    seg = shm.attach(name, tuple(shape), np.dtype(dtype), writable=writable)
    return seg, seg.array


class AttachedTable(SlabWriter):
    """One table's DRAM tier as mapped by a client. ``writable``: this client is the table's
    writer (it may update rows in place); otherwise the slab is mapped read-only."""

    def __init__(self, conn: "Connection", reply: dict[str, Any], writable: bool) -> None:
        self.conn = conn
        self.spec = TableSpec.from_json(reply["spec"])
        self.name = self.spec.name
        self.writable = writable
        #: [lo, hi): the ids this client may update (a writer of a row range)
        self.write_range = tuple(reply.get("rows", (0, 2**63 - 1)))
        #: the range leaves out ids the caller's checks let through ([0, num_rows) for a dense
        #: table, any id >= 0 for a sparse one): only then do updates check it, two passes
        self._narrow_writer = (self.write_range[0] > 0 or self.write_range[1] < (
            self.spec.num_rows if self.spec.id_space == "dense" else 2**63 - 1))
        lay = reply["layout"]
        self.capacity = int(lay["capacity"])
        self.tracks_hits = bool(lay["tracks_hits"])
        #: every row resident in slot = row id (DDRCache.full_table): positions are ids + 1
        self.full_table = bool(lay.get("full_table", False))
        self._segments: list[shm.Segment] = []
        self.weights = self._attach(lay["weights"], writable)
        self.state = self._attach(lay["state"], writable)
        cap1 = self.capacity + 1
        meta = self._attach(lay["meta"], writable).reshape(-1)
        id_size = np.dtype(lay["id_dtype"]).itemsize
        self.dirty = meta[id_size * cap1: (id_size + 1) * cap1]
        self.modified = meta[(id_size + 1) * cap1:]
        self.ctrl = self._attach(lay["ctrl"], False)
        self.index = self._attach(lay["index"], False) if lay["index"] else None
        pin_name, pin_bytes = reply["pins"]
        raw = self._attach([pin_name, [pin_bytes], "|u1"], True)
        self.header = raw[: pins.HEADER_BYTES].view(np.int64)
        self.pins = raw[pins.HEADER_BYTES:].view(np.uint32)
        with warnings.catch_warnings():  # a read-only slab gives a read-only tensor; we never write it
            warnings.simplefilter("ignore", UserWarning)
            self.weights_t = torch.from_numpy(self.weights)
        self.seq = int(self.header[pins.SEQ])
        self._init_scratch()
        self._rows = RowMarks(self.spec.num_rows, self.spec.id_space == "dense")
        self._recent: list[np.ndarray] = []
        self._recent_n = 0
        self._read_gen: int | None = None  # generation an unpinned read started at
        self._force_pinned = False
        #: the last pinned batch missed: skip the unpinned all-resident attempt (a gather the
        #: pinned path repeats) until a batch is all resident again
        self._missed = False
        #: this table's next batch resolved ahead (Connection.prefetch), if any
        self.prefetched: Any = None

    def _attach(self, desc: list, writable: bool) -> np.ndarray:
        seg, arr = _map(desc, writable)
        self._segments.append(seg)
        return arr

    # -- operations (tier interface of tierstore.ops) -------------------------------------------
    def end_op(self) -> None:
        """Release this operation's pins (the next operation number makes them void). After
        an unpinned read (:meth:`resident_positions`), raise Retry if the service evicted or
        admitted meanwhile: the result is then discarded and the batch taken again, pinned."""
        g0, self._read_gen = self._read_gen, None
        if g0 is not None and not pins.read_valid(self.ctrl, g0):
            if self.ctrl[pins.RETIRED]:
                raise Stale(self.name)
            self._force_pinned = True
            raise Retry(self.name)
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        self.header[pins.SEQ] = self.seq

    def _pin(self, ids: np.ndarray) -> tuple[int, np.ndarray]:
        if self.index is None:
            return pins.SOME_MISSING, np.zeros(len(ids), dtype=np.int32)
        out = np.empty(len(ids), dtype=np.int32)  # the kernels write every entry, or we zero it
        if self.full_table:
            st = pins.pin_whole_table(ids, self.spec.num_rows, self.pins, np.uint32(self.seq),
                                      self.ctrl, out)
        else:
            st = pins.pin_positions(ids, self.index, self.pins, np.uint32(self.seq), self.ctrl,
                                    out)
        if st == pins.STALE:
            raise Stale(self.name)
        if st == pins.RETRY or st == pins.OUT_OF_RANGE:  # (out is not to be trusted)
            out[:] = 0
        return st, out

    def take_prefetched(self, ids: torch.Tensor) -> tuple[np.ndarray, Bypass | None] | None:
        """Positions and bypass rows of exactly ``ids`` if :meth:`Connection.prefetch` sent
        them ahead (their reply read now; the prefetch's pins are this operation's), else
        None after giving up any other prefetched batch. Raises the service's refusal."""
        f = self.prefetched
        if f is None:
            return None
        self.prefetched = None
        self.conn._land(f)
        if not np.array_equal(f.ids, ids.numpy()):
            self.end_op()  # another batch: the prefetch's pins go
            return None
        if f.misses is None:
            return f.pos, None
        if isinstance(f.answer, BaseException):
            raise f.answer
        return self.fill(f.pos, f.misses, *f.answer)

    def resident_positions(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Positions of ``ids`` if all are resident, else None. Read path only: nothing is
        pinned; :meth:`end_op` checks that no eviction overlapped the caller's gather."""
        if self.index is None or self._force_pinned or self._missed:
            self._force_pinned = False
            return None
        g0 = pins.read_begin(self.ctrl)
        if g0 & 1:
            return None
        out = np.empty(len(ids), dtype=np.int64)  # torch's embedding_bag: int64 is ~7% faster
        if self.full_table:
            if identity_positions(ids.numpy(), self.spec.num_rows, out) != IN_RANGE:
                return None
        elif kernels.gather_positions(ids.numpy(), self.index, out) != kernels.ALL_RESIDENT:
            return None
        self._read_gen = g0
        self._count_all_hits(out)
        return torch.from_numpy(out)

    def _count_all_hits(self, pos: np.ndarray) -> None:
        """Count a batch served wholly from the slab (positions ``pos``) and log its slots
        for the policy (sent with the next request)."""
        n = len(pos)
        self.header[pins.LOOKUPS] += n
        self.header[pins.HITS] += n
        if self.tracks_hits and self._recent_n < RECENT_MAX:
            slots = self._distinct_slots(pos)
            self._recent.append(slots)
            self._recent_n += len(slots)

    def take_recent(self) -> np.ndarray:
        """Slots of the all-hit batches since the last request (and forget them)."""
        if not self._recent:
            return _EMPTY
        out = np.concatenate(self._recent)[:RECENT_MAX]
        self._recent, self._recent_n = [], 0
        return out

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, Bypass | None]:
        """Positions of ``ids`` (0: served from the returned Bypass); misses go to the service,
        which admits them and pins them for this operation."""
        pos, m = self.pin_batch(ids)
        if m is None:
            return pos, None
        got, bypass = self.conn._resolve(self, m.rows, m.hit_slots, len(ids))
        return self.fill(pos, m, got, bypass)

    def pin_batch(self, ids: np.ndarray) -> tuple[np.ndarray, Misses | None]:
        """Pin the resident rows of ``ids``: their positions (int64, 0 where not resident) and
        the misses to ask the service for (None: every row was resident, counted as hits)."""
        st, out = self._pin(ids)
        pos = out.astype(np.int64)
        self._missed = st != pins.ALL_RESIDENT
        if st == pins.ALL_RESIDENT:  # resident and pinned after all: no request needed
            self._count_all_hits(pos)
            return pos, None
        return pos, self._rows.split_misses(ids, pos, self._mark, self.tracks_hits)

    @staticmethod
    def fill(pos: np.ndarray, m: Misses, got: np.ndarray,
             bypass: Bypass | None) -> tuple[np.ndarray, Bypass | None]:
        """:meth:`pin_batch`'s positions completed with the service's answer for its misses
        (``got``: positions of ``m.rows``, 0 = in ``bypass``)."""
        pos[m.at] = got[m.where]
        if bypass is not None:  # which ids read which bypass row, known without a search
            bypass.where, bypass.k = bypass_map(got, m.where, m.at)
        return pos, bypass

    def apply(self, ids: np.ndarray, src: np.ndarray, scale: np.ndarray | None,
              grad: torch.Tensor) -> None:
        """The table's optimizer on ``scale[i] * grad[src[i]]`` per id: rows resident in DRAM
        are updated in place (marked dirty); the service updates the others."""
        if not self.writable:
            raise InvalidInput(f"table {self.name!r} is attached read-only by this client; "
                               f"attach it with mode='write' to update rows")
        if self.prefetched is not None:  # an update before the prefetched batch's forward
            self.conn._give_up(self)
        lo, hi = self.write_range
        if len(ids) and self._narrow_writer and (ids.min() < lo or ids.max() >= hi):
            raise InvalidInput(f"table {self.name!r}: this client writes rows [{lo}, {hi}) "
                               f"only; ids {ids.min()}..{ids.max()} given")
        _, out = self._pin(ids)
        pos = out.astype(np.int64)
        g = grad.detach().to(torch.float32).contiguous().numpy()
        sc = np.empty(0, dtype=np.float32) if scale is None else scale
        away = self._rows.away_updates(ids, pos, src, sc)
        if len(away.rows):
            # first-occurrence order: the order of the forward's bypass rows, which lets the
            # service reuse its read of them without a search (DDRCache._read_scm)
            summed = sum_at(away.at, len(away.rows), away.src, away.scale, g)
            # the service refuses a sum that overflowed; the update is pipelined, so refuse
            # it here, before the resident rows change
            checks.finite(summed, self.spec, "summed gradients")
            self.conn._apply(self, away.rows, summed.numpy())
        self._apply_resident(pos, src, sc, g)  # (skips the rows not resident)

    def close(self) -> None:
        self.weights_t = None
        for seg in self._segments:
            seg.close()
        self._segments.clear()


__all__ = ["AttachedTable", "Retry", "Stale"]
