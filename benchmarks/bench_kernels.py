"""The fused numba write path against the plain torch path, same batches, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py [--json]

Prints median ms per training step (pooled lookup + backward + row-wise Adagrad) of one table.
The fused path is ``kernels.apply_rows`` (contributions radix-sorted by slab row, each row's
gradient summed in a dim-float buffer and applied at once); the torch path is
``SlabWriter._apply_resident_torch`` (sort-based dedupe, index_add, gather/scatter). The two
stores take turns step by step, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import tierstore as ts
from tierstore.bench.workload import make_batches


def step_times(rows: int, dim: int, pooling: int, repeats: int = 15) -> tuple[float, float]:
    """Median seconds per step of (fused kernel, plain torch path), measured alternately."""
    batches = make_batches(1, rows, 4096, pooling, "uniform", 4, seed=1)
    grad = torch.randn(4096, dim)
    with tempfile.TemporaryDirectory() as d:
        stores = []
        for fused in (True, False):
            s = ts.Store(f"{d}/{int(fused)}", ddr_bytes=2 * rows * (dim * 4 + 32))
            s.create_table(ts.TableSpec("t", rows, dim, optimizer=ts.RowWiseAdagrad(lr=0.01)))
            s._entry("t").cache.fused = fused
            stores.append(s)
        try:
            steps = [_stepper(s, batches, grad) for s in stores]
            for _ in range(len(batches)):  # warm: admit the rows, compile
                for step in steps:
                    step()
            times: list[list[float]] = [[], []]
            for _ in range(repeats):
                for k, step in enumerate(steps):
                    t = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t)
        finally:
            for s in stores:
                s.close()
    return statistics.median(times[0]), statistics.median(times[1])


def _stepper(s: ts.Store, batches, grad: torch.Tensor) -> Callable[[], None]:
    it = iter(range(1 << 62))

    def step() -> None:
        b = batches[next(it) % len(batches)]
        s.pooled("t", b.indices[0], b.offsets[0], include_last_offset=True)
        s.apply_pooled_gradients("t", b.indices[0], b.offsets[0], grad, include_last_offset=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = []
    for rows, dim, pooling in [(100_000, 64, 1), (100_000, 64, 20), (1_000_000, 128, 20)]:
        f, t = step_times(rows, dim, pooling)
        out.append({"rows": rows, "dim": dim, "pooling": pooling, "fused_ms": 1e3 * f,
                    "torch_ms": 1e3 * t, "speedup": t / f})
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print("| rows | dim | pooling | fused numba ms | torch ms | speedup |\n|---|---|---|---|---|---|")
        for r in out:
            print(f"| {r['rows']:,} | {r['dim']} | {r['pooling']} | {r['fused_ms']:.2f} | "
                  f"{r['torch_ms']:.2f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
