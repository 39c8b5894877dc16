"""How DistributedShampoo cuts parameters into blocks and shares the blocks out among ranks.

A parameter is first *merged*: dimensions of size 1 are dropped, then neighbouring dimensions are
multiplied together, from the last one backwards, while the product stays within
``max_preconditioner_dim`` (so a parameter with at most that many elements becomes one vector).
The merged tensor is then *blocked*: every dimension is cut into chunks of at most
``max_preconditioner_dim``, and the blocks are numbered in row-major order of the chunk grid.
Each block gets one Kronecker factor per dimension.

Example, ``max_preconditioner_dim=16``: a conv weight ``(8, 3, 3, 3)`` merges to ``(8, 3, 9)``
(one block); a ``(5, 288)`` weight stays ``(5, 288)`` and is cut into 18 blocks of ``(5, 16)``.

In data-parallel mode every block has one owner rank, chosen by :func:`assign_owners`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

# A symmetric eigendecomposition of a d x d matrix plus rebuilding the inverse root costs on the
# order of 10 d^3 floating-point operations; only used to weigh blocks against each other.
_EIGH_FLOPS_PER_CUBE = 10.0


def merge_dims(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Merged shape of a tensor of ``shape`` (see the module docstring).

    >>> merge_dims((8, 3, 3, 3), 16)
    (8, 3, 9)
    >>> merge_dims((64, 20), 1024)
    (64, 20)
    >>> merge_dims((1, 256), 1024)
    (256,)
    """
    dims = [d for d in shape if d != 1] or [1]
    merged = [dims[-1]]
    for d in reversed(dims[:-1]):
        if merged[-1] * d <= max_dim:
            merged[-1] *= d
        else:
            merged.append(d)
    return tuple(reversed(merged))


@dataclass(frozen=True)
class Block:
    """One block of one parameter.

    ``param_index`` counts parameters over all param groups in order; ``index`` numbers the
    blocks of that parameter row-major; ``offsets`` and ``shape`` locate the block inside the
    parameter's merged shape; ``uid`` numbers blocks over the whole optimizer.
    """

    uid: int
    param_index: int
    index: int
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        """Name of the block's state inside its parameter's state (``"block_<index>"``)."""
        return f"block_{self.index}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def view(self, merged: torch.Tensor) -> torch.Tensor:
        """The block as a view of ``merged`` (a tensor of the parameter's merged shape)."""
        out = merged
        for dim, (start, size) in enumerate(zip(self.offsets, self.shape)):
            if size != merged.shape[dim]:
                out = out.narrow(dim, start, size)
        return out

    def cost(self, precondition_frequency: int) -> float:
        """Estimated floating-point operations per step spent on this block.

        Per step every factor is updated and the direction is multiplied by every inverse root
        (about ``4 * numel * sum(shape)``); every ``precondition_frequency`` steps each factor
        gets an eigendecomposition (about ``10 * d**3``).
        """
        per_step = 4.0 * self.numel * sum(self.shape)
        eigh = _EIGH_FLOPS_PER_CUBE * sum(d**3 for d in self.shape)
        return per_step + eigh / precondition_frequency


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is merged and blocked."""

    param_index: int
    param_shape: tuple[int, ...]
    merged_shape: tuple[int, ...]
    blocks: tuple[Block, ...]


def layout_param(
    param_index: int, shape: Sequence[int], max_dim: int, first_uid: int
) -> ParamLayout:
    """Merge and block a parameter of ``shape``; block uids start at ``first_uid``."""
    merged = merge_dims(shape, max_dim)
    chunks_per_dim = [
        [(start, min(max_dim, d - start)) for start in range(0, d, max_dim)] for d in merged
    ]
    blocks = []
    for index, chunks in enumerate(itertools.product(*chunks_per_dim)):
        blocks.append(
            Block(
                uid=first_uid + index,
                param_index=param_index,
                index=index,
                offsets=tuple(start for start, _ in chunks),
                shape=tuple(size for _, size in chunks),
            )
        )
    return ParamLayout(param_index, tuple(shape), merged, tuple(blocks))


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Owner rank of each block: greedy cost balance.

    Blocks are taken from the most to the least expensive (ties: lower index first) and each goes
    to the rank with the least total cost so far (ties: lower rank). Deterministic, so every rank
    computes the same assignment.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners
