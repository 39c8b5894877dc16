"""The fused numba write path against the plain torch path, same store, same batches.

    OMP_NUM_THREADS=1 python benchmarks/bench_kernels.py [--json]

Prints median ms per training step (pooled lookup + backward + row-wise Adagrad) of one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

import tierstore as ts
from tierstore.bench.common import median_seconds
from tierstore.bench.workload import make_batches


def step_time(rows: int, dim: int, pooling: int, fused: bool, repeats: int = 15) -> float:
    batches = make_batches(1, rows, 4096, pooling, "uniform", 4, seed=1)
    grad = torch.randn(4096, dim)
    with tempfile.TemporaryDirectory() as d, ts.Store(d, ddr_bytes=2 * rows * (dim * 4 + 32)) as s:
        s.create_table(ts.TableSpec("t", rows, dim, optimizer=ts.RowWiseAdagrad(lr=0.01)))
        s._entry("t").cache.fused = fused
        it = iter(range(1 << 62))

        def step() -> None:
            b = batches[next(it) % len(batches)]
            s.pooled("t", b.indices[0], b.offsets[0], include_last_offset=True)
            s.apply_pooled_gradients("t", b.indices[0], b.offsets[0], grad,
                                     include_last_offset=True)
        for _ in range(len(batches)):
            step()
        return median_seconds(step, repeats=repeats, warmup=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = []
    for rows, dim, pooling in [(100_000, 64, 1), (100_000, 64, 20), (1_000_000, 128, 20)]:
        f, t = step_time(rows, dim, pooling, True), step_time(rows, dim, pooling, False)
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
