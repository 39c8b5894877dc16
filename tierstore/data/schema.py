"""The Criteo schema every tierstore dataset follows, the categorical hash and the dense transform.

A sample is a click label, 13 dense (integer count) features and 26 categorical features.

* Dense: ``log(1 + max(x, 0))`` as float32; a missing value is 0 (so it stays 0). Negative
  counts (Criteo's ``int_1`` has some -1, -2, -3) are clamped to 0 before the log.
* Categorical: the hex string's value ``v`` of feature ``f`` becomes the 63-bit id
  ``splitmix64(splitmix64(v) ^ splitmix64(f + 1)) & (2**63 - 1)``, with 0 replaced by 1;
  a missing value is :data:`MISSING_ID` (0). Equal strings in different features get different
  ids, and the ids are non-negative int64 (``id % rows`` picks a row of a dense table; a sparse
  ``id_space`` takes them as they are). This is hash version :data:`HASH_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_KEYS: tuple[str, ...] = tuple(f"int_{i}" for i in range(NUM_DENSE))
SPARSE_KEYS: tuple[str, ...] = tuple(f"cat_{i}" for i in range(NUM_SPARSE))  # TorchRec's names
MISSING_ID = 0
HASH_VERSION = "splitmix64-v1"

_M64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LOW63 = np.uint64((1 << 63) - 1)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of ``x + golden`` (uint64 in, uint64 out, wrapping)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> _S30)) * _C1
    z = (z ^ (z >> _S27)) * _C2
    return z ^ (z >> _S31)


def splitmix64_int(x: int) -> int:
    """:func:`splitmix64` of one Python int (for seeds and salts)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


_FEATURE_SALT = np.array([splitmix64_int(f + 1) for f in range(NUM_SPARSE)], dtype=np.uint64)


def hash_categorical(values: np.ndarray, feature: int | np.ndarray) -> np.ndarray:
    """63-bit ids (int64) of categorical values (uint64) of ``feature`` (an int, or an array
    broadcasting against ``values``); see the module docstring. Missing values are the caller's
    business (they become :data:`MISSING_ID`)."""
    salt = _FEATURE_SALT[feature]
    h = splitmix64(splitmix64(values) ^ salt) & _LOW63
    h[h == 0] = 1
    return h.view(np.int64) if h.dtype == np.uint64 else h.astype(np.int64)


def hash_hex(text: str, feature: int) -> int:
    """The id of one hex string of ``feature`` ('' -> MISSING_ID); the reference the reader's
    vectorized parse must agree with."""
    if text == "":
        return MISSING_ID
    return int(hash_categorical(np.array([int(text, 16)], dtype=np.uint64), feature)[0])


def dense_transform(x: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)) as float32 (missing values must already be 0)."""
    return np.log1p(np.maximum(np.asarray(x, dtype=np.float64), 0.0)).astype(np.float32)


@dataclass
class Chunk:
    """Consecutive samples as columns: ``labels`` float32 [n], ``dense`` float32 [n, 13] and
    ``sparse``: one int64 array per feature holding ``n * pooling[f]`` ids (sample-major: the
    ids of sample 0, then sample 1, ...)."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_matrix(cls, labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> Chunk:
        """From a one-id-per-feature matrix ``sparse`` [n, 26] (columns are views)."""
        return cls(labels, dense, [sparse[:, f] for f in range(sparse.shape[1])])
