"""DLRM (Naumov et al., 2019): bottom MLP on dense features, one pooled embedding per sparse
feature, pairwise dot interaction, top MLP, one logit per sample.

The embedding part is a module passed in (``StoreEmbeddings`` over tierstore or
``TorchEmbeddings``, see :mod:`tierstore.models.embeddings`); the dense part is ordinary
parameters, trained by any dense optimizer (Distributed Shampoo, Adagrad, Adam).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def mlp(sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ReLU after each (and after the last
    one only if ``last_activation``)."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """dense [B, num_dense] + sparse batch -> logits [B].

    embeddings: a module ``(keys, values, lengths) -> [B, F, D]``; ``bottom`` must end at D.
    The interaction takes the dot products of every pair among the F embeddings and the bottom
    output (F + 1 vectors: (F + 1) F / 2 values) and concatenates the bottom output.
    """

    def __init__(self, embeddings: nn.Module, num_dense: int, num_sparse: int, dim: int,
                 bottom: Sequence[int] = (64, 32), top: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom, dim], last_activation=True)
        n = num_sparse + 1
        self.register_buffer("_li", torch.tril_indices(n, n, offset=-1)[0], persistent=False)
        self.register_buffer("_lj", torch.tril_indices(n, n, offset=-1)[1], persistent=False)
        self.top = mlp([dim + n * (n - 1) // 2, *top, 1], last_activation=False)

    def dense_parameters(self) -> list[nn.Parameter]:
        """The parameters a dense optimizer trains (the embeddings train themselves)."""
        return [*self.bottom.parameters(), *self.top.parameters()]

    def forward(self, dense: torch.Tensor, keys: Sequence[str], values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        x = self.bottom(dense)                                  # [B, D]
        e = self.embeddings(keys, values, lengths)              # [B, F, D]
        t = torch.cat([x.unsqueeze(1), e], dim=1)               # [B, F + 1, D]
        z = torch.bmm(t, t.transpose(1, 2))                     # [B, F + 1, F + 1]
        pairs = z[:, self._li, self._lj]                        # [B, (F + 1) F / 2]
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(1)
