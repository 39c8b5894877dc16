"""Synthetic lookup workloads in the FBGEMM input format (indices + offsets per table)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def zipf_ids(rng: np.random.Generator, num_rows: int, alpha: float, size: int) -> np.ndarray:
    """i.i.d. ids where the row of rank r (a random permutation of rows) has p ~ r**-alpha."""
    ranks = np.arange(1, num_rows + 1, dtype=np.float64)
    cdf = np.cumsum(ranks ** -alpha)
    cdf /= cdf[-1]
    perm = rng.permutation(num_rows)
    return perm[np.searchsorted(cdf, rng.random(size))]


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
    out = []
    for _ in range(n_batches):
        idx = []
        for _t in range(num_tables):
            if dist == "uniform":
                ids = rng.integers(0, num_rows, n)
            elif dist.startswith("zipf:"):
                ids = zipf_ids(rng, num_rows, float(dist[5:]), n)
            else:
                raise ValueError(f"unknown distribution {dist!r}; valid: uniform, zipf:ALPHA")
            idx.append(torch.from_numpy(ids.astype(np.int64)))
        out.append(Batch(idx, [off1] * num_tables, [off1[:-1]] * num_tables))
    return out
