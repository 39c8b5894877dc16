"""PyTorch modules over tierstore tables: ``TierEmbeddingBag`` (like ``nn.EmbeddingBag``) and
``TierEmbeddingBagCollection`` (like TorchRec's ``EmbeddingBagCollection``).

The rows live in the store, not in the module: the modules have no parameters. ``forward`` asks
the connection for pooled rows; ``backward`` sends the output gradient to the connection, which
applies the table's sparse optimizer to the rows where they live (FBGEMM's fused backward). No
dense or per-index gradient of the table is ever built. Consequences:

- ``loss.backward()`` *is* the optimizer step of the embedding tables, applied immediately.
  Calling backward twice over the same graph (``retain_graph=True``) applies it twice, and there
  is no accumulation of gradients over micro-batches: each backward is one step.
  ``optimizer.step()``/``zero_grad()`` of a dense optimizer do not touch the tables.
- Under ``torch.no_grad()`` or ``torch.inference_mode()`` ``forward`` is a plain lookup: nothing
  is recorded and a later backward cannot update the rows.

``conn`` is anything with the engine's methods (:class:`tierstore.Store` when embedded, the
service client's ``Connection`` otherwise)::

    pooled(table, indices, offsets, mode=, per_sample_weights=, include_last_offset=) -> [B, dim]
    apply_pooled_gradients(table, indices, offsets, grad_output, mode=, per_sample_weights=,
                           include_last_offset=)
    lookup(table, ids) -> [n, dim]       (rows for per-sample-weight gradients; the dimension
                                          when there is no spec(table) -> TableSpec)

TorchRec is optional: the collection takes a ``KeyedJaggedTensor`` duck-typed, and imports
torchrec only in :meth:`TierEmbeddingBagCollection.forward_keyed`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tierstore.errors import InvalidInput

_MODES = ("sum", "mean")


def _table_name(table: Any) -> str:
    name = getattr(table, "name", table)  # a tierstore.Table handle or a name
    if not isinstance(name, str) or not name:
        raise ValueError(f"table must be a table name (str), got {table!r}")
    return name


def _check_mode(mode: Any) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    return mode


def _int_1d(x: Any, what: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() != 1:
        raise InvalidInput(f"{what} must be a 1-D integer tensor, got {t.dtype} of shape "
                           f"{tuple(t.shape)}")
    return t


def _bag_of_each_index(offsets: torch.Tensor, n: int, include_last_offset: bool) -> torch.Tensor:
    """Bag number of every index (offsets already validated by the connection's forward)."""
    off = offsets.detach().to("cpu", torch.int64)
    if not include_last_offset:
        off = torch.cat([off, torch.tensor([n])])
    lengths = off.diff()
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


class _PooledLookup(torch.autograd.Function):
    """out = conn.pooled(...) (or ``pooled``, already computed by the caller); backward =
    conn.apply_pooled_gradients(...) (+ psw gradient)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, per_sample_weights: torch.Tensor | None,
                conn: Any, table: str, indices: torch.Tensor, offsets: torch.Tensor, mode: str,
                include_last_offset: bool, pooled: torch.Tensor | None = None) -> torch.Tensor:
        psw = None if per_sample_weights is None else per_sample_weights.detach()
        out = pooled if pooled is not None else conn.pooled(
            table, indices, offsets, mode=mode, per_sample_weights=psw,
            include_last_offset=include_last_offset)
        rows = None
        if per_sample_weights is not None and ctx.needs_input_grad[1]:
            # d out[b] / d psw[i] = row[i] as read now: rows may change before backward runs
            # (another module's backward on the same table).
            rows = conn.lookup(table, indices)
        ctx.conn, ctx.table, ctx.mode, ctx.include_last_offset = (conn, table, mode,
                                                                  include_last_offset)
        ctx.save_for_backward(indices, offsets, psw, rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        indices, offsets, psw, rows = ctx.saved_tensors
        grad_psw = None
        if rows is not None:
            bag = _bag_of_each_index(offsets, len(indices), ctx.include_last_offset)
            g = grad_output.detach().to("cpu", torch.float32)
            grad_psw = (rows.to(torch.float32) * g[bag]).sum(1).to(psw.dtype)
            grad_psw = grad_psw.to(psw.device)
        ctx.conn.apply_pooled_gradients(ctx.table, indices, offsets, grad_output.contiguous(),
                                        mode=ctx.mode, per_sample_weights=psw,
                                        include_last_offset=ctx.include_last_offset)
        return None, grad_psw, None, None, None, None, None, None, None


class TierEmbeddingBag(nn.Module):
    """Pooled lookups of one store table, trained by backward (see the module docstring).

    conn: a :class:`tierstore.Store` or service ``Connection``; table: the table's name.
    mode: "sum" or "mean"; include_last_offset: offsets are B + 1 boundaries (FBGEMM) instead
    of B bag starts (``nn.EmbeddingBag``'s default).
    embedding_dim: the table's dim; asked from the connection if omitted (``conn.spec(table).dim``
    where the connection has ``spec``, else the width of a lookup of no rows).

    ``forward(indices, offsets, per_sample_weights=None) -> Tensor[B, embedding_dim]``, like
    ``nn.EmbeddingBag``. If ``per_sample_weights`` requires grad it gets its gradient
    (row_i . grad_out[bag of i]); the rows are then read once more at forward time.
    """

    def __init__(self, conn: Any, table: Any, mode: str = "sum",
                 include_last_offset: bool = False, embedding_dim: int | None = None) -> None:
        super().__init__()
        self.conn = conn
        self.table = _table_name(table)
        self.mode = _check_mode(mode)
        self.include_last_offset = bool(include_last_offset)
        if embedding_dim is None:
            if callable(getattr(conn, "spec", None)):  # Connection.spec(table) -> TableSpec
                embedding_dim = conn.spec(self.table).dim
            else:  # tierstore.Store: the width of a lookup of no rows
                embedding_dim = conn.lookup(self.table, torch.empty(0, dtype=torch.int64)).shape[1]
        self.embedding_dim = int(embedding_dim)

    def forward(self, indices: Any, offsets: Any,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        indices = _int_1d(indices, f"table {self.table!r}: indices")
        offsets = _int_1d(offsets, f"table {self.table!r}: offsets")
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise InvalidInput(f"table {self.table!r}: per_sample_weights need mode='sum', "
                                   f"got {self.mode!r}")
            if not isinstance(per_sample_weights, torch.Tensor):
                per_sample_weights = torch.as_tensor(per_sample_weights)
        if not torch.is_grad_enabled():
            return self.conn.pooled(self.table, indices, offsets, mode=self.mode,
                                    per_sample_weights=per_sample_weights,
                                    include_last_offset=self.include_last_offset)
        return self._trained(indices, offsets, per_sample_weights)

    def _trained(self, indices: torch.Tensor, offsets: torch.Tensor,
                 per_sample_weights: torch.Tensor | None,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled output (``pooled`` if the caller has it) recorded for backward."""
        # A fresh 0-element leaf makes the output require grad, so backward reaches the
        # connection; it gets no gradient. Not a parameter: nothing for DDP or optimizers.
        anchor = torch.empty(0, requires_grad=True)
        return _PooledLookup.apply(anchor, per_sample_weights, self.conn, self.table, indices,
                                   offsets, self.mode, self.include_last_offset, pooled)

    def extra_repr(self) -> str:
        return (f"table={self.table!r}, embedding_dim={self.embedding_dim}, mode={self.mode!r}, "
                f"include_last_offset={self.include_last_offset}")


class TierEmbeddingBagCollection(nn.Module):
    """Pooled embeddings of several sparse features, like TorchRec's EmbeddingBagCollection.

    conn: as for :class:`TierEmbeddingBag`; tables: feature name -> table name (several
    features may share a table); mode: "sum" or "mean" for every feature.

    The features of one table are pooled in one call and trained by one optimizer step per
    backward, their gradients summed first (as FBGEMM's TBE does for shared tables).

    ``forward(kjt)`` with a TorchRec ``KeyedJaggedTensor``, or ``forward(keys, values, lengths,
    weights=None)`` with the same layout: ``lengths`` has ``len(keys) * B`` entries, key-major
    (all samples of keys[0], then of keys[1], ...), ``values`` the ids in that order.
    Returns ``{feature: Tensor[B, dim]}`` for the given keys in their order;
    :meth:`forward_keyed` returns a TorchRec ``KeyedTensor`` instead.
    """

    def __init__(self, conn: Any, tables: Mapping[str, Any], mode: str = "sum") -> None:
        super().__init__()
        if not isinstance(tables, Mapping) or not tables:
            raise ValueError("tables must be a non-empty mapping of feature name -> table name")
        self.mode = _check_mode(mode)
        self.conn = conn
        self.feature_to_table: dict[str, str] = {}
        for feature, table in tables.items():
            if not isinstance(feature, str) or not feature:
                raise ValueError(f"feature names must be non-empty strings, got {feature!r}")
            self.feature_to_table[feature] = _table_name(table)
        self.tables: list[str] = list(dict.fromkeys(self.feature_to_table.values()))
        # One module per table (table names may contain '.', so no ModuleDict).
        self.embedding_bags = nn.ModuleList(
            TierEmbeddingBag(conn, t, mode=mode, include_last_offset=True) for t in self.tables)
        self._bag = dict(zip(self.tables, self.embedding_bags))
        self.embedding_dims = {f: self._bag[t].embedding_dim
                               for f, t in self.feature_to_table.items()}

    @property
    def features(self) -> list[str]:
        return list(self.feature_to_table)

    def embedding_bag(self, feature: str) -> TierEmbeddingBag:
        """The module that pools ``feature`` (shared by the features of its table)."""
        return self._bag[self.feature_to_table[feature]]

    def _inputs(self, kjt_or_keys: Any, values: Any, lengths: Any, weights: Any
                ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if callable(getattr(kjt_or_keys, "keys", None)) and hasattr(kjt_or_keys, "lengths"):
            kjt = kjt_or_keys  # a KeyedJaggedTensor
            if values is not None or lengths is not None or weights is not None:
                raise InvalidInput("pass either a KeyedJaggedTensor or keys, values, lengths "
                                   "(and weights), not both")
            variable = getattr(kjt, "variable_stride_per_key", None)
            if callable(variable) and variable():
                raise InvalidInput("KeyedJaggedTensor with a variable batch size per key is "
                                   "not supported")
            keys, values, lengths = list(kjt.keys()), kjt.values(), kjt.lengths()
            weights = kjt.weights_or_none()
        else:
            if isinstance(kjt_or_keys, str) or not isinstance(kjt_or_keys, Sequence):
                raise InvalidInput("keys must be a list of feature names (or pass a "
                                   f"KeyedJaggedTensor), got {type(kjt_or_keys).__name__}")
            keys = list(kjt_or_keys)
            if values is None or lengths is None:
                raise InvalidInput("values and lengths are required with a list of keys")
        if not keys:
            raise InvalidInput("no features given")
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise InvalidInput(f"feature names must be strings, got {bad!r}")
        unknown = [k for k in keys if k not in self.feature_to_table]
        if unknown:
            raise InvalidInput(f"unknown features {unknown}; this collection has "
                               f"{self.features}")
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise InvalidInput(f"features given more than once: {dup}")
        values = _int_1d(values, "values")
        lengths = _int_1d(lengths, "lengths")
        if lengths.numel() % len(keys):
            raise InvalidInput(f"lengths has {lengths.numel()} entries, not a multiple of the "
                               f"{len(keys)} keys (it needs len(keys) * batch_size, key-major)")
        if lengths.numel() and int(lengths.min()) < 0:
            raise InvalidInput("lengths must be >= 0")
        total = int(lengths.sum())
        if total != values.numel():
            raise InvalidInput(f"lengths sum to {total} but values has {values.numel()} "
                               f"entries")
        if weights is not None:
            if self.mode != "sum":
                raise InvalidInput(f"weights need mode='sum', got {self.mode!r}")
            if not isinstance(weights, torch.Tensor):
                weights = torch.as_tensor(weights)
            if not weights.dtype.is_floating_point or tuple(weights.shape) != (values.numel(),):
                raise InvalidInput(f"weights must be floating point of shape "
                                   f"({values.numel()},), got {weights.dtype} "
                                   f"{tuple(weights.shape)}")
        return keys, values, lengths, weights

    def forward(self, kjt_or_keys: Any, values: Any = None, lengths: Any = None,
                weights: Any = None) -> dict[str, torch.Tensor]:
        keys, values, lengths, weights = self._inputs(kjt_or_keys, values, lengths, weights)
        k = len(keys)
        b = lengths.numel() // k
        lengths_kb = lengths.view(k, b)
        ends = lengths_kb.sum(1).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        by_table: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            by_table.setdefault(self.feature_to_table[key], []).append(i)
        batches = []  # per table: indices, offsets (B + 1), weights
        for table, pos in by_table.items():
            idx = torch.cat([values[starts[i]:ends[i]] for i in pos])
            lens = lengths_kb[pos].reshape(-1).to(torch.int64)
            offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
            psw = None
            if weights is not None:
                psw = torch.cat([weights[starts[i]:ends[i]] for i in pos])
            batches.append((idx, offsets, psw))
        outs = self._pooled_tables(list(by_table), batches)
        pooled: dict[str, torch.Tensor] = {}
        for (table, pos), out in zip(by_table.items(), outs):
            for i, part in zip(pos, out.split(b)):
                pooled[keys[i]] = part
        return {key: pooled[key] for key in keys}

    def _pooled_tables(self, tables: list[str], batches: list[tuple]) -> list[torch.Tensor]:
        """Each table's pooled batch. Through the connection's ``pooled_many`` where it has
        one (the service client resolves one table's misses while it pools another's),
        unless weights need their gradient (that path reads the rows once more per table)."""
        many = getattr(self.conn, "pooled_many", None)
        if many is None or any(psw is not None and psw.requires_grad for _, _, psw in batches):
            return [self._bag[t](*batch) for t, batch in zip(tables, batches)]
        outs = many(tables, [b[0] for b in batches], [b[1] for b in batches], mode=self.mode,
                    per_sample_weights=[None if b[2] is None else b[2].detach()
                                        for b in batches],
                    include_last_offset=True)
        if not torch.is_grad_enabled():
            return outs
        return [self._bag[t]._trained(*batch, pooled=out)
                for t, batch, out in zip(tables, batches, outs)]

    def forward_keyed(self, kjt_or_keys: Any, values: Any = None, lengths: Any = None,
                      weights: Any = None) -> Any:
        """Like :meth:`forward`, as a ``torchrec.sparse.jagged_tensor.KeyedTensor``."""
        try:
            from torchrec.sparse.jagged_tensor import KeyedTensor
        except ImportError as e:
            raise ImportError("forward_keyed needs torchrec (pip install torchrec); forward() "
                              f"returns a dict without it ({e})") from e
        out = self.forward(kjt_or_keys, values, lengths, weights)
        return KeyedTensor(keys=list(out), length_per_key=[t.shape[1] for t in out.values()],
                           values=torch.cat(list(out.values()), dim=1), key_dim=1)

    def extra_repr(self) -> str:
        return f"features={self.feature_to_table!r}, mode={self.mode!r}"


__all__ = ["TierEmbeddingBag", "TierEmbeddingBagCollection"]
