"""SCM tier for dense tables: one file of fixed-size row records, read through mmap.

Record r sits at ``HEADER + r * record_bytes`` (see :class:`tierstore.config.RowLayout`). The
file is created sparse at full size, so a never-written record reads as zeros; its 'written' flag
is then 0 and the row is generated from (seed, row id). Reads are one fancy-index gather over
the mapping: on this kind of machine that is the fastest way to read random rows of a file
(benchmarks/bench_scm.py compares it with pread and numpy.memmap).

Writes never tear a row, even if the process is killed mid-write: each batch is first appended
to a journal (header + CRC32 + ids + records + the new written-row count) and then scattered
into the mapping; at open, a journal whose CRC checks out is replayed (idempotent). Page cache
is shared, so after the write returns the data survives SIGKILL; :meth:`RowFile.flush` also
fsyncs for power loss.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import zlib

import numpy as np

from tierstore.config import RowLayout, TableSpec
from tierstore.errors import CorruptStore
from tierstore.rowinit import initial_rows

MAGIC = b"TSROWS01"
HEADER = 4096  # magic, record size, num rows, written-row count; padded to a page
_HDR = struct.Struct("<8sQQQ")
_JHDR = struct.Struct("<8sQQI")  # magic, n rows, payload bytes, crc32(payload)
JMAGIC = b"TSJRNL01"


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
        self.records = np.frombuffer(self.mm, dtype=np.uint8, offset=HEADER,
                                     count=spec.num_rows * rec).reshape(spec.num_rows, rec)
        self.jfd = os.open(self.journal_path, os.O_RDWR | os.O_CREAT, 0o600)
        #: bumped by every change of the file's rows: a copy read at generation g is current
        #: while generation == g (the DRAM tier reuses a batch's bypass reads in its backward)
        self.generation = 0
        self._replay_journal()

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
        rec = self.records[rows]
        w, s, written = self.layout.unpack(rec)
        if not written.all():
            fresh = ~written
            w[fresh] = initial_rows(self.spec.init, self.spec.seed, rows[fresh], self.spec.dim,
                                    self.layout.np_dtype)
            s[fresh] = 0.0
        return w, s

    # -- writes ----------------------------------------------------------------------------
    def write(self, rows: np.ndarray, w: np.ndarray, s: np.ndarray) -> None:
        """Store rows (distinct int64 ids) atomically per row with respect to process death."""
        if len(rows) == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        rec = self.layout.pack(w, s)
        flag = self.layout.flag_offset
        newly = int((self.records[rows, flag] == 0).sum())
        count = self.written + newly
        # payload = ids, records, count: written from the arrays' own buffers (no joined copy)
        parts = (memoryview(rows).cast("B"), memoryview(rec).cast("B"), struct.pack("<Q", count))
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        size = sum(len(part) for part in parts)
        head = _JHDR.pack(JMAGIC, len(rows), size, crc)
        if os.pwritev(self.jfd, (head, *parts), 0) != len(head) + size:
            raise OSError(f"{self.journal_path}: short journal write")
        self._apply(rows, rec, count)
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
        size = HEADER + self.spec.num_rows * self.layout.record_bytes
        os.pwrite(self.jfd, b"\0" * 8, 0)
        os.ftruncate(self.fd, HEADER)
        os.ftruncate(self.fd, size)
        self.written = 0
        self.generation += 1
        self.mm[24:32] = struct.pack("<Q", 0)
        self.mm.flush()

    def _apply(self, rows: np.ndarray, rec: np.ndarray, count: int) -> None:
        self.generation += 1
        self.records[rows] = rec
        self.written = count
        self.mm[24:32] = struct.pack("<Q", count)  # header field "written"

    def _replay_journal(self) -> None:
        head = os.pread(self.jfd, _JHDR.size, 0)
        if len(head) < _JHDR.size:
            return
        magic, n, plen, crc = _JHDR.unpack(head)
        if magic != JMAGIC:
            return
        payload = os.pread(self.jfd, plen, _JHDR.size)
        rec_bytes = self.layout.record_bytes
        if len(payload) != plen or zlib.crc32(payload) != crc or plen != n * (8 + rec_bytes) + 8:
            os.pwrite(self.jfd, b"\0" * 8, 0)  # torn journal append: the rows were never touched
            return
        rows = np.frombuffer(payload, dtype=np.int64, count=n)
        rec = np.frombuffer(payload, dtype=np.uint8, offset=8 * n, count=n * rec_bytes) \
            .reshape(n, rec_bytes)
        (count,) = struct.unpack("<Q", payload[-8:])
        self._apply(rows, rec, count)
        os.pwrite(self.jfd, b"\0" * 8, 0)

    def flush(self) -> None:
        """Make every write so far durable against power loss (msync + fsync)."""
        self.mm.flush()
        os.fsync(self.fd)

    # -- bookkeeping -----------------------------------------------------------------------
    def rows_written(self) -> int:
        return self.written

    def disk_bytes(self) -> int:
        """Bytes allocated on disk (the file is sparse)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        self.records = None  # type: ignore[assignment]
        try:
            self.mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        os.close(self.jfd)
