"""`tierstore bench scm`: random row reads from the SCM row file, and DRAM overhead per row.

reads:    RowFile.read of 4096 random rows (what a DRAM miss costs) against a numpy.memmap
          fancy-index gather of the same records and an os.preadv loop, page cache warm.
overhead: DRAM bytes spent per cached row beyond the row itself (slot metadata + policy) and
          index bytes per table row, from Store.stats(), for each policy.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch

import tierstore as ts
from tierstore.bench.common import median_seconds
from tierstore.tiers.rowfile import HEADER, RowFile


def bench_reads(num_rows: int = 1_000_000, dim: int = 64, batch: int = 4096,
                repeats: int = 50) -> dict[str, Any]:
    spec = ts.TableSpec("scm", num_rows, dim, optimizer=ts.RowWiseAdagrad())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
        rf = RowFile(os.path.join(d, "scm.rows"), spec)
        chunk = 65536
        for start in range(0, num_rows, chunk):  # every record written (no generated rows)
            rows = np.arange(start, min(start + chunk, num_rows))
            rf.write(rows, rng.standard_normal((len(rows), dim), dtype=np.float32),
                     np.zeros((len(rows), 1), np.float32))
        rf.flush()
        rec = spec.layout.record_bytes
        mm = np.memmap(rf.path, dtype=np.uint8, mode="r", offset=HEADER, shape=(num_rows, rec))
        fd = os.open(rf.path, os.O_RDONLY)
        batches = [np.sort(rng.integers(0, num_rows, batch)) for _ in range(8)]
        it = iter(range(1 << 62))

        def pick() -> np.ndarray:
            return batches[next(it) % len(batches)]
        for b in batches:  # warm the page cache for every row we will read
            rf.read(b)
        t_rowfile = median_seconds(lambda: rf.read(pick()), repeats=repeats)
        t_memmap = median_seconds(lambda: np.asarray(mm[pick()]), repeats=repeats)

        def pread_loop() -> None:
            buf = bytearray(rec * batch)
            view = memoryview(buf)
            for i, r in enumerate(pick()):
                os.preadv(fd, [view[i * rec:(i + 1) * rec]], HEADER + int(r) * rec)
        t_pread = median_seconds(pread_loop, repeats=max(5, repeats // 5))
        got = rf.read(batches[0])[0]
        ref = np.asarray(mm[batches[0]])[:, : dim * 4].copy().view(np.float32)
        assert np.array_equal(got, ref), "RowFile.read disagrees with the file"
        os.close(fd)
        del mm
        rf.close()
    return {"rows": num_rows, "dim": dim, "batch": batch,
            "rowfile_s": t_rowfile, "memmap_s": t_memmap, "pread_loop_s": t_pread,
            "rowfile_rows_per_s": batch / t_rowfile, "memmap_rows_per_s": batch / t_memmap,
            "pread_rows_per_s": batch / t_pread, "ratio_vs_memmap": t_memmap / t_rowfile}


def bench_overhead(num_rows: int = 2_000_000, dim: int = 64, fraction: float = 0.1,
                   policies: tuple[str, ...] = ("lru", "lfu", "adaptive")) -> dict[str, Any]:
    out = {}
    spec = ts.TableSpec("o", num_rows, dim)
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
            ddr = int(num_rows * fraction) * ts.Store.cached_row_bytes(spec)
            with ts.Store(d, ddr_bytes=ddr, policy=policy) as store:
                store.create_table(spec)
                rng = np.random.default_rng(0)
                for _ in range(20):
                    store.lookup("o", torch.from_numpy(rng.integers(0, num_rows, 4096)))
                st = store.stats()["tables"]["o"]
        out[policy] = {"overhead_bytes_per_cached_row": st["overhead_bytes_per_cached_row"],
                       "index_bytes_per_table_row": st["index_bytes_per_table_row"],
                       "capacity_rows": st["capacity_rows"], "detail": st["bytes"]["dram_detail"]}
    return out
