"""The contract between the DDR tier and a cache policy.

The DDR tier owns `capacity` slots of row memory. A policy decides, once per batch, which of the
batch's missing rows are admitted and into which slots (evicting whatever those slots held). The
tier does all data movement (SCM reads, write-back of dirty victims, index updates); the policy
only keeps its own metadata, indexed by slot (arrays of length `capacity`) and, for admission
filters, by row id (a frequency sketch).

Per batch the tier calls ``policy.access(hit_slots, miss_rows)`` exactly once:

- ``hit_slots``: int64 array of the distinct slots that are resident and used by this batch, in
  first-occurrence order;
- ``miss_rows``: int64 array of the distinct row ids of this batch that are not resident, in
  first-occurrence order (row ids may be arbitrary non-negative int64 for sparse tables).

It returns an :class:`Admission`. Rules the policy must keep (the tier checks them in tests):

- slots in ``hit_slots`` are pinned for the batch: never returned as victims;
- pinned slots set with :meth:`CachePolicy.pin` are never returned either;
- no slot is returned twice in one batch;
- a returned slot that is currently occupied means its row is evicted;
- at most ``capacity - len(hit_slots) - pinned`` rows are admitted (a batch larger than the cache
  admits what fits; the rest is served from SCM without being cached).

Semantics of a batch of size > 1: hits are recorded first, then misses are considered in order.
With batch size 1 this is the ordinary per-access policy.

Decisions must be vectorized over the batch (numpy on whole arrays); no Python loop per id.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Admission:
    """A policy's decision for one batch.

    admit: bool[len(miss_rows)], which missing rows enter the cache.
    slots: int64[admit.sum()], the slot each admitted row goes to, in the order of
        ``miss_rows[admit]``.
    """

    admit: np.ndarray
    slots: np.ndarray


class CachePolicy(ABC):
    """Base class of all eviction/admission policies; see the module docstring for the contract."""

    name: str = "base"
    #: False for policies that ignore hits (the tier then skips computing distinct hit slots).
    tracks_hits: bool = True

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.pinned = np.zeros(self.capacity, dtype=bool)

    @abstractmethod
    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        """Record one batch and decide admissions/evictions (see module docstring)."""

    @abstractmethod
    def reset(self) -> None:
        """Forget everything: all slots become free (the tier has emptied the cache)."""

    @abstractmethod
    def release(self, slots: np.ndarray) -> None:
        """The tier has emptied these slots (e.g. a row was dropped); they become free."""

    def pin(self, slots: np.ndarray) -> None:
        """Protect slots from eviction until :meth:`unpin` (a reader is using them)."""
        self.pinned[slots] = True

    def unpin(self, slots: np.ndarray) -> None:
        self.pinned[slots] = False

    def metadata_bytes(self) -> int:
        """Bytes of policy metadata held in DRAM (slot arrays, sketches), for the overhead stat."""
        return 0
