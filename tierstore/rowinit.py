"""Deterministic initial values of rows never written, from (seed, row id) alone.

A counter-based generator (splitmix64 of seed, row and column) means row r of a table always
starts with the same values, whichever tier or process first reads it and in whatever order, so
a 1-billion-row table costs nothing until its rows are used.

uniform: U(-1/sqrt(dim), 1/sqrt(dim)) (nn.EmbeddingBag-like scale, FBGEMM's default);
normal:  N(0, 1/dim) by Box-Muller; zeros: 0.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def _uniform01(seed: int, rows: np.ndarray, dim: int, stream: int) -> np.ndarray:
    """float64 in (0, 1), shape [len(rows), dim]: exact multiples of 2**-53, never 0."""
    base = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + np.uint64(stream))
    r = _mix(rows.astype(np.uint64) ^ base)
    cols = np.arange(dim, dtype=np.uint64) * _GOLDEN
    bits = _mix(r[:, None] + cols[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def initial_rows(init: str, seed: int, rows: np.ndarray, dim: int, dtype: np.dtype) -> np.ndarray:
    """Initial weights of ``rows`` (int64 ids), shape [len(rows), dim], of ``dtype``."""
    n = len(rows)
    if init == "zeros" or n == 0:
        return np.zeros((n, dim), dtype=dtype)
    if init == "uniform":
        bound = 1.0 / np.sqrt(dim)
        u = _uniform01(seed, rows, dim, 0)
        return ((2.0 * u - 1.0) * bound).astype(dtype)
    if init == "normal":
        u1 = _uniform01(seed, rows, dim, 1)
        u2 = _uniform01(seed, rows, dim, 2)
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        return (z / np.sqrt(dim)).astype(dtype)
    raise ValueError(f"unknown init {init!r}; valid: uniform, normal, zeros")
