"""Taking checkpoints: the snapshot in the caller, the background writer, retention.

:func:`checkpoint` stalls the caller only to snapshot; a background thread then
quantizes, compresses, writes, fsyncs and commits; numba's kernels, zstd and file writes
release the GIL, so training goes on meanwhile. ``take_modified`` is called once per table
per checkpoint, whatever the kind, so the record always means "since the previous
checkpoint". One writer at a time: a new checkpoint of a store first waits for the previous
one's write, and a root is flock'ed by the process writing it.

The snapshot (``snapshot=``):

- ``"cow"`` (copy-on-write; the default for an embedded :class:`tierstore.Store`): the
  caller only *takes* each table's modified-row record into an open snapshot
  (``Store.take_modified(name, deferred=True)``: the slots' modified and dirty flags are
  copied and cleared, the tracker's per-row record swapped for an empty one; O(1) plus two
  bytes per cached row) and copies ``extra_state``. Everything else runs in the background
  thread before it writes: enumerating the record, the policy decision (:class:`_Plan`), the
  row set of a baseline (``written_rows``: the dirty flags taken plus a scan of the row file's
  data extents), and narrowing the snapshot to the rows to save (``fix``). Until then every
  row the training thread changes is copied first (its value at the checkpoint); after,
  only the pending rows of the set. The writer copies the pending rows chunk by chunk
  (``COW_CHUNK_ROWS`` per hold of the table's snapshot lock) into a part buffer (one per
  table, up to ``format.PART_ROWS`` rows, kept by the session for the next checkpoint) just
  before encoding them, and every path that changes row values (the optimizer update, on
  DRAM or SCM; ``write_rows``; ``reset_table``, ``drop_table`` and anything else that closes a
  DRAM tier, which waits for the set to be fixed) first copies the still-pending rows it is
  about to change. The checkpoint holds exactly the values at the call, the same bytes as
  ``"sync"``; ``handle.kind`` is known once the writer has decided (milliseconds later).
- ``"sync"``: the caller copies every row to save (``read_rows``) before returning. Needed
  where rows change behind the Store's back: the service (``tierstored``), whose clients write
  the shared slab directly, so copy-on-write cannot see their updates.
- ``"auto"`` (default): ``"cow"`` for a Store with private DRAM tiers, ``"sync"`` for one that
  shares them (``shm_unlink=False``, the service's) and for objects without
  ``snapshot_rows``.

What lets a chain continue is kept per Store object (:class:`_Session`): the checkpoint the
store's modified-row record is relative to (the *head*), the rows modified since the head's
baseline (for cumulative increments), the restores in the chain's history. Whatever survives
the process is in the manifests: after a restart, :func:`tierstore.ckpt.reader.restore`
rebuilds the session from the restored checkpoint's chain, and otherwise the first checkpoint
is a new baseline (rows modified before the restart are not recorded anywhere).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tierstore import quant
from tierstore.ckpt import format as fmt
from tierstore.ckpt.hooks import pause
from tierstore.ckpt.policy import PolicyOptions, decide
from tierstore.config import TableSpec
from tierstore.optim import kernels
from tierstore.optim.sparse import SGD, Adagrad, RowWiseAdagrad

#: Optimizers whose update touches only the rows of the batch: a row not written keeps its
#: value and state, which is what incremental checkpoints rely on. (RowWiseAdagrad's weight
#: decay is applied to the gradient of the rows in the batch only.)
ROW_SPARSE_OPTIMIZERS = (SGD, RowWiseAdagrad, Adagrad)
STATE_DTYPES = ("fp32", "fp16")
SNAPSHOTS = ("auto", "cow", "sync")
#: copy-on-write snapshots: rows the writer copies per hold of a table's snapshot lock (the
#: training thread waits at most one such copy when it touches a pending row or evicts)
COW_CHUNK_ROWS = 4096
#: tests: called by the writer thread as ``hook(table, lo, hi)`` after copying snapshot rows
#: [lo, hi) of a copy-on-write snapshot, outside the lock
_fill_hook: Any = None
#: tests: called by the writer thread as ``hook(handle)`` before it enumerates the records
#: its open copy-on-write snapshots took (the rows to save are not decided yet)
_prepare_hook: Any = None
DEFAULT_KEEP = 2
DEFAULT_ZSTD_LEVEL = 1


def check_row_sparse(spec: TableSpec) -> None:
    if not isinstance(spec.optimizer, ROW_SPARSE_OPTIMIZERS) or \
            getattr(spec.optimizer, "dense_decay", False):
        raise fmt.CheckpointError(
            f"table {spec.name!r}: optimizer {type(spec.optimizer).__name__} is not known to be "
            f"row-sparse (untouched rows unchanged); incremental checkpoints would miss rows")


class RowSet:
    """Rows modified since a baseline: a flag per row for dense tables (pages never marked
    cost nothing) with a running count, a sorted array for sparse-id tables. Dense updates
    and listings are numba passes: they are part of a checkpoint's stall."""

    def __init__(self, spec: TableSpec, rows: np.ndarray | None = None) -> None:
        self.flags = np.zeros(spec.num_rows, np.uint8) if spec.id_space == "dense" else None
        self.ids = np.empty(0, np.int64)
        self._count = 0
        if rows is not None:
            self.add(rows)

    def add(self, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        if self.flags is not None:
            self._count += int(kernels.mark_rows(self.flags,
                                                 np.asarray(rows, dtype=np.int64)))
        else:
            self.ids = np.union1d(self.ids, rows)

    def rows(self) -> np.ndarray:
        if self.flags is None:
            return self.ids
        out = np.empty(self._count + 1, np.int64)
        return out[:kernels.flagged_rows(self.flags, out, False)]

    def count(self) -> int:
        return self._count if self.flags is not None else len(self.ids)


# -- per-store session -----------------------------------------------------------------------

@dataclass
class _Session:
    """What one Store object knows about the chain its modified-row record belongs to."""

    root: str | None = None            # the root of that chain (realpath)
    head: dict[str, Any] | None = None  # manifest the record is relative to (None: untrusted)
    since_base: dict[str, "RowSet"] = field(default_factory=dict)  # rows modified since baseline
    written: dict[str, "RowSet"] = field(default_factory=dict)  # rows that may differ from init
    restores: int = 0                   # restores in the chain's history
    job: "_Job | None" = None           # the write in flight (or the last one)
    lock: threading.Lock = field(default_factory=threading.Lock)
    untrusted_reason: str | None = "no earlier checkpoint of this Store object"
    #: copy-on-write: the writer's part buffers per table, kept from one checkpoint to the
    #: next (faulting in fresh ones at the start of every write held up the training thread)
    buffers: dict[str, Any] = field(default_factory=dict)
    #: the thread that runs this session's writes (started by the first checkpoint)
    worker: "_Worker | None" = None


class _Worker:
    """The background thread of one session: runs its jobs in order. A checkpoint hands it
    its job through a queue instead of starting a thread (measured: starting one cost the
    caller 0.2-6 ms on a busy two-core machine, a large part of the stall). Not a daemon: at
    interpreter exit the writes in flight finish first; it ends on its own once the main
    thread has ended or its session is gone and nothing is queued (checked every
    ``POLL_S``)."""

    POLL_S = 0.5

    def __init__(self, sess: "_Session") -> None:
        self.queue: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        self._sess = weakref.ref(sess)
        self.thread = threading.Thread(target=self._loop, name="tierstore-ckpt-writer",
                                       daemon=False)
        self.thread.start()

    def submit(self, job: "_Job") -> None:
        self.queue.put(job)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _loop(self) -> None:
        while True:
            try:
                job = self.queue.get(timeout=self.POLL_S)
            except queue.Empty:
                if not threading.main_thread().is_alive() or self._sess() is None:
                    return
                continue
            job.run()
            del job  # nothing of the store stays referenced while idle


_sessions: "weakref.WeakKeyDictionary[Any, _Session]" = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def session(store: Any) -> _Session:
    with _sessions_lock:
        s = _sessions.get(store)
        if s is None:
            s = _sessions[store] = _Session()
        return s


def wait(store: Any, timeout: float | None = None) -> dict[str, Any] | None:
    """Wait for the store's checkpoint write in flight (if any); returns its manifest, or
    None if there was none. Raises the write's error."""
    job = session(store).job
    return None if job is None else job.handle.wait(timeout)


# -- the handle ------------------------------------------------------------------------------

class CheckpointHandle:
    """A checkpoint being written in the background. ``path`` is final as soon as
    :func:`checkpoint` returns; the checkpoint exists once :meth:`wait` returns."""

    def __init__(self, path: str, kind: str | None = None, reason: str | None = None) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self._kind = kind
        self._reason = reason
        self.stall_s = 0.0
        self.snapshot: dict[str, Any] = {}  # where the stall went
        self.stats: dict[str, Any] = {}     # the background write, once done
        self._decided = threading.Event()
        if kind is not None:
            self._decided.set()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._manifest: dict[str, Any] | None = None

    def _decide(self, kind: str, reason: str) -> None:
        self._kind, self._reason = kind, reason
        self._decided.set()

    @property
    def kind(self) -> str | None:
        """full | cumulative | delta. A copy-on-write checkpoint decides in its writer
        thread: this waits for that (milliseconds after :func:`checkpoint` returned); None if
        the write failed first."""
        self._decided.wait()
        return self._kind

    @property
    def reason(self) -> str | None:
        """Why the policy chose :attr:`kind` (waits as :attr:`kind` does)."""
        self._decided.wait()
        return self._reason

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """The committed manifest; raises CheckpointError if the write failed, TimeoutError
        if it is still running after ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"checkpoint {self.path} still being written")
        if self._error is not None:
            raise fmt.CheckpointError(f"checkpoint {self.path} failed: {self._error}") \
                from self._error
        assert self._manifest is not None
        return self._manifest

    def __repr__(self) -> str:
        state = "done" if self.done() else "writing"
        return f"CheckpointHandle({self.path!r}, {self._kind}, {state})"


# -- snapshot --------------------------------------------------------------------------------

@dataclass
class _TableSnap:
    spec: TableSpec
    scheme: quant.Scheme
    rows: np.ndarray
    weights: np.ndarray | None  # the rows' values ("sync"); None: copy-on-write (cow)
    state: np.ndarray | None
    cow: Any = None
    buffers: Any = None  # copy-on-write: {table: part buffers} of the session (reused)

    def part(self, name: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Weights and state of rows [lo, hi) as of the snapshot. Copy-on-write: the pending
        ones are copied now, ``COW_CHUNK_ROWS`` per hold of the snapshot's lock, the others
        come from the write path's copies. Valid until the next call."""
        if self.cow is None:
            return self.weights[lo:hi], self.state[lo:hi]
        m = hi - lo
        buf = self.buffers.get(name)
        if buf is None or len(buf[0]) < m or buf[0].shape[1:] != (self.cow.dim,) or \
                buf[0].dtype != self.cow.dtype or buf[1].shape[1:] != (self.cow.state_dim,):
            size = min(len(self.rows), fmt.PART_ROWS)
            buf = self.buffers[name] = (np.empty((size, self.cow.dim), self.cow.dtype),
                                        np.empty((size, self.cow.state_dim), np.float32))
        w, s = buf[0][:m], buf[1][:m]
        for a in range(lo, hi, COW_CHUNK_ROWS):
            b = min(hi, a + COW_CHUNK_ROWS)
            self.cow.copy_range(a, b, w, s, lo)
            if _fill_hook is not None:
                _fill_hook(name, a, b)
        self.cow.merge_copied(lo, hi, w, s)
        return w, s

    @classmethod
    def empty(cls, spec: TableSpec, scheme: quant.Scheme, rows: np.ndarray) -> "_TableSnap":
        """A table with no rows to save."""
        return cls(spec, scheme, rows, np.empty((0, spec.dim), spec.layout.np_dtype),
                   np.empty((0, spec.layout.state_dim), np.float32))

    def release(self) -> None:
        if self.cow is not None:
            self.cow.release()


def resolve_snapshot(store: Any, snapshot: str) -> str:
    """"cow" or "sync" for ``snapshot`` ("auto" | "cow" | "sync") on this store."""
    if snapshot not in SNAPSHOTS:
        raise ValueError(f"snapshot must be one of {', '.join(SNAPSHOTS)}, got {snapshot!r}")
    can_cow = callable(getattr(store, "snapshot_rows", None))
    if snapshot == "auto":
        # a store sharing its slabs (the service's) has writers copy-on-write cannot see
        return "cow" if can_cow and getattr(store, "shm_unlink", True) else "sync"
    if snapshot == "cow" and not can_cow:
        raise ValueError(f"snapshot='cow' needs a store with snapshot_rows "
                         f"({type(store).__name__} has none)")
    return snapshot


def _table_scheme(spec: TableSpec, scheme: quant.Scheme) -> quant.Scheme:
    """fp32 of a float16 table is its float16 values: store them as fp16 (lossless)."""
    if spec.dtype == "float16" and scheme.kind == "fp32":
        return quant.Scheme("fp16", 16)
    return scheme


def effective_bits(bits: int | str, expected_restores: int | None, restores: int) -> int:
    """The bit-width to write: ``bits`` (or ``quant.choose_bits(expected_restores)`` for
    "auto"), raised once per restore in the chain's history (``quant.raise_bits``)."""
    if bits == "auto":
        b = quant.choose_bits(int(expected_restores or 0))
    elif isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"bits must be 32, 16, 8, 4, 3, 2 or 'auto', got {bits!r}")
    else:
        b = int(bits)
    for r in range(1, restores + 1):
        if b in (16, 32):
            break
        b = quant.raise_bits(b, r)
    return b


def checkpoint(store: Any, root: str | os.PathLike, policy: str = "intermittent",
               bits: int | str = 4, quant_kind: str = "adaptive", *,
               increments: str = "cumulative", rebaseline_at: float | None = None,
               expected_restores: int | None = None, state_dtype: str = "fp32",
               keep: int | None = DEFAULT_KEEP, step: int | None = None,
               reader: Any = None, extra_state: dict[str, Any] | None = None,
               zstd_level: int = DEFAULT_ZSTD_LEVEL, snapshot: str = "auto",
               wait: bool = False) -> CheckpointHandle:
    """Take the next checkpoint of the chain under ``root`` (see the module docstring).

    policy: full | incremental | consecutive | intermittent (:mod:`tierstore.ckpt.policy`).
    bits/quant_kind: 32 (fp32), 16 (fp16), or 2/3/4/8 with uniform | adaptive | kmeans;
        bits="auto" picks from ``expected_restores``. Raised automatically after restores.
    state_dtype: optimizer state at "fp32" (default) or "fp16", never lower.
    keep: retention, the newest ``keep`` chains (baseline + increments) are kept; None = all.
    step, reader: the training step and data-reader position (JSON), kept in the manifest.
    extra_state: dense state saved through torch.distributed.checkpoint.
    snapshot: "cow" (the modified-row record taken, rows decided and copied in the
        background or copied on write; stall O(1) + two bytes per cached row), "sync" (rows
        decided and copied before returning; the service, whose clients write the slab
        directly) or "auto" (cow unless the store shares its slabs): see the module docstring.
    wait: block until committed (tests, the CLI).
    Returns a :class:`CheckpointHandle` (``.path``, ``.wait()``).
    """
    opts = PolicyOptions(policy, increments, rebaseline_at)
    if quant_kind not in quant.QUANTS + ("none",):
        raise ValueError(f"unknown quantization {quant_kind!r}; valid: {', '.join(quant.QUANTS)}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be fp32 or fp16 (never below), got {state_dtype!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    if extra_state is not None and not isinstance(extra_state, dict):
        raise TypeError(f"extra_state must be a dict, got {type(extra_state).__name__}")
    mode = resolve_snapshot(store, snapshot)
    root = os.path.realpath(os.fspath(root))
    sess = session(store)
    t0 = time.perf_counter()
    with sess.lock:
        prev = sess.job
        if prev is not None:
            prev.handle._done.wait()       # one writer per store: the previous write first
        restores = sess.restores if sess.root == root else 0
        scheme = quant.Scheme.parse(effective_bits(bits, expected_restores, restores),
                                    quant_kind if bits not in (16, 32) else "none")
        lock = fmt.RootLock(root)
        started: list = []
        try:
            job = _snapshot(store, sess, root, opts, scheme, state_dtype, restores, keep, step,
                            reader, extra_state, zstd_level, lock, mode, started)
        except BaseException as e:
            for cow in started:  # abandoned: its pending rows are no longer copied
                cow.release()
            lock.release()
            sess.head = None  # modifications may have been taken: the next one is a baseline
            sess.untrusted_reason = f"the previous checkpoint call failed ({e})"
            raise
        job.handle.stall_s = time.perf_counter() - t0
        sess.job = job
        if sess.worker is None or not sess.worker.alive():
            sess.worker = _Worker(sess)
        sess.worker.submit(job)
    if wait:
        job.handle.wait()
    return job.handle


def _snapshot(store: Any, sess: _Session, root: str, opts: PolicyOptions,
              scheme: quant.Scheme, state_dtype: str, restores: int, keep: int | None,
              step: int | None, reader: Any, extra_state: dict[str, Any] | None,
              zstd_level: int, lock: fmt.RootLock, mode: str = "sync",
              started: list | None = None) -> "_Job":
    """The caller's part of a checkpoint; returns the job that writes it.

    ``mode="sync"``: take the modified rows, decide the kind and copy the rows to save, here.
    ``mode="cow"``: only take each table's modified-row record into an open copy-on-write
    snapshot (``store.take_modified(name, deferred=True)``: O(1) plus a copy of two bytes per
    cached row); the job's thread enumerates the record, decides and narrows the snapshots to
    the rows to save before writing them. Snapshots are appended to ``started`` as they are
    taken (the caller releases them if this raises)."""
    if started is None:
        started = []
    t_start = time.perf_counter()
    names = store.tables()
    specs = {n: store.open_table(n).spec for n in names}
    for spec in specs.values():
        check_row_sparse(spec)
    deferred = mode == "cow"
    opened: dict[str, Any] = {}
    mods: dict[str, np.ndarray] = {}
    if deferred:
        for n in names:  # exactly once per table, always
            opened[n] = store.take_modified(n, deferred=True)
            started.append(opened[n])
    else:
        mods = {n: store.take_modified(n) for n in names}

    head = sess.head if sess.root == root else None
    forced = None
    if sess.root != root:
        forced = ("first checkpoint of this Store object under this root" if sess.root is None
                  else f"this Store object's record belongs to the chain under {sess.root}")
    elif head is None:
        forced = sess.untrusted_reason or "no usable previous checkpoint"
    elif not os.path.exists(os.path.join(root, head["name"], fmt.MANIFEST)):
        forced = f"previous checkpoint {head['name']} is gone"
    elif {n: s.to_json() for n, s in specs.items()} != \
            {n: t["spec"] for n, t in head["tables"].items()}:
        forced = "tables changed since the previous checkpoint"
    elif head["policy"] != opts.to_json():
        forced = "policy options changed"
    elif head["scheme"] != scheme.to_json() or head["state_dtype"] != state_dtype:
        forced = f"scheme changed from {quant.Scheme.from_json(head['scheme']).name}/" \
                 f"{head['state_dtype']} to {scheme.name}/{state_dtype}"
    t_take = time.perf_counter()

    seq = fmt.next_seq(root)
    if sess.job is not None and sess.root == root:
        seq = max(seq, (fmt.seq_of(sess.job.handle.name) or 0) + 1)
    created, created_unix = fmt.now()
    plan = _Plan(sess, names, specs, opts, scheme, state_dtype, restores, head, forced, step,
                 reader, fmt.ckpt_name(seq), seq, created, created_unix)
    for gone in set(sess.buffers) - set(names):
        del sess.buffers[gone]
    snaps: dict[str, _TableSnap] = {}
    decision = None
    if not deferred:
        decision, rows = plan.decide(mods, store.written_rows)
    t_decide = time.perf_counter()
    if not deferred:
        for n in names:
            tscheme = _table_scheme(specs[n], scheme)
            if not len(rows[n]):
                snaps[n] = _TableSnap.empty(specs[n], tscheme, rows[n])
            else:
                w, s = store.read_rows(n, rows[n])
                snaps[n] = _TableSnap(specs[n], tscheme, rows[n], w, s)
    t_read = time.perf_counter()
    dense = None
    if extra_state is not None:
        from tierstore.ckpt import dense as dense_mod
        dense = dense_mod.snapshot(extra_state)
    t_dense = time.perf_counter()
    pause("snapshot")

    handle = CheckpointHandle(os.path.join(root, plan.name))
    # take_modified_s: the record taken (and enumerated, "sync"); decide_s: the policy
    # ("sync"; "cow" decides in the writer thread); read_rows_s: the rows copied ("sync")
    handle.snapshot = {"take_modified_s": t_take - t_start, "decide_s": t_decide - t_take,
                       "read_rows_s": t_read - t_decide, "extra_state_s": t_dense - t_read,
                       "mode": mode, "deferred": deferred}
    body = None
    if decision is not None:
        body = plan.body(decision, snaps)
        handle._decide(decision.kind, decision.reason)
        handle.snapshot["rows"] = int(sum(len(s.rows) for s in snaps.values()))
    job = _Job(handle, root, body, snaps, dense, zstd_level, keep, lock, sess, plan, opened)

    # the session now stands at the new checkpoint; a failed write sends it back to a baseline
    sess.root = root
    sess.head = None      # set by the job on commit
    sess.untrusted_reason = f"the write of {plan.name} has not committed"
    sess.restores = restores
    return job


@dataclass
class _Plan:
    """What the caller knew when it took a checkpoint: decides its kind and rows from the
    modified rows and builds the manifest body (in the caller for "sync" snapshots, in the
    writer thread for copy-on-write ones; either way before the session is used again)."""

    sess: _Session
    names: list[str]
    specs: dict[str, TableSpec]
    opts: PolicyOptions
    scheme: quant.Scheme
    state_dtype: str
    restores: int
    head: dict[str, Any] | None
    forced: str | None
    step: int | None
    reader: Any
    name: str
    seq: int
    created: str
    created_unix: float
    decision: Any = None

    def decide(self, mods: dict[str, np.ndarray], written_rows: Any
               ) -> tuple[Any, dict[str, np.ndarray]]:
        """(policy decision, sorted rows to save per table) from the rows modified since the
        previous checkpoint; updates the session's row sets. ``written_rows(name)``: every
        row that may differ from its initial value (asked for untrusted baselines only)."""
        sess, names, specs = self.sess, self.names, self.specs
        trusted = self.forced is None
        cumulative = self.opts.increment_kind == "cumulative" and self.opts.policy != "full"
        if trusted:
            # every row written since the baseline was modified since (the write path marks
            # it), so the session's record of written rows stays exact without a scan
            for n in names:
                sess.written[n].add(mods[n])
        if trusted and cumulative:
            since = sess.since_base
            for n in names:
                since[n].add(mods[n])
            union = {n: since[n].rows() for n in names}
        else:
            since = {n: RowSet(specs[n]) for n in names}
            union = {n: mods[n] for n in names}
            if cumulative:
                for n in names:
                    since[n].add(mods[n])
        head = self.head
        decision = decide(self.opts, self.forced, head["cycle"] if head else None,
                          sum(len(u) for u in union.values()),
                          sum(len(m) for m in mods.values()),
                          lambda: sum(sess.written[n].count() for n in names))
        if decision.kind == "full":
            if trusted:
                rows = {n: sess.written[n].rows() for n in names}
            else:
                rows = {n: written_rows(n) for n in names}
                sess.written = {n: RowSet(specs[n], rows[n]) for n in names}
            since = {n: RowSet(specs[n]) for n in names}
        else:
            rows = union if decision.kind == "cumulative" else mods
        sess.since_base = since
        self.decision = decision
        return decision, rows

    def body(self, decision: Any, snaps: dict[str, "_TableSnap"]) -> dict[str, Any]:
        """The manifest body (without the files) of the decided checkpoint."""
        name, head, kind = self.name, self.head, decision.kind
        n_rows = int(sum(len(s.rows) for s in snaps.values()))
        if kind == "full":
            baseline, restore_set = name, [name]
            cycle = {"baseline": name, "baseline_rows": n_rows, "increment_rows": []}
        else:
            assert head is not None
            baseline = head["baseline"]
            restore_set = ([baseline, name] if kind == "cumulative"
                           else list(head["restore_set"]) + [name])
            cycle = {**head["cycle"], "increment_rows":
                     list(head["cycle"]["increment_rows"]) + [n_rows]}
        return {
            "format": fmt.FORMAT, "version": fmt.VERSION, "name": name, "seq": self.seq,
            "kind": kind, "reason": decision.reason, "policy": self.opts.to_json(),
            "parent": head["name"] if head else None, "baseline": baseline,
            "restore_set": restore_set, "step": self.step, "reader": self.reader,
            "created": self.created, "created_unix": self.created_unix,
            "scheme": self.scheme.to_json(), "state_dtype": self.state_dtype,
            "restores": self.restores, "cycle": cycle,
            "tables": {n: {"spec": self.specs[n].to_json(), "scheme": snaps[n].scheme.to_json(),
                           "rows": int(len(snaps[n].rows))} for n in self.names},
        }


# -- the background writer -------------------------------------------------------------------

class _Job:
    def __init__(self, handle: CheckpointHandle, root: str, body: dict[str, Any] | None,
                 snaps: dict[str, _TableSnap], dense: dict[str, Any] | None, zstd_level: int,
                 keep: int | None, lock: fmt.RootLock, sess: _Session, plan: _Plan,
                 opened: dict[str, Any] | None = None) -> None:
        self.handle = handle
        self.root = root
        self.body = body  # None until prepared (copy-on-write)
        self.snaps = snaps
        self.dense = dense
        self.zstd_level = zstd_level
        self.keep = keep
        self.lock = lock
        self.sess = sess
        self.plan = plan
        #: open copy-on-write snapshots per table (the record taken, rows not decided yet)
        self.opened = dict(opened or {})

    def _prepare(self) -> None:
        """Copy-on-write: enumerate the records the open snapshots took, decide the kind, and
        narrow each snapshot to the rows to save (the training thread goes on meanwhile;
        the rows it changes are copied first)."""
        if _prepare_hook is not None:
            _prepare_hook(self.handle)
        t0 = time.perf_counter()
        plan = self.plan
        mods = {n: snap.take_modified() for n, snap in self.opened.items()}
        t1 = time.perf_counter()
        decision, rows = plan.decide(mods, lambda n: self.opened[n].written_rows())
        t2 = time.perf_counter()
        snaps: dict[str, _TableSnap] = {}
        for n in plan.names:
            snap = self.opened[n]
            snap.fix(rows[n])
            tscheme = _table_scheme(plan.specs[n], plan.scheme)
            if not len(rows[n]):
                snaps[n] = _TableSnap.empty(plan.specs[n], tscheme, rows[n])
            else:
                snaps[n] = _TableSnap(plan.specs[n], tscheme, snap.rows, None, None, snap,
                                      self.sess.buffers)
        self.opened = {}
        self.snaps = snaps
        self.body = plan.body(decision, snaps)
        t3 = time.perf_counter()
        h = self.handle
        h.snapshot.update({"rows": int(sum(len(s.rows) for s in snaps.values())),
                           "writer_take_modified_s": t1 - t0, "writer_decide_s": t2 - t1,
                           "writer_fix_s": t3 - t2})
        h._decide(decision.kind, decision.reason)

    def run(self) -> None:
        h = self.handle
        t0, c0 = time.perf_counter(), time.thread_time()
        created = False
        try:
            if self.body is None:
                self._prepare()
            for stale in fmt.incomplete(self.root):  # interrupted writers' leftovers
                fmt.remove_checkpoint_dir(self.root, stale)
            os.mkdir(h.path, 0o700)
            created = True
            fmt.fsync_dir(self.root)
            pause("begin")
            chunks, raw_in = self._write_rows()
            for snap in self.snaps.values():  # every row copied: the write path stops checking
                snap.release()
            dense = None
            if self.dense is not None:
                from tierstore.ckpt import dense as dense_mod
                files = dense_mod.save(self.dense, h.path)
                dense = {"files": []}
                for f in files:
                    crc, size = fmt.file_crc(os.path.join(h.path, f))
                    dense["files"].append({"file": f, "what": "dense", "bytes": size,
                                           "crc32": crc})
                fmt.fsync_dir(os.path.join(h.path, dense_mod.DENSE_DIR))
            body = dict(self.body)
            body["chunks"] = chunks
            body["dense"] = dense
            body["bytes"] = int(sum(e["bytes"] for e in fmt.chunk_entries(body)))
            body["input_bytes"] = raw_in
            fmt.write_manifest(h.path, body)
            fmt.fsync_dir(self.root)
            pause("committed")
            h._manifest = body
            with_cpu = time.thread_time() - c0
            h.stats = {"bytes": body["bytes"], "input_bytes": raw_in,
                       "rows": int(sum(len(s.rows) for s in self.snaps.values())),
                       "write_s": time.perf_counter() - t0, "write_cpu_s": with_cpu,
                       "rows_copied_on_write": int(sum(s.cow.copied_on_write
                                                       for s in self.snaps.values()
                                                       if s.cow is not None))}
            self.sess.head = body
            self.sess.untrusted_reason = None
            self.snaps = {}
            self.dense = None
            if self.keep is not None:
                try:
                    apply_retention(self.root, self.keep)
                except Exception as e:  # the checkpoint is committed; retention retries next time
                    warnings.warn(f"checkpoint retention under {self.root} failed: {e}")
        except BaseException as e:
            h._error = e
            self.sess.head = None
            self.sess.untrusted_reason = f"the write of {h.name} failed ({e})"
            if created and not os.path.exists(os.path.join(h.path, fmt.MANIFEST)):
                try:
                    fmt.remove_checkpoint_dir(self.root, h.name)
                except Exception:
                    pass
            if not isinstance(e, Exception):
                raise
            warnings.warn(f"checkpoint {h.path} failed: "
                          f"{''.join(traceback.format_exception_only(type(e), e)).strip()}")
        finally:
            for snap in self.snaps.values():
                snap.release()
            for cow in self.opened.values():  # failed before its rows were decided
                cow.release()
            self.snaps = {}
            self.opened = {}
            self.dense = None
            self.lock.release()
            h._decided.set()
            h._done.set()

    def _write_rows(self) -> tuple[list[dict[str, Any]], int]:
        chunks: list[dict[str, Any]] = []
        raw_in = 0
        d = self.handle.path
        lvl = self.zstd_level
        for name, snap in self.snaps.items():
            n = len(snap.rows)
            for part, lo in enumerate(range(0, n, fmt.PART_ROWS)):
                hi = min(n, lo + fmt.PART_ROWS)
                w, st = snap.part(name, lo, hi)
                info = {"table": name, "part": part, "rows": hi - lo}
                chunks.append(fmt.write_chunk(d, f"{name}.{part:05d}.ids.zst",
                                              fmt.encode_ids(snap.rows[lo:hi]), lvl,
                                              what="ids", **info))
                pause("chunk")
                raw_in += (hi - lo) * w.shape[1] * 4  # counted as fp32 input
                enc = quant.encode(w.astype(np.float32, copy=False), snap.scheme)
                chunks.append(fmt.write_chunk(d, f"{name}.{part:05d}.w.zst", enc.to_bytes(),
                                              lvl, what="weights", **info))
                pause("chunk")
                if st.shape[1]:
                    raw_in += st.nbytes
                    enc = quant.encode_state(st, self.body["state_dtype"])
                    chunks.append(fmt.write_chunk(d, f"{name}.{part:05d}.s.zst", enc.to_bytes(),
                                                  lvl, what="state", **info))
                    pause("chunk")
        return chunks, raw_in


# -- retention -------------------------------------------------------------------------------

def apply_retention(root: str, keep: int) -> list[str]:
    """Keep the newest ``keep`` chains (a baseline and every checkpoint on it; chains ranked
    by their newest checkpoint) and delete every checkpoint no kept chain needs. Unreadable
    checkpoints are left alone (``verify`` reports them). Returns the names deleted.
    The caller holds the root lock."""
    chains: dict[str, list[str]] = {}
    for name in fmt.committed(root):
        try:
            m = fmt.read_manifest(os.path.join(root, name))
        except fmt.CorruptCheckpoint:
            continue
        chains.setdefault(m["baseline"], []).append(name)
    ranked = sorted(chains, key=lambda b: max(fmt.seq_of(n) for n in chains[b]), reverse=True)
    needed = {n for b in ranked[:keep] for n in chains[b]} | set(ranked[:keep])
    gone = []
    for b in ranked[keep:]:
        for name in sorted(chains[b], key=fmt.seq_of, reverse=True):  # increments first
            if name not in needed:
                fmt.remove_checkpoint_dir(root, name)
                gone.append(name)
    return gone
