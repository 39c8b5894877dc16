"""What every dataset (TSV, prepared, synthetic) offers the batch iterator."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

from tierstore.data.schema import NUM_SPARSE, SPARSE_KEYS, Chunk

SPLITS = ("all", "train", "eval")


class Dataset(ABC):
    """A stream of samples in the Criteo schema, read in chunks.

    A chunk comes with its *position*, a small JSON-able dict from which :meth:`chunks` restarts
    at exactly that chunk; (position, rows into the chunk) is how a batch iterator saves where it
    is.
    """

    kind: str = ""
    keys: tuple[str, ...] = SPARSE_KEYS
    #: ids per sample and feature (all 1 for Criteo data; multi-hot synthetic data may differ)
    pooling: tuple[int, ...] = (1,) * NUM_SPARSE
    #: rows per feature when ids are row numbers in [0, rows) (synthetic); None when ids are
    #: hashed 63-bit values (TSV and prepared data: take ``id % rows``, see Batch.remap)
    cardinalities: tuple[int, ...] | None = None
    #: samples in this split, None when unknown (TSV) or unbounded (synthetic)
    num_samples: int | None = None
    split: str = "all"

    @abstractmethod
    def start(self, sample: int) -> tuple[dict[str, Any], int]:
        """(position, rows to skip in the first chunk) of the ``sample``-th sample."""

    @abstractmethod
    def chunks(self, position: dict[str, Any]) -> Iterator[tuple[dict[str, Any], Chunk]]:
        """(position, chunk) from ``position`` on, to the end of the split."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able identity (kind, source, split, options), saved with an iterator's state."""

    def close(self) -> None:
        """Nothing to release by default (readers open their files per iteration)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return split
