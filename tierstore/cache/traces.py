"""Access traces for cache evaluation: trace files and synthetic i.i.d. Zipf traces.

A trace is an int64 numpy array of row ids in access order. Sources:

- a text file with one non-negative decimal id per line (:func:`load_trace`);
- ``zipf:alpha=A,n=N,len=L,seed=S`` (:func:`parse_zipf_spec`, :func:`zipf`).

:func:`trace_from_spec` accepts either form.
"""

from __future__ import annotations

import os

import numpy as np

ZIPF_PREFIX = "zipf:"
_ZIPF_KEYS = {"alpha": float, "n": int, "len": int, "seed": int}


def load_trace(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one decimal row id per line (blank lines ignored) into an int64 array."""
    with open(path, "rb") as f:
        tokens = f.read().split()
    try:
        ids = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{path}: expected one integer row id per line ({exc})") from None
    if len(ids) and ids.min() < 0:
        raise ValueError(f"{path}: negative row id {int(ids.min())}")
    return ids


def zipf(alpha: float, n: int, length: int, seed: int) -> np.ndarray:
    """``length`` i.i.d. draws over ids ``0..n-1`` where the k-th most popular id has
    probability proportional to ``k ** -alpha``; which id holds rank k is a random permutation.

    Deterministic in ``seed`` (numpy's default generator: the permutation is drawn first, then
    the uniforms that pick ranks by inverting the CDF).
    """
    if alpha <= 0 or n <= 0 or length < 0:
        raise ValueError(f"zipf needs alpha > 0, n > 0, len >= 0; got {alpha}, {n}, {length}")
    rng = np.random.default_rng(seed)
    ids_by_rank = rng.permutation(n).astype(np.int64)
    return draw_zipf(rng, zipf_cdf(alpha, n), ids_by_rank, length)


def zipf_cdf(alpha: float, n: int) -> np.ndarray:
    """Cumulative probabilities of ranks 1..n under p(k) ~ k ** -alpha (float64[n])."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -alpha)
    return cdf / cdf[-1]


def draw_zipf(rng: np.random.Generator, cdf: np.ndarray, ids_by_rank: np.ndarray,
              size: int) -> np.ndarray:
    """``size`` i.i.d. ids: a rank drawn from ``cdf``, mapped through ``ids_by_rank``."""
    ranks = np.searchsorted(cdf, rng.random(size), side="right")
    return ids_by_rank[np.minimum(ranks, len(cdf) - 1)]


def parse_zipf_spec(spec: str) -> dict[str, float | int]:
    """``"zipf:alpha=1.05,n=200000,len=400000,seed=1"`` -> ``{"alpha": 1.05, "n": ..., ...}``."""
    if not spec.startswith(ZIPF_PREFIX):
        raise ValueError(f"not a zipf spec: {spec!r}")
    params: dict[str, float | int] = {}
    for item in spec[len(ZIPF_PREFIX) :].split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _ZIPF_KEYS:
            raise ValueError(f"bad zipf parameter {item!r}; expected alpha=, n=, len=, seed=")
        try:
            params[key] = _ZIPF_KEYS[key](value.strip())
        except ValueError:
            raise ValueError(f"bad value in zipf parameter {item!r}") from None
    missing = sorted(set(_ZIPF_KEYS) - set(params))
    if missing:
        raise ValueError(f"zipf spec {spec!r} lacks {', '.join(missing)}")
    return params


def trace_from_spec(spec: str | os.PathLike[str]) -> np.ndarray:
    """A trace from a ``zipf:...`` spec or from a file path."""
    if isinstance(spec, str) and spec.startswith(ZIPF_PREFIX):
        p = parse_zipf_spec(spec)
        return zipf(p["alpha"], p["n"], p["len"], p["seed"])
    return load_trace(spec)
