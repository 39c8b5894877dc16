"""Logistic regression on DLRM's inputs: a weight per dense feature and one per (sparse
feature, id) (a dimension-1 embedding table), the quality baseline DLRM must beat."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class LogReg(nn.Module):
    """logit = b + w·dense + sum over features of the feature's id weight. ``embeddings``:
    a module ``(keys, values, lengths) -> [B, F, 1]`` (see tierstore.models.embeddings)."""

    def __init__(self, embeddings: nn.Module, num_dense: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.linear = nn.Linear(num_dense, 1)

    def dense_parameters(self) -> list[nn.Parameter]:
        return list(self.linear.parameters())

    def forward(self, dense: torch.Tensor, keys: Sequence[str], values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        return self.linear(dense).squeeze(1) + self.embeddings(keys, values, lengths).sum((1, 2))
