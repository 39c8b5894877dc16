"""Synthetic lookup workloads in the FBGEMM input format (indices + offsets per table)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tierstore.cache.traces import draw_zipf, zipf_cdf


@dataclass
class Batch:
    """One batch for T tables: per table flat indices and B+1 offsets (fixed pooling)."""

    indices: list[torch.Tensor]
    offsets: list[torch.Tensor]  # B + 1 boundaries (include_last_offset convention)
    torch_offsets: list[torch.Tensor]  # B starts (nn.EmbeddingBag convention)


def make_batches(num_tables: int, num_rows: int, batch_size: int, pooling: int, dist: str,
                 n_batches: int, seed: int = 0) -> list[Batch]:
    """dist: "uniform" or "zipf:ALPHA"."""
    rng = np.random.default_rng(seed)
    n = batch_size * pooling
    off1 = torch.arange(0, n + 1, pooling, dtype=torch.int64)
    draw = id_sampler(dist, num_rows, num_tables, rng)
    out = []
    for _ in range(n_batches):
        idx = [torch.from_numpy(draw(t, n)) for t in range(num_tables)]
        out.append(Batch(idx, [off1] * num_tables, [off1[:-1]] * num_tables))
    return out


def id_sampler(dist: str, num_rows: int, num_tables: int,
               rng: np.random.Generator) -> Callable[[int, int], np.ndarray]:
    """draw(table, size) -> int64 ids. "zipf:A": each table has its own fixed popularity order
    (a random permutation of its rows), the same for every batch."""
    if dist == "uniform":
        return lambda t, size: rng.integers(0, num_rows, size)
    if dist.startswith("zipf:"):
        cdf = zipf_cdf(float(dist[5:]), num_rows)
        perms = [rng.permutation(num_rows) for _ in range(num_tables)]
        return lambda t, size: draw_zipf(rng, cdf, perms[t], size)
    raise ValueError(f"unknown distribution {dist!r}; valid: uniform, zipf:ALPHA")
