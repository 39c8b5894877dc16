"""Sparse row optimizers: hyper-parameters, state size, and the reference (torch) update.

The optimizer runs where the rows live: its state sits beside each row in every tier (DRAM slot,
SCM record, checkpoint). Gradients of duplicate ids in one batch are summed before the update
(FBGEMM's semantics), so a row is updated once per batch. The fast path for float32 tables is a
fused numba kernel (:mod:`tierstore.optim.kernels`); :meth:`SparseOptimizer.update` is the plain
torch version used for float16 tables and rows updated directly on SCM, and is the reference the
kernels are tested against.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class SparseOptimizer(ABC):
    """Base class. Subclasses define ``kind``, ``state_dim`` and ``update``."""

    kind: ClassVar[str] = "base"

    @abstractmethod
    def state_dim(self, dim: int) -> int:
        """float32 values of optimizer state stored per row of width ``dim``."""

    @abstractmethod
    def update(self, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
        """Update rows in place. w: [u, dim] f32, s: [u, state_dim] f32, g: [u, dim] f32 (summed
        per distinct row)."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    def _check(self) -> None:
        for k, v in asdict(self).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{type(self).__name__}: {k} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class SGD(SparseOptimizer):
    """w -= lr * g. No state."""

    lr: float = 0.01
    kind: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        self._check()

    def state_dim(self, dim: int) -> int:
        return 0

    def update(self, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
        w.sub_(g, alpha=self.lr)


@dataclass(frozen=True)
class RowWiseAdagrad(SparseOptimizer):
    """One float32 of state per row (FBGEMM's EXACT_ROWWISE_ADAGRAD).

    g += weight_decay * w (L2); state += mean(g**2) over the row; w -= lr * g / (sqrt(state) + eps).
    """

    lr: float = 0.01
    eps: float = 1e-8
    weight_decay: float = 0.0
    kind: ClassVar[str] = "rowwise_adagrad"

    def __post_init__(self) -> None:
        self._check()

    def state_dim(self, dim: int) -> int:
        return 1

    def update(self, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * w
        s.add_(g.square().mean(dim=1, keepdim=True))
        w.sub_(self.lr * g / (s.sqrt() + self.eps))


@dataclass(frozen=True)
class Adagrad(SparseOptimizer):
    """Element-wise Adagrad: state += g**2; w -= lr * g / (sqrt(state) + eps)."""

    lr: float = 0.01
    eps: float = 1e-10
    kind: ClassVar[str] = "adagrad"

    def __post_init__(self) -> None:
        self._check()

    def state_dim(self, dim: int) -> int:
        return dim

    def update(self, w: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> None:
        s.addcmul_(g, g)
        w.sub_(self.lr * g / (s.sqrt() + self.eps))


OPTIMIZERS: dict[str, type[SparseOptimizer]] = {c.kind: c for c in (SGD, RowWiseAdagrad, Adagrad)}


def optimizer_from_dict(d: dict[str, Any]) -> SparseOptimizer:
    """Inverse of :meth:`SparseOptimizer.to_dict`."""
    d = dict(d)
    kind = d.pop("kind")
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown sparse optimizer {kind!r}; valid: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[kind](**d)
