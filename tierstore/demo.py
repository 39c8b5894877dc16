"""`tierstore demo` (what `make run` shows): the engine end to end on synthetic traffic.

Three tables, most rows on SCM, training-like steps (pooled lookup, backward fused with row-wise
Adagrad) under each cache policy; then a flush, a reopen, and a check that every row came back.
Traffic mixes a skewed global popularity (Zipf 1.05) with a drifting "recent" window, like real
embedding traces (frequency and recency both matter).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import tierstore as ts
from tierstore.cache.traces import draw_zipf, zipf_cdf

TABLES = [  # name, rows, dim
    ("user", 2_000_000, 64),
    ("item", 500_000, 64),
    ("country", 250, 16),
]
BATCH, POOLING = 1024, 8


def traffic(rng: np.random.Generator, rows: int, step: int, n: int) -> np.ndarray:
    """70% Zipf-popular ids (a fixed popularity order per table), 30% from a window of rows
    that moves every 20 steps."""
    k = int(0.7 * n)
    hot = draw_zipf(rng, *_popularity(rows), k)
    start = (step // 20) * 997 % rows
    recent = (start + rng.integers(0, min(rows, 20_000), n - k)) % rows
    ids = np.concatenate([hot, recent])
    rng.shuffle(ids)
    return ids


_POPULARITY: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _popularity(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(Zipf 1.05 rank CDF, rows from most to least popular) of a table, fixed for the run."""
    if rows not in _POPULARITY:
        _POPULARITY[rows] = (zipf_cdf(1.05, rows), np.random.default_rng(rows).permutation(rows))
    return _POPULARITY[rows]


def train_steps(store: ts.Store, steps: int, seed: int, progress: bool, label: str) -> float:
    rng = np.random.default_rng(seed)
    offsets = torch.arange(0, BATCH * POOLING + 1, POOLING)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc=f"{label:>9}", disable=not progress, unit="step"):
        for name, rows, dim in TABLES:
            ids = torch.from_numpy(traffic(rng, rows, step, BATCH * POOLING))
            out = store.pooled(name, ids, offsets, include_last_offset=True)
            grad = 2 * out / out.numel()  # d/d(out) of mean(out**2): pulls rows toward 0
            store.apply_pooled_gradients(name, ids, offsets, grad, include_last_offset=True)
    return steps / (time.perf_counter() - start)


def run(steps: int = 300, progress: bool = True, dram_fraction: float = 0.05) -> dict[str, Any]:
    """Run the demo; prints a summary and returns it as a dict."""
    specs = [ts.TableSpec(n, r, d, optimizer=ts.RowWiseAdagrad(lr=0.05), seed=i)
             for i, (n, r, d) in enumerate(TABLES)]
    ddr = int(sum(s.num_rows * ts.Store.cached_row_bytes(s) for s in specs) * dram_fraction)
    summary: dict[str, Any] = {"ddr_bytes": ddr, "steps": steps, "policies": {}}
    print(f"tierstore demo: {len(specs)} tables, {sum(s.num_rows for s in specs):,} rows, DRAM "
          f"budget {ddr / 2**20:.1f} MiB ({dram_fraction:.0%} of the rows); batch {BATCH} x "
          f"pooling {POOLING} per table per step")
    with tempfile.TemporaryDirectory(prefix="tierstore-demo-") as d:
        for policy in ("lru", "lfu", "adaptive"):
            path = f"{d}/{policy}"
            with ts.Store(path, ddr_bytes=ddr, policy=policy) as store:
                for s in specs:
                    store.create_table(s)
                rate = train_steps(store, steps, 0, progress, policy)
                store.flush()
                st = store.stats()
                sample = torch.from_numpy(np.random.default_rng(1).integers(0, 2_000_000, 4096))
                before = store.lookup("user", sample).clone()
            with ts.Store(path, ddr_bytes=ddr, policy=policy) as again:
                same = torch.equal(again.lookup("user", sample), before)
            summary["policies"][policy] = {
                "steps_per_s": rate,
                "hit_rate": {n: t["hit_rate"] for n, t in st["tables"].items()},
                "rows_in_dram": {n: t["rows_in_dram"] for n, t in st["tables"].items()},
                "rows_on_scm": {n: t["rows_on_scm"] for n, t in st["tables"].items()},
                "writebacks": sum(t["writebacks"] for t in st["tables"].values()),
                "reopened_equal": same,
            }
    _print(summary)
    return summary


def _print(summary: dict[str, Any]) -> None:
    names = [n for n, _, _ in TABLES]
    print("\n| policy | steps/s | " + " | ".join(f"hit rate {n}" for n in names)
          + " | write-backs | rows equal after reopen |")
    print("|---|---|" + "---|" * len(names) + "---|---|")
    for p, r in summary["policies"].items():
        print(f"| {p} | {r['steps_per_s']:.1f} | "
              + " | ".join(f"{r['hit_rate'][n]:.3f}" for n in names)
              + f" | {r['writebacks']:,} | {r['reopened_equal']} |")
