"""The embedding backends of the models: one pooled vector per sparse feature.

Both take the KeyedJaggedTensor convention (``keys``, flat ``values``, ``lengths`` key-major:
all samples of ``keys[0]`` first) and return float32 ``[B, F, D]`` in the order of ``features``.

- :class:`StoreEmbeddings`: the rows live in tierstore (an embedded :class:`tierstore.Store`
  or a ``tierstored`` connection); backward applies each table's sparse optimizer where the
  rows live, so :meth:`step` has nothing to do.
- :class:`TorchEmbeddings`: the in-memory baseline, ``nn.EmbeddingBag(sparse=True)`` per table,
  initialised with exactly the rows tierstore generates (same spec, same seed), updated in
  :meth:`step` by the same optimizer (``torch.optim.Adagrad`` for element-wise Adagrad; the
  reference update of :mod:`tierstore.optim.sparse` for SGD and row-wise Adagrad, which torch
  lacks).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tierstore.client.modules import TierEmbeddingBagCollection
from tierstore.config import TableSpec
from tierstore.optim.sparse import Adagrad
from tierstore.rowinit import initial_rows


def _stack(pooled: Mapping[str, torch.Tensor], features: Sequence[str]) -> torch.Tensor:
    return torch.stack([pooled[f] for f in features], dim=1)


class StoreEmbeddings(nn.Module):
    """Pooled embeddings from tierstore tables. ``tables``: feature -> table name."""

    def __init__(self, conn: Any, tables: Mapping[str, str], mode: str = "sum") -> None:
        super().__init__()
        self.features = list(tables)
        self.ebc = TierEmbeddingBagCollection(conn, dict(tables), mode=mode)

    def forward(self, keys: Sequence[str], values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """[B, F, D] float32 (F = len(self.features))."""
        return _stack(self.ebc(list(keys), values, lengths), self.features).float()

    def step(self) -> None:
        """Nothing: backward already applied the tables' optimizers."""


class TorchEmbeddings(nn.Module):
    """nn.EmbeddingBag per table, the baseline. ``specs``: table name -> TableSpec (the same
    specs the store uses, so initial rows and optimizers match); ``tables``: feature -> table.
    Holds every row in memory: meant for tables that fit."""

    def __init__(self, specs: Mapping[str, TableSpec], tables: Mapping[str, str],
                 mode: str = "sum") -> None:
        super().__init__()
        self.features = list(tables)
        self.tables = dict(tables)
        self.specs = dict(specs)
        self.mode = mode
        self.bags = nn.ModuleDict()
        self._state: dict[str, torch.Tensor] = {}
        for name, spec in self.specs.items():
            bag = nn.EmbeddingBag(spec.num_rows, spec.dim, mode=mode, sparse=True)
            rows = np.arange(spec.num_rows, dtype=np.int64)
            init = initial_rows(spec.init, spec.seed, rows, spec.dim, spec.layout.np_dtype)
            with torch.no_grad():
                bag.weight.copy_(torch.from_numpy(init.astype(np.float32)))
            self.bags[name] = bag
            self._state[name] = torch.zeros(spec.num_rows, spec.layout.state_dim)
        adagrad = {n: s.optimizer for n, s in self.specs.items()
                   if isinstance(s.optimizer, Adagrad)}
        self._torch_opts = {n: torch.optim.Adagrad([self.bags[n].weight], lr=o.lr, eps=o.eps)
                            for n, o in adagrad.items()}

    def forward(self, keys: Sequence[str], values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """[B, F, D] float32."""
        keys = list(keys)
        B = len(lengths) // len(keys)
        per_key = lengths.view(len(keys), B)
        starts = torch.cumsum(per_key.sum(1), 0) - per_key.sum(1)
        out = {}
        for k, key in enumerate(keys):
            n = int(per_key[k].sum())
            vals = values[int(starts[k]): int(starts[k]) + n]
            offsets = torch.cumsum(per_key[k], 0) - per_key[k]
            out[key] = self.bags[self.tables[key]](vals, offsets)
        return _stack(out, self.features)

    @torch.no_grad()
    def step(self) -> None:
        """Apply each table's optimizer to the rows the last backward touched."""
        for name, bag in self.bags.items():
            g = bag.weight.grad
            if g is None:
                continue
            if name in self._torch_opts:
                self._torch_opts[name].step()
            else:
                g = g.coalesce()
                rows, vals = g.indices()[0], g.values()
                if len(rows):
                    w = bag.weight.data[rows]
                    s = self._state[name][rows]
                    self.specs[name].optimizer.update(w, s, vals)
                    bag.weight.data[rows] = w
                    self._state[name][rows] = s
            bag.weight.grad = None
