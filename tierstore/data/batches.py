"""Batches in TorchRec's KeyedJaggedTensor layout, and a resumable batch iterator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tierstore.data.base import Dataset
from tierstore.data.schema import Chunk


@dataclass
class Batch:
    """B samples: the sparse part as a KeyedJaggedTensor's fields, plus dense and labels.

    ``values`` are key-major: every id of ``keys[0]`` for samples 0..B-1, then ``keys[1]``, ...;
    ``lengths`` [len(keys) * B] counts the ids of each (key, sample) and ``offsets``
    [len(keys) * B + 1] are their boundaries (``offsets[0] = 0``).
    """

    keys: list[str]
    values: torch.Tensor   # int64
    lengths: torch.Tensor  # int64 [F * B]
    offsets: torch.Tensor  # int64 [F * B + 1]
    dense: torch.Tensor    # float32 [B, 13]
    labels: torch.Tensor   # float32 [B]

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def feature(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths) of one key."""
        try:
            k = self.keys.index(key)
        except ValueError:
            raise KeyError(f"no feature {key!r}; keys: {', '.join(self.keys)}") from None
        b = self.batch_size
        lo, hi = int(self.offsets[k * b]), int(self.offsets[(k + 1) * b])
        return self.values[lo:hi], self.lengths[k * b:(k + 1) * b]

    def to_kjt(self) -> Any:
        """A torchrec KeyedJaggedTensor of the sparse part (needs torchrec)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        return KeyedJaggedTensor(keys=list(self.keys), values=self.values, lengths=self.lengths,
                                 offsets=self.offsets, stride=self.batch_size)

    def remap(self, rows: Sequence[int]) -> Batch:
        """A copy whose ids of key k are taken modulo ``rows[k]`` (hashed ids -> table rows)."""
        if len(rows) != len(self.keys):
            raise ValueError(f"need {len(self.keys)} row counts, got {len(rows)}")
        per_value = torch.repeat_interleave(torch.as_tensor(list(rows), dtype=torch.int64),
                                            self.lengths.view(len(self.keys), -1).sum(1))
        return Batch(self.keys, torch.remainder(self.values, per_value), self.lengths,
                     self.offsets, self.dense, self.labels)


def make_batch(keys: Sequence[str], pooling: Sequence[int],
               pieces: list[tuple[Chunk, int, int]]) -> Batch:
    """One Batch from row ranges [a, b) of chunks (copies; chunks may be read-only maps)."""
    labels = np.concatenate([c.labels[a:b] for c, a, b in pieces]).astype(np.float32, copy=False)
    dense = np.concatenate([c.dense[a:b] for c, a, b in pieces]).astype(np.float32, copy=False)
    values = np.concatenate([c.sparse[f][a * p:b * p] for f, p in enumerate(pooling)
                             for c, a, b in pieces]).astype(np.int64, copy=False)
    n = len(labels)
    lengths = np.repeat(np.asarray(pooling, dtype=np.int64), n)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Batch(list(keys), torch.from_numpy(values), torch.from_numpy(lengths),
                 torch.from_numpy(offsets), torch.from_numpy(np.ascontiguousarray(dense)),
                 torch.from_numpy(labels))


class BatchIterator:
    """Batches of ``batch_size`` samples of a dataset, from sample ``start`` on.

    The last batch of a finite split may be short (``drop_last=True`` drops it); with
    ``repeat=True`` a finite split starts over (``epoch`` counts). :meth:`state_dict` is where
    the next batch starts (JSON-able); :meth:`load_state_dict` on an iterator over the same
    dataset continues from there with the same batches.
    """

    def __init__(self, dataset: Dataset, batch_size: int, start: int = 0,
                 drop_last: bool = False, repeat: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.repeat = repeat
        self.epoch = 0
        self.samples = 0  # samples handed out since `start` (over epochs)
        self._seek(*dataset.start(start))

    def _seek(self, position: dict[str, Any], row: int) -> None:
        self._pos, self._row = dict(position), int(row)
        self._chunk: Chunk | None = None
        self._gen = None
        self._ended = False

    def _load_chunk(self) -> bool:
        """Move to the chunk holding the next row; False at the end of the split."""
        skip = self._row if self._chunk is None else self._row - len(self._chunk)
        if self._gen is None:
            self._gen = self.dataset.chunks(self._pos)
        while True:
            try:
                pos, chunk = next(self._gen)
            except StopIteration:
                if not self.repeat or (self.samples == 0 and self.epoch > 0):
                    self._ended = True  # the state keeps pointing past the last row
                    return False
                self.epoch += 1
                self._pos, skip = self.dataset.start(0)
                self._gen = self.dataset.chunks(self._pos)
                continue
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            self._pos, self._chunk, self._row = pos, chunk, skip
            return True

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        pieces: list[tuple[Chunk, int, int]] = []
        need = self.batch_size
        while need and not self._ended:
            if self._chunk is None or self._row >= len(self._chunk):
                if not self._load_chunk():
                    break
                continue
            take = min(need, len(self._chunk) - self._row)
            pieces.append((self._chunk, self._row, self._row + take))
            self._row += take
            need -= take
        if not pieces or (need and self.drop_last):
            raise StopIteration
        self.samples += self.batch_size - need
        return make_batch(self.dataset.keys, self.dataset.pooling, pieces)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts: the dataset's identity, the chunk position and the row
        in it, samples handed out and the epoch (all JSON-able)."""
        return {"version": 1, "dataset": self.dataset.describe(), "batch_size": self.batch_size,
                "position": dict(self._pos), "row": self._row, "samples": self.samples,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.dataset.describe()
        if state.get("dataset") != mine:
            raise ValueError(f"batch iterator state is for dataset {state.get('dataset')}, "
                             f"not {mine}")
        self.samples, self.epoch = int(state["samples"]), int(state["epoch"])
        self._seek(state["position"], int(state["row"]))


def batches(dataset: Dataset, batch_size: int, start: int = 0, drop_last: bool = False,
            repeat: bool = False) -> BatchIterator:
    """A resumable iterator of :class:`Batch` es (see :class:`BatchIterator`)."""
    return BatchIterator(dataset, batch_size, start, drop_last, repeat)
