"""Shared helpers of the benchmarks: timing with medians, environment description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 2,
                   min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (at least ``min_time`` in total)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[int], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each ``fn(i)`` (i: step number), one call of each per round, the
    order rotating every round."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for k in range(len(names)):
            n = names[(r + k) % len(names)]
            t = time.perf_counter()
            fns[n](r)
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def environment() -> dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def fbgemm_available() -> bool:
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # noqa: F401
            SplitTableBatchedEmbeddingBagsCodegen)
    except Exception:  # any import failure means "not usable here"
        return False
    return True
