"""SCM tier for dense tables: one file of fixed-size row records, read through mmap.

Record r sits at ``HEADER + r * record_bytes`` (see :class:`tierstore.config.RowLayout`). The
file is created sparse at full size, so a never-written record reads as zeros; its 'written' flag
is then 0 and the row is generated from (seed, row id). Reads are one numba pass over the
mapping that copies each record's weights and state straight to their destination (a DRAM
slot, or the caller's arrays), prefetching rows ahead: on this kind of machine that is the
fastest way to read random rows of a file (``tierstore bench``'s scm section compares it with
pread and a numpy.memmap fancy-index gather: about 4x the latter).

Writes never tear a row, even if the process is killed mid-write: each batch is first written
to a journal (ids + records + the new written-row count, then the header that arms it) and then
scattered into the file (through the mapping, or with a pwrite per row once the row files are
large enough for the kernel to clean their pages under us: see :meth:`RowFile._apply`); at
open, an armed journal is replayed (idempotent). The header goes in only after its payload is
complete, so a process killed while writing the journal leaves it disarmed (page cache orders
the two writes for every later reader; power loss is :meth:`RowFile.flush`'s business). A
checksum over the payload would catch nothing more: a CRC32 of it (the earlier format, still
replayed) took 38% of the write jobs' time in a profile of tierstored at 10% DRAM, and
dropping it made 10%-DRAM training steps in one process 3-6% faster.

Writes are *write-behind*: :meth:`RowFile.write` packs the rows into a private buffer and
returns; the journal append, the scatter (where the page faults or syscalls are paid) and the
disarm run behind the caller (:mod:`tierstore.tiers.write_behind`: on one background thread
per process, overlapping the caller's next work; in tierstored, after each reply). Every other
method waits for the file's pending write first, so reads always see it. Page cache is shared, so once a write has completed (the next call on the
file, or :meth:`RowFile.flush`) it survives SIGKILL; a process killed before that loses only
rows of that write, which keep the last value they held on SCM. :meth:`RowFile.flush` also
fsyncs for power loss. An error of a background write (say, a full disk) is raised by the next
call on the file.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import time
import zlib
from concurrent.futures import Future
from typing import Any, Callable

import numba
import numpy as np

from tierstore.config import RowLayout, TableSpec
from tierstore.errors import CorruptStore
from tierstore.optim.kernels import (PREFETCH_DISTANCE, _prefetch, _prefetch_row, bits_for,
                                     sort_payloads)
from tierstore.rowinit import initial_rows
from tierstore.tiers import write_behind

MAGIC = b"TSROWS01"
HEADER = 4096  # magic, record size, num rows, written-row count; padded to a page
_HDR = struct.Struct("<8sQQQ")
_JHDR = struct.Struct("<8sQQI")  # magic, n rows, payload bytes, crc32(payload) (JMAGIC_V1) or 0
JMAGIC = b"TSJRNL02"  # header written after its payload; no checksum
JMAGIC_V1 = b"TSJRNL01"  # header and payload in one write, payload CRC32'd (replayed still)

#: tables up to this many rows test reads against a pending write with a mask (~30x faster
#: than binary search at 10k ids)
_MASK_ROWS = 1 << 26


#: how the background thread writes records: "auto" (see :meth:`RowFile._apply`), "mmap" or
#: "pwrite" (environment TIERSTORE_SCM_WRITES; for measuring the two)
WRITE_MODE = os.environ.get("TIERSTORE_SCM_WRITES", "auto")
#: bytes of all open row files of this process (the "auto" choice)
_open_bytes = [0]
#: rows written so far by this process on each path (benchmarks report which one ran)
WRITTEN_ROWS = {"mapping": 0, "pwrite": 0}


_threshold = {"at": -1e9, "bytes": 0}


def _dirty_background_bytes(max_age: float = 1.0) -> int:
    """The kernel's dirty background threshold in bytes (0 where unknown), read from
    /proc/vmstat at most every ``max_age`` seconds (it moves with free memory)."""
    now = time.monotonic()
    if now - _threshold["at"] >= max_age:
        try:
            with open("/proc/vmstat", "rb") as f:
                stat = dict(line.split() for line in f)
            found = int(stat[b"nr_dirty_background_threshold"]) * mmap.PAGESIZE
        except (OSError, KeyError, ValueError):
            found = 0
        _threshold.update(at=now, bytes=found)
    return _threshold["bytes"]


def _write_through_mapping() -> bool:
    """"auto": write through the mapping while the open row files of this process together
    are no larger than the kernel's dirty background threshold, so that their dirty pages
    stay below the level where the kernel starts cleaning pages on its own."""
    if WRITE_MODE != "auto":
        return WRITE_MODE == "mmap"
    return _open_bytes[0] <= _dirty_background_bytes()


_libc = ctypes.CDLL(None, use_errno=True)
_pwrite = _libc.pwrite
_pwrite.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pwrite.restype = ctypes.c_ssize_t


@numba.njit(nogil=True)
def _pwrite_records(fd, rec, rows, order, header):  # pragma: no cover
    """pwrite record order[k] (uint8 [n, record_bytes]) at ``header + rows[order[k]] *
    record_bytes`` of file ``fd``, k = 0..n-1; returns how many were written whole (n unless a
    write failed)."""
    rb = rec.shape[1]
    for k in range(order.shape[0]):
        i = order[k]
        if _pwrite(fd, rec[i].ctypes.data, rb, header + rows[i] * rb) != rb:
            return k
    return order.shape[0]


def _write_order(rows: np.ndarray, num_rows: int) -> np.ndarray:
    """The order a pwrite batch goes to the file in: ascending row ids (file offsets). One
    pwrite per row measured 1.9x faster in that order than in a random one (25k rows of 520 B
    into a 520 MB file: 3.1 against 6.0 us per row). Writes through the mapping keep the
    batch's order: there the sort (~7 ns a row on the write thread) cost more than it saved
    (uniform ids at 26 x 100k x 64, pooling 20, 10% DRAM: 472 ms per step sorted, 395 not)."""
    order = np.arange(len(rows), dtype=np.int64)
    if num_rows > 2**31 or len(rows) < 2:
        return order
    return sort_payloads(rows, order, bits_for(num_rows - 1))


@numba.njit(inline="always", nogil=True, cache=True)
def unwritten(src, flag):  # pragma: no cover
    """Whether record ``src`` (uint8 [record_bytes]) was never written (its u32 flag is 0)."""
    return src[flag] == 0 and src[flag + 1] == 0 and src[flag + 2] == 0 and src[flag + 3] == 0


@numba.njit(inline="always", nogil=True, cache=True)
def record_to_slab(src, w, s, p, soff):  # pragma: no cover
    """Slab row ``p`` (w, s: uint8 views of the weights and state slabs) = record ``src``."""
    for b in range(w.shape[1]):
        w[p, b] = src[b]
    for b in range(s.shape[1]):
        s[p, b] = src[soff + b]


@numba.njit(inline="always", nogil=True, cache=True)
def slab_to_record(w, s, p, soff, flag, out):  # pragma: no cover
    """Record ``out`` (uint8 [record_bytes]) = slab row ``p``, written flag set, padding
    zero."""
    wb = w.shape[1]
    for b in range(wb):
        out[b] = w[p, b]
    for b in range(wb, soff):
        out[b] = 0
    for b in range(s.shape[1]):
        out[soff + b] = s[p, b]
    out[flag] = 1
    for b in range(flag + 1, out.shape[0]):
        out[b] = 0


@numba.njit(nogil=True, cache=True)
def _gather_into(records, rows, pos, soff, flag, w_out, s_out, fresh):  # pragma: no cover
    """Copy records ``rows`` straight into slab rows ``pos`` (w_out, s_out: uint8 views of the
    weights and state slabs); never-written records are skipped and their indices in ``rows``
    listed in ``fresh``. Returns how many were listed."""
    nf = 0
    n = rows.shape[0]
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch(records, (rows[i + PREFETCH_DISTANCE], 0))
        src = records[rows[i]]
        if unwritten(src, flag):
            fresh[nf] = i
            nf += 1
            continue
        record_to_slab(src, w_out, s_out, pos[i], soff)
    return nf


@numba.njit(nogil=True, cache=True)
def _pack_slots(w_in, s_in, pos, soff, flag, rec):  # pragma: no cover
    """Records (written flag set, padding zero) of slab rows ``pos`` into ``rec`` (uint8
    [len(pos), record_bytes]); w_in, s_in: uint8 views of the weights and state slabs."""
    n = pos.shape[0]
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            q = pos[i + PREFETCH_DISTANCE]
            _prefetch_row(w_in, q)
            _prefetch(s_in, (q, 0))
        slab_to_record(w_in, s_in, pos[i], soff, flag, rec[i])


@numba.njit(nogil=True, cache=True)
def _count_unwritten(records, rows, flag):  # pragma: no cover
    """How many of records ``rows`` were never written (:func:`unwritten`)."""
    n = 0
    for i in range(rows.shape[0]):
        n += unwritten(records[rows[i]], flag)
    return n


@numba.njit(nogil=True, cache=True)
def _scatter_records(records, rows, rec):  # pragma: no cover
    """``records[rows[i]] = rec[i]``: numpy's scatter holds the GIL, and here each write may
    take a page fault (a page the kernel cleaned for writeback), which stalled the training
    thread waiting to take the GIL back after its own kernels."""
    rb = rec.shape[1]
    n = rows.shape[0]
    for i in range(n):
        if i + PREFETCH_DISTANCE < n:
            _prefetch(records, (rows[i + PREFETCH_DISTANCE], 0))
        dst = records[rows[i]]
        src = rec[i]
        for b in range(rb):
            dst[b] = src[b]


def as_bytes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous 2-d array as uint8 [rows, row bytes] (no copy; raises ValueError for
    any other array, whose view would be a copy that writes never reach)."""
    if a.ndim != 2 or not a.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous 2-d array, got shape {a.shape}")
    return a.view(np.uint8).reshape(a.shape[0], -1)


class RowFile:
    """Rows of one dense table on SCM. Not thread-safe; one writer process (the store owner)."""

    def __init__(self, path: str, spec: TableSpec) -> None:
        self.spec = spec
        self.layout: RowLayout = spec.layout
        self.path = path
        self.journal_path = path + ".journal"
        rec = self.layout.record_bytes
        size = HEADER + spec.num_rows * rec
        new = not os.path.exists(path)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if new:
            os.ftruncate(self.fd, size)
            os.pwrite(self.fd, _HDR.pack(MAGIC, rec, spec.num_rows, 0), 0)
        self._check_header(size)
        self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._size = size
        _open_bytes[0] += size
        self.records = np.frombuffer(self.mm, dtype=np.uint8, offset=HEADER,
                                     count=spec.num_rows * rec).reshape(spec.num_rows, rec)
        self.jfd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o600)
        #: bumped by every change of the file's rows: a copy read at generation g is current
        #: while generation == g (the DRAM tier reuses a batch's bypass reads in its backward)
        self.generation = 0
        #: the write running on the background thread, if any (see the module docstring), and
        #: its rows (reads of other rows need not wait for it); replaced as one tuple under
        #: _lock, since the checkpoint writer's thread reads too
        self._pending: tuple[Future, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._replay_journal()

    def wait(self) -> None:
        """Block until this file's background write (if any) is complete; raises its error.
        Any thread."""
        p = self._pending
        if p is not None:
            self._finish(p)

    def _finish(self, p: tuple[Future, np.ndarray]) -> None:
        try:
            p[0].result()
        except BaseException:
            with self._lock:
                if self._pending is p:
                    self._pending = None
                    (self.written,) = struct.unpack("<Q", self.mm[24:32])  # last completed
            raise
        with self._lock:
            if self._pending is p:
                self._pending = None

    def wait_for(self, rows: np.ndarray) -> None:
        """Wait for the pending write only if it is still running and holds one of ``rows``
        (int64 ids): after this, reading ``rows`` from :attr:`records` sees their last write."""
        p = self._pending
        if p is None:
            return
        if p[0].done():
            self._finish(p)
            return
        pend = p[1]
        if self.spec.num_rows <= _MASK_ROWS:  # a zeroed mask: only its touched pages cost
            mask = np.zeros(self.spec.num_rows, dtype=np.bool_)
            mask[pend] = True
            clash = mask[rows].any()
        else:
            k = np.minimum(np.searchsorted(pend, rows), len(pend) - 1)
            clash = (pend[k] == rows).any()
        if clash:
            self._finish(p)

    def _check_header(self, size: int) -> None:
        magic, rec, rows, self.written = _HDR.unpack(os.pread(self.fd, _HDR.size, 0))
        if magic != MAGIC or rec != self.layout.record_bytes or rows != self.spec.num_rows:
            raise CorruptStore(f"{self.path}: header does not match table {self.spec.name!r} "
                               f"(magic {magic!r}, record {rec}, rows {rows})")
        if os.fstat(self.fd).st_size < size:
            raise CorruptStore(f"{self.path}: file is truncated")

    # -- reads -----------------------------------------------------------------------------
    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights [n, dim] (table dtype) and state [n, state_dim] f32 of ``rows`` (int64).

        Rows never written come back as their deterministic initial value and zero state.
        """
        n = len(rows)
        w = np.empty((n, self.spec.dim), dtype=self.layout.np_dtype)
        s = np.empty((n, self.layout.state_dim), dtype=np.float32)
        self.read_into(rows, w, s, np.arange(n, dtype=np.int64))
        return w, s

    def read_into(self, rows: np.ndarray, weights: np.ndarray, state: np.ndarray,
                  pos: np.ndarray) -> None:
        """:meth:`read` straight into slab rows: ``weights[pos[i]]``, ``state[pos[i]]`` = row
        ``rows[i]`` (int64 arrays; weights [m, dim] of the table dtype and state [m,
        state_dim] float32, both C-contiguous). One pass, no intermediate copies."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        self.wait_for(rows)
        fresh = np.empty(len(rows), dtype=np.int64)
        nf = _gather_into(self.records, rows, pos, self.layout.state_offset,
                          self.layout.flag_offset, as_bytes(weights), as_bytes(state), fresh)
        if nf:
            f = fresh[:nf]
            weights[pos[f]] = initial_rows(self.spec.init, self.spec.seed, rows[f],
                                           self.spec.dim, self.layout.np_dtype)
            state[pos[f]] = 0.0

    # -- writes ----------------------------------------------------------------------------
    def write(self, rows: np.ndarray, w: np.ndarray, s: np.ndarray) -> None:
        """Store rows (distinct int64 ids) atomically per row with respect to process death.

        Returns once ``w`` and ``s`` are copied; the file is written in the background (see
        the module docstring)."""
        n = len(rows)
        w = np.ascontiguousarray(w, dtype=self.layout.np_dtype).reshape(n, self.spec.dim)
        s = np.ascontiguousarray(s, dtype=np.float32).reshape(n, self.layout.state_dim)
        self.write_slots(rows, w, s, np.arange(n, dtype=np.int64))

    def write_slots(self, rows: np.ndarray, weights: np.ndarray, state: np.ndarray,
                    pos: np.ndarray) -> None:
        """:meth:`write` of rows whose values are slab rows ``weights[pos]``, ``state[pos]``
        (see :meth:`read_into`), packed in one pass."""
        if len(rows) == 0:
            return
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        rec = np.empty((len(pos), self.layout.record_bytes), dtype=np.uint8)
        _pack_slots(as_bytes(weights), as_bytes(state), pos, self.layout.state_offset,
                    self.layout.flag_offset, rec)
        self._submit(rows, self._commit, rec)

    def write_records(self, rows: np.ndarray, rec: np.ndarray) -> None:
        """:meth:`write` of rows already packed as records (uint8 [len(rows), record_bytes]:
        the row's bytes, its state, the written flag set, padding zero), as the DRAM tier's
        exchange kernel packs them; ``rec`` becomes the job's."""
        if len(rows):
            self._submit(rows, self._commit, rec)

    def update(self, rows: np.ndarray, w: np.ndarray, s: np.ndarray,
               compute: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """:meth:`write` of rows whose new values ``compute(w, s)`` makes in place, on the
        background thread: the caller goes on meanwhile. ``w``/``s`` (C-contiguous, the
        table's dtypes, [len(rows), dim] / [len(rows), state_dim]) and whatever ``compute``
        reads become the job's: the caller must not touch them again. Reads of these rows
        wait for the job; its errors are raised by the next call on the file."""
        if len(rows) == 0:
            return
        self._submit(rows, self._update_commit, w, s, compute)

    def _update_commit(self, rows: np.ndarray, w: np.ndarray, s: np.ndarray,
                       compute: Callable[[np.ndarray, np.ndarray], None]) -> None:
        compute(w, s)
        rec = np.empty((len(rows), self.layout.record_bytes), dtype=np.uint8)
        _pack_slots(as_bytes(w), as_bytes(s), np.arange(len(rows), dtype=np.int64),
                    self.layout.state_offset, self.layout.flag_offset, rec)
        self._commit(rows, rec)

    def _submit(self, rows: np.ndarray, job: Callable[..., None], *args: Any) -> None:
        """Start the background job ``job(rows, *args)``, which writes ``rows``."""
        rows = np.array(rows, dtype=np.int64)  # a private copy: the caller may reuse its array
        self.wait()  # (packing above overlapped the previous write)
        self.generation += 1
        fut = write_behind.submit(job, rows, *args)
        with self._lock:
            self._pending = (fut, rows if self.spec.num_rows <= _MASK_ROWS else np.sort(rows))

    def _commit(self, rows: np.ndarray, rec: np.ndarray) -> None:
        """Count the rows written for the first time, then journal, scatter and disarm one
        write (the background thread; ``written`` is updated here, the file's one pending
        write being the only writer of it meanwhile)."""
        count = self.written + int(_count_unwritten(self.records, rows, self.layout.flag_offset))
        # payload = ids, records, count: written from the arrays' own buffers (no joined copy)
        parts = (memoryview(rows).cast("B"), memoryview(rec).cast("B"), struct.pack("<Q", count))
        size = sum(len(part) for part in parts)
        if os.pwritev(self.jfd, parts, _JHDR.size) != size:
            raise OSError(f"{self.journal_path}: short journal write")
        os.pwrite(self.jfd, _JHDR.pack(JMAGIC, len(rows), size, 0), 0)  # arm it
        self._apply(rows, rec, count)
        self.written = count
        os.pwrite(self.jfd, b"\0" * 8, 0)  # journal record applied: disarm it

    def written_rows(self) -> np.ndarray:
        """Sorted ids of rows ever written. Reads the 'written' byte of the records in the
        file's data extents only (holes are never-written rows): see :meth:`mark_written`."""
        from tierstore.ckpt import kernels as ck
        flags = np.zeros(self.spec.num_rows, dtype=np.uint8)
        self.mark_written(flags)
        return ck.rows_of(flags)

    def mark_written(self, flags: np.ndarray) -> int:
        """``flags[r] = 1`` (uint8 [num_rows]) for every row r ever written; returns how many
        records were found written.

        The file is sparse: the extents holding data are found with ``lseek(SEEK_DATA /
        SEEK_HOLE)`` and only their records are read (a numba scan that releases the GIL, so
        a checkpoint's background thread can run it while the owner keeps writing). A store
        whose rows all live in DRAM has a file of holes: nothing is read. Where the
        filesystem cannot report holes, every record is read. Safe against concurrent
        :meth:`write` (a row written meanwhile may or may not be reported), not against
        :meth:`clear` or :meth:`close`."""
        from tierstore.ckpt import kernels as ck
        self.wait()
        rec = self.layout.record_bytes
        flag = self.layout.flag_offset
        n_rows = self.spec.num_rows
        found = 0
        for lo_b, hi_b in self._data_extents():
            lo = max(0, (lo_b - HEADER) // rec)
            hi = min(n_rows, -(-(hi_b - HEADER) // rec))
            if hi > lo:
                found += int(ck.written_records(self.records, flag, lo, hi, flags))
        return found

    def _data_extents(self) -> list[tuple[int, int]]:
        """Byte ranges [lo, hi) of the record area that may hold data (not holes)."""
        end = HEADER + self.spec.num_rows * self.layout.record_bytes
        seek_data = getattr(os, "SEEK_DATA", None)
        if seek_data is None:
            return [(HEADER, end)]
        out = []
        off = HEADER
        try:
            while off < end:
                try:
                    lo = os.lseek(self.fd, off, seek_data)
                except OSError as e:  # ENXIO: no data at or after off
                    if e.errno == errno.ENXIO:
                        break
                    raise
                if lo >= end:
                    break
                hi = min(end, os.lseek(self.fd, lo, os.SEEK_HOLE))
                out.append((lo, hi))
                off = hi
        except OSError:  # the filesystem cannot tell: read everything
            return [(HEADER, end)]
        return out

    def clear(self) -> None:
        """Every row back to never-written (the file becomes sparse zeros again)."""
        self.wait()
        size = HEADER + self.spec.num_rows * self.layout.record_bytes
        os.pwrite(self.jfd, b"\0" * 8, 0)
        os.ftruncate(self.fd, HEADER)
        os.ftruncate(self.fd, size)
        self.written = 0
        self.generation += 1
        self.mm[24:32] = struct.pack("<Q", 0)
        self.mm.flush()

    def _apply(self, rows: np.ndarray, rec: np.ndarray, count: int) -> None:
        """Records into the file, then the header's written count.

        Through the mapping (a memcpy per row) or with one pwrite per row in ascending row
        order (~3 us on a 520 MB file, :func:`_write_order`), see
        :func:`_write_through_mapping`. A process that writes its mapping owns writable
        page-table entries, and every such page the kernel cleans for writeback costs a TLB
        flush on each CPU running the process: with the writes on the background thread that
        interrupted the training thread once per page. Measured at 10% DRAM, pooling 20:
        8 x 1M x 128 (4.1 GB of row files; threshold 2.2 GB) 2.8x faster steps with pwrite;
        26 x 100k x 64 (0.7 GB) 1.3x and 26 x 100k x 128 (1.4 GB) 1.2x faster through the
        mapping; 8 x 1M x 64 (2.1 GB) the same either way."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if _write_through_mapping():
            _scatter_records(self.records, rows, np.ascontiguousarray(rec))
            self.mm[24:32] = struct.pack("<Q", count)  # header field "written"
            WRITTEN_ROWS["mapping"] += len(rows)
            return
        WRITTEN_ROWS["pwrite"] += len(rows)
        order = _write_order(rows, self.spec.num_rows)
        done = _pwrite_records(self.fd, np.ascontiguousarray(rec), rows, order, HEADER)
        if done != len(rows):
            raise OSError(f"{self.path}: short write of row {int(rows[order[done]])}")
        if os.pwrite(self.fd, struct.pack("<Q", count), 24) != 8:  # header field "written"
            raise OSError(f"{self.path}: short header write")

    def _replay_journal(self) -> None:
        head = os.pread(self.jfd, _JHDR.size, 0)
        if len(head) < _JHDR.size:
            return
        magic, n, plen, crc = _JHDR.unpack(head)
        if magic not in (JMAGIC, JMAGIC_V1):
            return
        payload = os.pread(self.jfd, plen, _JHDR.size)
        rec_bytes = self.layout.record_bytes
        if (len(payload) != plen or plen != n * (8 + rec_bytes) + 8
                or (magic == JMAGIC_V1 and zlib.crc32(payload) != crc)):
            os.pwrite(self.jfd, b"\0" * 8, 0)  # torn journal write: the rows were never touched
            return
        rows = np.frombuffer(payload, dtype=np.int64, count=n)
        rec = np.frombuffer(payload, dtype=np.uint8, offset=8 * n, count=n * rec_bytes) \
            .reshape(n, rec_bytes)
        (count,) = struct.unpack("<Q", payload[-8:])
        self._apply(rows, rec, count)
        self.written = count
        os.pwrite(self.jfd, b"\0" * 8, 0)

    def flush(self) -> None:
        """Make every write so far durable against power loss (msync + fsync)."""
        self.wait()
        self.mm.flush()
        os.fsync(self.fd)

    # -- bookkeeping -----------------------------------------------------------------------
    def rows_written(self) -> int:
        """How many rows have ever been written (after the pending write)."""
        self.wait()
        return self.written

    def disk_bytes(self) -> int:
        """Bytes allocated on disk (the file is sparse)."""
        self.wait()
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Finish the pending write (raising its error, after closing) and close the file."""
        try:
            self.wait()
        finally:
            self.records = None  # type: ignore[assignment]
            _open_bytes[0] -= self._size
            try:
                self.mm.close()
            except BufferError:
                pass
            os.close(self.fd)
            os.close(self.jfd)
