"""Validation of user inputs to store operations. Each check raises InvalidInput naming the
argument and the table, before anything is changed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tierstore.config import TableSpec
from tierstore.errors import InvalidInput
from tierstore.optim import kernels


def _as_tensor(x: Any, what: str, table: str) -> torch.Tensor:
    if type(x) is torch.Tensor:
        t = x if not x.requires_grad else x.detach()
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidInput(f"table {table!r}: {what} must be a tensor or array ({e})") from None
    if t.device.type != "cpu":
        t = t.cpu()
    return t


def ids(x: Any, spec: TableSpec, what: str = "ids", check_range: bool = True) -> torch.Tensor:
    """1-D integer ids -> contiguous int64 CPU tensor, checked against the table's id space.

    check_range=False leaves the range check to the caller (the DRAM tier's gather kernel
    checks bounds in the same pass; then call :func:`id_range` to raise the precise error).
    """
    t = _as_tensor(x, what, spec.name)
    dt = t.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise InvalidInput(f"table {spec.name!r}: {what} must be integers, got {dt}")
    if t.dim() != 1:
        raise InvalidInput(f"table {spec.name!r}: {what} must be 1-D, got shape {tuple(t.shape)}")
    if dt != torch.int64:
        t = t.to(torch.int64)
    if not t.is_contiguous():
        t = t.contiguous()
    if check_range:
        id_range(t, spec, what)
    return t


def id_range(t: torch.Tensor, spec: TableSpec, what: str = "ids") -> None:
    """Raise InvalidInput unless every id is >= 0 (and < num_rows for dense tables)."""
    if t.numel():
        lo, hi = torch.aminmax(t)
        lo, hi = int(lo), int(hi)
        if lo < 0:
            raise InvalidInput(f"table {spec.name!r}: {what} must be >= 0, got {lo}")
        if spec.id_space == "dense" and hi >= spec.num_rows:
            raise InvalidInput(f"table {spec.name!r}: {what} must be < num_rows={spec.num_rows}, "
                               f"got {hi}")


def offsets(x: Any, n_indices: int, include_last_offset: bool, spec: TableSpec) -> torch.Tensor:
    """Bag offsets -> int64 tensor [B + 1] of bag boundaries ending at n_indices.

    include_last_offset=False: torch's convention, B starts (the last bag ends at n_indices).
    include_last_offset=True: FBGEMM's convention, B + 1 boundaries ending at n_indices.
    """
    t = _as_tensor(x, "offsets", spec.name)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise InvalidInput(f"table {spec.name!r}: offsets must be a 1-D integer tensor, "
                           f"got {t.dtype} of shape {tuple(t.shape)}")
    if t.dtype != torch.int64:
        t = t.to(torch.int64)
    o = (t if t.is_contiguous() else t.contiguous()).numpy()
    if o.shape[0] == 0:
        raise InvalidInput(f"table {spec.name!r}: offsets must not be empty")
    if not include_last_offset:
        if o[-1] > n_indices:
            raise InvalidInput(f"table {spec.name!r}: offset {int(o[-1])} is past the end of "
                               f"indices ({n_indices})")
        o = np.append(o, n_indices)
    status = kernels.offsets_status(o, n_indices)
    if status == 1:
        raise InvalidInput(f"table {spec.name!r}: offsets must start at 0, got {int(o[0])}")
    if status == 2:
        raise InvalidInput(f"table {spec.name!r}: offsets must be non-decreasing")
    if status == 3:
        raise InvalidInput(f"table {spec.name!r}: last offset {int(o[-1])} must equal the "
                           f"number of indices {n_indices} (include_last_offset=True)")
    return torch.from_numpy(o)


def per_sample_weights(x: Any, n_indices: int, mode: str, spec: TableSpec) -> torch.Tensor | None:
    if x is None:
        return None
    if mode != "sum":
        raise InvalidInput(f"table {spec.name!r}: per_sample_weights need mode='sum', got {mode!r}")
    t = _as_tensor(x, "per_sample_weights", spec.name)
    if not t.dtype.is_floating_point or t.shape != (n_indices,):
        raise InvalidInput(f"table {spec.name!r}: per_sample_weights must be floating point of "
                           f"shape ({n_indices},), got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.float32)


def mode(m: str, spec: TableSpec) -> str:
    if m not in ("sum", "mean"):
        raise InvalidInput(f"table {spec.name!r}: mode must be 'sum' or 'mean', got {m!r}")
    return m


def grads(x: Any, n: int, spec: TableSpec, what: str = "grads") -> torch.Tensor:
    """Gradients [n, dim], floating point, finite -> float32 tensor."""
    t = _as_tensor(x, what, spec.name)
    if not t.dtype.is_floating_point:
        raise InvalidInput(f"table {spec.name!r}: {what} must be floating point, got {t.dtype}")
    if tuple(t.shape) != (n, spec.dim):
        raise InvalidInput(f"table {spec.name!r}: {what} must have shape ({n}, {spec.dim}), "
                           f"got {tuple(t.shape)}")
    t = t.to(torch.float32)
    finite(t, spec, what)
    return t


def finite(t: torch.Tensor, spec: TableSpec, what: str) -> None:
    """Raise InvalidInput if the float tensor ``t`` holds NaN or infinity."""
    if t.numel() and not all(map(math.isfinite, map(float, torch.aminmax(t)))):  # NaN propagates
        raise InvalidInput(f"table {spec.name!r}: {what} contain NaN or infinity")
