"""``tierstore.Store``: the embedded storage engine (tables across DRAM and SCM).

A store is a directory::

    <path>/LOCK             flock'ed by the one process that has the store open
    <path>/catalog.lmdb/    LMDB: table specs, store metadata, rows of sparse tables
    <path>/tables/<name>.rows (+ .journal)   row file of each dense table (the SCM tier)

DRAM holds a cache per open table (:class:`tierstore.tiers.ddr.DDRCache`); the store's
``ddr_bytes`` budget is split among open tables max-min fairly (small tables are held whole, the
rest share what is left equally). A table held whole has no eviction bookkeeping.

Operations take the table by name or by the :class:`Table` handle that create/open return.
Inputs follow FBGEMM/``nn.EmbeddingBag`` conventions (flat indices + offsets).
"""

from __future__ import annotations

import fcntl
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tierstore import checks, ops
from tierstore.cache.admit_all import AdmitAll
from tierstore.catalog import Catalog, LmdbRows
from tierstore.config import TableSpec
from tierstore.errors import InvalidInput, InvalidSpec, StoreLocked, TierstoreError, UnknownTable
from tierstore.tiers.ddr import DDRCache
from tierstore.tiers.rowfile import RowFile

SLOT_METADATA_BYTES = 9  # row id (<= 8) + dirty flag (1) per cached row, see tiers/ddr.py
POLICY_BYTES_ESTIMATE = 10  # per cached row; adaptive measured 9.8, lru 5, lfu 7 (docs/cache.md)


class Table:
    """Handle of an open table; operations delegate to the store."""

    def __init__(self, store: "Store", spec: TableSpec) -> None:
        self.store = store
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def lookup(self, ids: Any) -> torch.Tensor:
        return self.store.lookup(self, ids)

    def pooled(self, indices: Any, offsets: Any, **kw: Any) -> torch.Tensor:
        return self.store.pooled(self, indices, offsets, **kw)

    def apply_gradients(self, ids: Any, grads: Any) -> None:
        self.store.apply_gradients(self, ids, grads)

    def __repr__(self) -> str:
        return f"Table({self.spec!r})"


@dataclass
class _Open:
    spec: TableSpec
    backing: Any  # RowFile | LmdbRows
    cache: DDRCache | None = None
    #: the table's prefetch running on the store's prefetch thread (Store.prefetch), if any
    prefetching: Future | None = None


class Store:
    """An embedded tierstore. One process (and one Store object) may have a path open at a time.

    path: the store directory (created if missing).
    ddr_bytes: DRAM budget for all open tables' caches (rows, optimizer state, slot metadata
        and policy metadata; the 4-byte-per-row index of dense tables comes on top).
    policy: "adaptive" (default), "lru", "lfu"; applied to tables that do not fit in DRAM.
    shm_unlink: remove shared-memory names right after mapping (embedded use; nothing can leak).
        The daemon keeps them so clients can attach.
    Raises StoreLocked if the path is open elsewhere.
    """

    def __init__(self, path: str | os.PathLike, ddr_bytes: int = 1 << 30,
                 policy: str = "adaptive", *, shm_unlink: bool = True,
                 policy_options: dict[str, Any] | None = None) -> None:
        if not isinstance(ddr_bytes, (int, np.integer)) or ddr_bytes <= 0:
            raise ValueError(f"ddr_bytes must be a positive int, got {ddr_bytes!r}")
        from tierstore.cache import make_policy  # the policy registry validates the name
        make_policy(policy, 1)
        self.path = os.fspath(path)
        self.ddr_bytes = int(ddr_bytes)
        self.policy = policy
        self.policy_options = dict(policy_options or {})
        self.shm_unlink = shm_unlink
        os.makedirs(os.path.join(self.path, "tables"), mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"store {self.path!r} is open in another process or Store "
                              f"object; close it first") from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        self.catalog = Catalog(self.path)
        self._open: dict[str, _Open] = {}
        self._generation = 0
        self._closed = False
        self._prefetcher: ThreadPoolExecutor | None = None  # started by the first prefetch

    # -- tables ----------------------------------------------------------------------------
    def create_table(self, spec: TableSpec) -> Table:
        """Add a table to the catalog and open it. Raises TableExists, InvalidSpec."""
        self._check_open()
        if not isinstance(spec, TableSpec):
            raise InvalidSpec(f"create_table needs a TableSpec, got {type(spec).__name__}")
        self._check_fits({**{n: o.spec for n, o in self._open.items()}, spec.name: spec})
        self.catalog.add(spec)
        try:
            return self.open_table(spec.name)
        except BaseException:
            self.catalog.remove(spec.name)
            raise

    def open_table(self, name: str) -> Table:
        """Open a table of the catalog (idempotent). Raises UnknownTable."""
        self._check_open()
        if name not in self._open:
            spec = self.catalog.get(name)
            self._settle_all()
            self._check_fits({**{n: o.spec for n, o in self._open.items()}, name: spec})
            backing = (RowFile(self._row_path(name), spec) if spec.id_space == "dense"
                       else LmdbRows(self.catalog, spec))
            self._open[name] = _Open(spec, backing)
            self._plan_dram()
        return Table(self, self._open[name].spec)

    def drop_table(self, name: str) -> None:
        """Delete a table and all its rows. Raises UnknownTable."""
        self._check_open()
        name = name.name if isinstance(name, Table) else name
        self.catalog.get(name)
        self._settle_all()
        entry = self._open.pop(name, None)
        if entry is not None:
            if entry.cache is not None:
                entry.cache.close()
            entry.backing.close()
        for suffix in ("", ".journal"):
            try:
                os.unlink(self._row_path(name) + suffix)
            except FileNotFoundError:
                pass
        self.catalog.remove(name)
        self._plan_dram()

    def tables(self) -> list[str]:
        """Names of all tables in the catalog (open or not)."""
        self._check_open()
        return sorted(self.catalog.tables())

    def _row_path(self, name: str) -> str:
        return os.path.join(self.path, "tables", f"{name}.rows")

    # -- DRAM planning ---------------------------------------------------------------------
    @staticmethod
    def cached_row_bytes(spec: TableSpec) -> int:
        """DRAM bytes one cached row of ``spec`` costs against ``ddr_bytes``."""
        return spec.layout.payload_bytes + SLOT_METADATA_BYTES + POLICY_BYTES_ESTIMATE

    def _shares(self, specs: dict[str, TableSpec]) -> dict[str, int]:
        """Cache rows per table: a max-min fair split of ddr_bytes (smallest tables first, each
        gets all of itself or an equal part of what is left). Every table sees about the same
        lookups per batch, so a byte of DRAM buys more hits on a small table."""
        rows: dict[str, int] = {}
        left = self.ddr_bytes
        order = sorted(specs, key=lambda n: specs[n].num_rows * self.cached_row_bytes(specs[n]))
        for i, name in enumerate(order):
            per_row = self.cached_row_bytes(specs[name])
            rows[name] = min(specs[name].num_rows, left // (len(order) - i) // per_row)
            left -= rows[name] * per_row
        return rows

    def _check_fits(self, specs: dict[str, TableSpec]) -> None:
        for name, rows in self._shares(specs).items():
            if rows < 1:
                raise InvalidSpec(f"table {name!r} does not fit: ddr_bytes={self.ddr_bytes} "
                                  f"leaves less than one cached row "
                                  f"({self.cached_row_bytes(specs[name])} bytes) for it")

    def _plan_dram(self) -> None:
        for name, rows in self._shares({n: o.spec for n, o in self._open.items()}).items():
            entry = self._open[name]
            if entry.cache is not None and entry.cache.capacity == rows:
                continue
            if entry.cache is not None:
                entry.cache.flush_dirty()
                entry.cache.fold_all_modified()
                entry.cache.close()
            entry.cache = self._new_cache(entry, rows)

    def _new_cache(self, entry: _Open, rows: int) -> DDRCache:
        from tierstore.cache import make_policy
        spec = entry.spec
        if spec.id_space == "dense" and rows >= spec.num_rows:
            policy = AdmitAll(rows)
        else:
            policy = make_policy(self.policy, rows, **self.policy_options)
        self._generation += 1
        prefix = f"tierstore.{self.catalog.store_id[:12]}.{os.getpid()}.{self._generation}"
        tracker = entry.cache.tracker if entry.cache is not None else None
        return DDRCache(spec, rows, entry.backing, policy, prefix, unlink=self.shm_unlink,
                        tracker=tracker)

    def _entry(self, table: str | Table) -> _Open:
        self._check_open()
        name = table.name if isinstance(table, Table) else table
        if not isinstance(name, str):
            raise UnknownTable(f"table must be a name or Table, got {type(table).__name__}")
        if name not in self._open:
            self.open_table(name)
        e = self._open[name]
        if e.prefetching is not None:
            self._settle(e)
        return e

    # -- prefetch ----------------------------------------------------------------------------
    def prefetch(self, table: str | Table, indices: Any) -> None:
        """Start bringing a coming batch's rows into DRAM on the store's prefetch thread, while
        the caller works on other tables (TorchRec's prefetch pipeline: prefetch batch i + 1 of
        a table once batch i's backward of it is done).

        The policy sees the batch now: its lookups are counted, its misses admitted (or read
        from SCM where the policy bypasses them) exactly as its forward would have. The
        table's next ``pooled``/``lookup`` of the same indices uses that work instead of
        repeating it; any other operation on the table first waits for the prefetch, and
        raises its error if it failed (reading SCM). So prefetch only a batch that runs next
        on this table: another one finds nothing prefetched and is resolved again (counted
        twice). Tables held whole in DRAM need no prefetch: a no-op (the operation that uses
        the ids checks them).

        indices: 1-D int, any of the table's ids (copied: the caller may reuse the buffer).
        Raises UnknownTable, InvalidInput (at once, on the caller's thread; not for tables
        held whole).
        """
        e = self._entry(table)
        if e.cache.full_table:
            return
        rows = checks.ids(indices, e.spec)
        if not len(rows):
            return
        rows = rows.numpy().copy()
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="tierstore-prefetch")
        e.prefetching = self._prefetcher.submit(e.cache.prefetch, rows)

    @staticmethod
    def _settle(e: _Open) -> None:
        """Wait for the table's prefetch; raise its error, if any (once)."""
        f, e.prefetching = e.prefetching, None
        if f is not None:
            f.result()

    def _settle_all(self) -> None:
        """Wait for every table's prefetch (before work that spans tables); the first error
        is raised after all have finished."""
        first: BaseException | None = None
        for e in self._open.values():
            try:
                self._settle(e)
            except BaseException as err:  # noqa: BLE001 - raised below, after the others
                first = first or err
        if first is not None:
            raise first

    # -- reads and writes (tierstore/ops.py holds the logic, shared with the client) ----------
    def lookup(self, table: str | Table, ids: Any) -> torch.Tensor:
        """Rows of ``ids`` (1-D int, duplicates allowed): Tensor [n, dim] of the table dtype.

        Missing rows are brought into DRAM as the policy admits them. Raises UnknownTable,
        InvalidInput.
        """
        e = self._entry(table)
        return ops.lookup(e.cache, e.spec, ids)

    def pooled(self, table: str | Table, indices: Any, offsets: Any, mode: str = "sum",
               per_sample_weights: Any = None, include_last_offset: bool = False) -> torch.Tensor:
        """Pooled rows per bag, like ``nn.EmbeddingBag``: Tensor [B, dim] of the table dtype.

        indices: 1-D int [N]; offsets: bag starts [B] (torch convention) or, with
        include_last_offset=True, B + 1 boundaries ending at N (FBGEMM's convention).
        mode: "sum" or "mean" (empty bags give zeros); per_sample_weights: float [N], sum only.
        """
        e = self._entry(table)
        return ops.pooled(e.cache, e.spec, indices, offsets, mode, per_sample_weights,
                          include_last_offset)

    def pooled_many(self, tables: Sequence[str | Table], indices: Sequence[Any],
                    offsets: Sequence[Any], mode: str = "sum",
                    per_sample_weights: Sequence[Any] | None = None,
                    include_last_offset: bool = False) -> list[torch.Tensor]:
        """:meth:`pooled` of several tables, one batch each (``indices[i]``, ``offsets[i]``,
        ``per_sample_weights[i]`` for ``tables[i]``): the service client's pipelined call,
        here one pooled() per table in order."""
        n = len(tables)
        psws = ops.weights_per_table(tables, indices, offsets, per_sample_weights)
        return [self.pooled(tables[i], indices[i], offsets[i], mode, psws[i],
                            include_last_offset) for i in range(n)]

    def apply_gradients(self, table: str | Table, ids: Any, grads: Any) -> None:
        """Apply the table's optimizer with per-id gradients [n, dim] (summed over duplicate
        ids first). Rows become dirty in DRAM, or are updated on SCM if not resident."""
        e = self._entry(table)
        ops.apply_gradients(e.cache, e.spec, ids, grads)

    def apply_pooled_gradients(self, table: str | Table, indices: Any, offsets: Any,
                               grad_output: Any, mode: str = "sum",
                               per_sample_weights: Any = None,
                               include_last_offset: bool = False) -> None:
        """Backward of :meth:`pooled` fused with the optimizer: grad_output [B, dim] is the
        gradient of the pooled output; no per-index gradient tensor is materialised."""
        e = self._entry(table)
        ops.apply_pooled_gradients(e.cache, e.spec, indices, offsets, grad_output, mode,
                                   per_sample_weights, include_last_offset)

    # -- rows for checkpoints (tierstore/ckpt) -----------------------------------------------
    def take_modified(self, table: str | Table, deferred: bool = False) -> Any:
        """Sorted distinct row ids modified since the previous call (or since the table was
        opened); clears the record, so each modification is reported once.

        ``deferred=True`` (checkpoints): take the record without enumerating it and return an
        open copy-on-write snapshot of the table (:class:`tierstore.tiers.ddr.CowSnapshot`):
        its ``take_modified()`` lists the rows (from any thread), ``written_rows()`` lists
        what :meth:`written_rows` would have, ``fix(rows)`` narrows it to the rows to save;
        ``release()`` when done. Costs O(1) plus a copy of two bytes per cached row.
        One snapshot per table at a time."""
        e = self._entry(table)
        if deferred:
            return e.cache.snapshot_rows(None)
        return e.cache.take_modified()

    def read_rows(self, table: str | Table, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        """Current (weights [n, dim] of the table dtype, state [n, state_dim] float32) of
        ``rows`` wherever they live; no admission, no counters. Raises InvalidInput."""
        e = self._entry(table)
        r = checks.ids(rows, e.spec).numpy()
        return e.cache.read_rows(r)

    def snapshot_rows(self, table: str | Table, rows: Any) -> Any:
        """Start a copy-on-write snapshot (:class:`tierstore.tiers.ddr.CowSnapshot`) of
        ``rows`` (sorted distinct ids): their values as of now, copied later, by
        ``copy_range``/``merge_copied`` (the checkpoint writer) or by the first change to each
        row; ``release()`` when done. Costs a flag per row now instead of a copy; one snapshot
        per table at a time. Changes that bypass this Store (clients of the service writing
        its shared slab) are not seen: snapshot those synchronously (read_rows).
        Raises InvalidInput."""
        from tierstore.optim import kernels
        e = self._entry(table)
        r = checks.ids(rows, e.spec, check_range=False).numpy()
        if not kernels.strictly_increasing(r):
            raise InvalidInput(f"table {e.spec.name!r}: snapshot_rows needs sorted distinct ids")
        if len(r):  # sorted: the ends are the range
            checks.id_range(torch.from_numpy(r[[0, -1]]), e.spec)
        return e.cache.snapshot_rows(r)

    def written_rows(self, table: str | Table) -> np.ndarray:
        """Sorted ids of every row whose value may differ from its initial value (written to
        SCM at some point, or updated in DRAM): what a full checkpoint must hold."""
        e = self._entry(table)
        c = e.cache
        dirty = np.flatnonzero(c.dirty)
        return np.union1d(e.backing.written_rows(), c.row_of_pos[dirty].astype(np.int64))

    def write_rows(self, table: str | Table, rows: Any, weights: np.ndarray,
                   state: np.ndarray) -> None:
        """Set rows (distinct ids) to the given weights and optimizer state, wherever they
        live; not counted as modifications (restore uses it). Raises InvalidInput."""
        e = self._entry(table)
        r = checks.ids(rows, e.spec).numpy()
        w = np.ascontiguousarray(weights, dtype=e.spec.layout.np_dtype)
        st = np.ascontiguousarray(state, dtype=np.float32)
        if w.shape != (len(r), e.spec.dim) or st.shape != (len(r), e.spec.layout.state_dim):
            raise InvalidInput(f"table {e.spec.name!r}: write_rows needs weights "
                               f"[{len(r)}, {e.spec.dim}] and state "
                               f"[{len(r)}, {e.spec.layout.state_dim}]")
        if len(np.unique(r)) != len(r):
            raise InvalidInput(f"table {e.spec.name!r}: write_rows needs distinct ids")
        if e.cache.cow is not None:  # a snapshot in progress keeps the old values first
            e.cache.cow.copy_before_write(r)
        pos = e.cache.positions(r)
        res = pos > 0
        if res.any():
            p = pos[res]
            e.cache.weights[p] = w[res]
            e.cache.state[p] = st[res]
            e.cache.dirty[p] = 1
        e.backing.write(r[~res], w[~res], st[~res])

    def reset_table(self, table: str | Table) -> None:
        """Every row back to its initial value with zero optimizer state (DRAM emptied, SCM
        cleared, modification record cleared). The table's spec is kept. A snapshot in
        progress copies its pending rows first (closing the tier drains it)."""
        e = self._entry(table)
        e.cache.close()
        e.backing.clear()
        tracker = e.cache.tracker
        tracker.clear()
        capacity = e.cache.capacity
        e.cache = None
        e.cache = self._new_cache(e, capacity)
        e.cache.tracker = tracker

    # -- durability ------------------------------------------------------------------------
    def flush(self) -> None:
        """Write back every dirty row and make the store durable (fsync). After flush(), a
        process killed with SIGKILL reopens to exactly this state."""
        self._check_open()
        self._settle_all()
        for e in self._open.values():
            e.cache.flush_dirty()
            e.backing.flush()
        self.catalog.sync()

    def close(self) -> None:
        """Flush and release everything (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            if self._prefetcher is not None:  # flush settled every prefetch, unless it failed
                self._prefetcher.shutdown(wait=True)
            for e in self._open.values():
                e.cache.close()
                e.backing.close()
            self._open.clear()
            self.catalog.close()
            os.close(self._lock_fd)
            self._closed = True

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierstoreError(f"store {self.path!r} is closed")

    # -- stats -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-table and store-wide figures (Redis INFO-like; all counts since open)."""
        self._check_open()
        self._settle_all()
        tables = {name: self._table_stats(e) for name, e in self._open.items()}
        return {
            "path": self.path,
            "policy": self.policy,
            "ddr_bytes_budget": self.ddr_bytes,
            "tables": tables,
            "dram_bytes": sum(t["bytes"]["dram"] for t in tables.values()),
            "scm_bytes": sum(t["bytes"]["scm"] for t in tables.values()) + self.catalog.disk_bytes(),
        }

    @staticmethod
    def _table_stats(e: _Open) -> dict[str, Any]:
        c = e.cache
        dram = c.dram_bytes()
        lookups = c.counters["lookups"]
        return {
            **c.counters,
            "hit_rate": c.counters["hits"] / lookups if lookups else None,
            "capacity_rows": c.capacity,
            "rows_in_dram": c.resident,
            "rows_on_scm": e.backing.rows_written(),
            "dirty_rows": c.dirty_rows(),
            "policy": c.policy.name,
            "bytes": {"dram": sum(dram.values()), "scm": e.backing.disk_bytes(), "dram_detail": dram},
            "overhead_bytes_per_cached_row": (dram["slot_metadata"] + dram["policy"]) / c.capacity,
            "index_bytes_per_table_row": (dram["index"] / e.spec.num_rows
                                          if e.spec.id_space == "dense" else None),
        }

    # -- checkpoints (tierstore/ckpt holds the logic) -----------------------------------------
    def checkpoint(self, root: str | os.PathLike, policy: str = "intermittent", bits: int = 4,
                   quant: str = "adaptive", **kw: Any) -> str:
        """Write the next checkpoint of the chain kept under ``root`` and return its path.

        Stalls only to snapshot the rows to save; quantization, compression and writing run in
        the background (``tierstore.ckpt.wait(store)``, or ``wait=True``). policy: full |
        incremental | consecutive | intermittent; bits 32 = fp32, 16 = fp16, else 2/3/4/8 with
        quant uniform | adaptive | kmeans. Other options (extra_state, step, reader, keep,
        state_dtype, rebaseline_at, ...): :func:`tierstore.ckpt.checkpoint`."""
        from tierstore import ckpt
        self._check_open()
        self._settle_all()
        return ckpt.checkpoint(self, root, policy, bits, quant, **kw).path

    def restore(self, path: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Restore exactly checkpoint ``path``, replaying its chain; verifies the chain first
        and changes nothing if it is corrupt. Returns step, reader position and the dense
        ``extra_state``: :func:`tierstore.ckpt.restore`."""
        from tierstore import ckpt
        self._check_open()
        self._settle_all()
        return ckpt.restore(self, path, **kw)


__all__ = ["Store", "Table"]
