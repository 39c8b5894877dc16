"""Table specifications and the byte layout of one stored row.

A row of a table is its weights (``dim`` values of ``dtype``) plus its optimizer state
(``optimizer.state_dim(dim)`` float32 values). Every tier stores both, so a row can move between
DRAM and SCM (and into checkpoints) without losing optimizer state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tierstore.errors import InvalidSpec
from tierstore.optim.sparse import SparseOptimizer, SGD, optimizer_from_dict

DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "float32": (np.dtype(np.float32), torch.float32),
    "float16": (np.dtype(np.float16), torch.float16),
}
INITS = ("uniform", "normal", "zeros")
ID_SPACES = ("dense", "sparse")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_DIM = 65536
MAX_ROWS = 1 << 40


@dataclass(frozen=True)
class TableSpec:
    """What a table is: its shape, element type, sparse optimizer and initialisation.

    name: 1-64 characters of ``[A-Za-z0-9_.-]`` (used in file and shared-memory names).
    num_rows: number of rows for ``id_space="dense"`` (ids must be in ``[0, num_rows)``); for
        ``id_space="sparse"`` it is only a size hint (ids are any non-negative int64).
    dim: row width. dtype: "float32" or "float16" (optimizer state is always float32).
    init: rows never written are generated from (seed, row id) on first read: "uniform" draws
        U(-1/sqrt(dim), 1/sqrt(dim)), "normal" N(0, 1/dim)... see :mod:`tierstore.rowinit`.
    """

    name: str
    num_rows: int
    dim: int
    dtype: str = "float32"
    optimizer: SparseOptimizer = field(default_factory=lambda: SGD(lr=0.01))
    init: str = "uniform"
    seed: int = 0
    id_space: str = "dense"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise InvalidSpec(f"table name {self.name!r} must match {_NAME_RE.pattern}")
        if isinstance(self.num_rows, bool) or not isinstance(self.num_rows, (int, np.integer)) \
                or not 1 <= int(self.num_rows) <= MAX_ROWS:
            raise InvalidSpec(f"table {self.name!r}: num_rows must be an int in [1, 2**40], "
                              f"got {self.num_rows!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)) \
                or not 1 <= int(self.dim) <= MAX_DIM:
            raise InvalidSpec(f"table {self.name!r}: dim must be an int in [1, {MAX_DIM}], "
                              f"got {self.dim!r}")
        if self.dtype not in DTYPES:
            raise InvalidSpec(f"table {self.name!r}: dtype must be one of {list(DTYPES)}, "
                              f"got {self.dtype!r}")
        if self.init not in INITS:
            raise InvalidSpec(f"table {self.name!r}: init must be one of {list(INITS)}, "
                              f"got {self.init!r}")
        if self.id_space not in ID_SPACES:
            raise InvalidSpec(f"table {self.name!r}: id_space must be one of {list(ID_SPACES)}, "
                              f"got {self.id_space!r}")
        if not isinstance(self.optimizer, SparseOptimizer):
            raise InvalidSpec(f"table {self.name!r}: optimizer must be tierstore.SGD, "
                              f"RowWiseAdagrad or Adagrad, got {self.optimizer!r}")
        if not isinstance(self.seed, (int, np.integer)) or not 0 <= int(self.seed) < 2**63:
            raise InvalidSpec(f"table {self.name!r}: seed must be a non-negative int")

    @property
    def layout(self) -> "RowLayout":
        return RowLayout(self.dim, self.dtype, self.optimizer.state_dim(self.dim))

    def to_json(self) -> str:
        d: dict[str, Any] = {k: getattr(self, k) for k in
                             ("name", "num_rows", "dim", "dtype", "init", "seed", "id_space")}
        d["optimizer"] = self.optimizer.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "TableSpec":
        d = json.loads(text)
        d["optimizer"] = optimizer_from_dict(d["optimizer"])
        return cls(**d)


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one row record: weights, then float32 state, then a u32 'written' flag.

    The flag lets a sparse (never-written, all-zero) region of a row file read as "generate
    this row from its seed" instead of as a row of zeros.
    """

    dim: int
    dtype: str
    state_dim: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def weight_bytes(self) -> int:
        return self.dim * self.np_dtype.itemsize

    @property
    def state_offset(self) -> int:
        return (self.weight_bytes + 3) // 4 * 4

    @property
    def flag_offset(self) -> int:
        return self.state_offset + 4 * self.state_dim

    @property
    def record_bytes(self) -> int:
        """Bytes of one record in a row file (8-byte aligned)."""
        return (self.flag_offset + 4 + 7) // 8 * 8

    @property
    def payload_bytes(self) -> int:
        """Bytes of weights + state (what a DRAM slot holds)."""
        return self.weight_bytes + 4 * self.state_dim

    def pack(self, w: np.ndarray, s: np.ndarray) -> np.ndarray:
        """Records for rows (w: [n, dim] dtype, s: [n, state_dim] f32) -> uint8 [n, record_bytes]."""
        n = w.shape[0]
        rec = np.zeros((n, self.record_bytes), dtype=np.uint8)
        rec[:, : self.weight_bytes] = np.ascontiguousarray(w, dtype=self.np_dtype).view(np.uint8) \
            .reshape(n, self.weight_bytes)
        if self.state_dim:
            rec[:, self.state_offset: self.flag_offset] = \
                np.ascontiguousarray(s, dtype=np.float32).view(np.uint8).reshape(n, -1)
        rec[:, self.flag_offset: self.flag_offset + 4] = np.frombuffer(
            np.uint32(1).tobytes(), dtype=np.uint8)
        return rec

    def unpack(self, rec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [n, record_bytes] -> (w [n, dim], s [n, state_dim] f32, written bool [n])."""
        n = rec.shape[0]
        w = rec[:, : self.weight_bytes].copy().view(self.np_dtype).reshape(n, self.dim)
        s = rec[:, self.state_offset: self.flag_offset].copy().view(np.float32) \
            .reshape(n, self.state_dim)
        flag = rec[:, self.flag_offset: self.flag_offset + 4].copy().view(np.uint32)
        return w, s, flag.reshape(n) != 0
