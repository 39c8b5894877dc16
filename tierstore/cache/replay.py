"""Drive a cache policy alone over a trace (development and tests).

The DDR tier replays traces through the real tier (``tierstore bench cache``); this module does
the same with a minimal slot map so policies can be developed and tested without a store.
Batch semantics match the tier: the trace is cut into consecutive batches of ``batch`` ids,
each batch is reduced to its distinct ids in first-occurrence order, split into resident slots
(hits) and missing rows, and handed to ``policy.access`` once.

Counting follows the tier (first-occurrence semantics): each distinct row of a batch that is
not resident is one miss, every other trace entry is a hit. With batch 1 this is exactly per
access.
"""

from __future__ import annotations

import time

import numpy as np

from .base import Admission, CachePolicy
from .slots import EMPTY_SLOTS, as_index, distinct_in_order


def replay_policy(
    policy: CachePolicy, trace: np.ndarray, batch: int = 1, *, check: bool = False
) -> dict[str, float | int]:
    """Replay ``trace`` through ``policy``; returns ``{"hits", "misses", "hit_rate"}`` plus
    ``"seconds"`` (whole replay) and ``"access_seconds"`` (time spent inside ``access``).

    With ``check=True`` every Admission is verified against the rules of base.py
    (AssertionError on a violation). Policies with ``bind_rows`` are bound to the replay's
    slot -> row array, as the tier does.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    started = time.perf_counter()
    trace = as_index(trace)
    state = _SlotMap(policy.capacity, trace)
    bind = getattr(policy, "bind_rows", None)
    if bind is not None:
        bind(state.slot_rows)
    timed = _TimedPolicy(policy)
    if batch == 1:
        hits = _replay_single(timed, trace, state, check)
    else:
        hits = _replay_batches(timed, trace, state, batch, check)
    n = len(trace)
    return {
        "hits": hits,
        "misses": n - hits,
        "hit_rate": hits / n if n else 0.0,
        "seconds": time.perf_counter() - started,
        "access_seconds": timed.seconds,
    }


class _TimedPolicy:
    """Forwards to a policy and adds up the time spent in ``access``."""

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self.capacity = policy.capacity
        self.pinned = policy.pinned
        self.seconds = 0.0

    def access(self, hit_slots: np.ndarray, miss_rows: np.ndarray) -> Admission:
        started = time.perf_counter()
        decision = self.policy.access(hit_slots, miss_rows)
        self.seconds += time.perf_counter() - started
        return decision


class _SlotMap:
    """Which slot holds which row; rows are renumbered densely for the lookup array."""

    def __init__(self, capacity: int, trace: np.ndarray) -> None:
        self.unique, self.dense = np.unique(trace, return_inverse=True)
        self.slot_of = np.full(len(self.unique), -1, dtype=np.int64)  # dense id -> slot
        self.dense_in = np.full(capacity, -1, dtype=np.int64)  # slot -> dense id
        self.slot_rows = np.full(capacity, -1, dtype=np.int64)  # slot -> row id (for policies)

    def apply(self, dense_ids: np.ndarray, slots: np.ndarray) -> None:
        """Rows ``dense_ids`` now live in ``slots``; whatever those slots held is evicted."""
        old = self.dense_in[slots]
        self.slot_of[old[old >= 0]] = -1
        self.slot_of[dense_ids] = slots
        self.dense_in[slots] = dense_ids
        self.slot_rows[slots] = self.unique[dense_ids]


def _replay_single(policy: CachePolicy, trace: np.ndarray, state: _SlotMap, check: bool) -> int:
    slot_of = state.slot_of
    dense = state.dense.tolist()
    hits = 0
    for i, d in enumerate(dense):
        slot = slot_of[d]
        if slot >= 0:
            hits += 1
            hit_slots = np.array([slot], dtype=np.int64)
            decision = policy.access(hit_slots, EMPTY_SLOTS)
            if check:
                check_admission(policy, hit_slots, 0, decision)
            continue
        decision = policy.access(EMPTY_SLOTS, trace[i : i + 1])
        if check:
            check_admission(policy, EMPTY_SLOTS, 1, decision)
        if decision.admit[0]:
            state.apply(np.array([d]), decision.slots)
    return hits


def _replay_batches(
    policy: CachePolicy, trace: np.ndarray, state: _SlotMap, batch: int, check: bool
) -> int:
    hits = 0
    for start in range(0, len(trace), batch):
        dense = state.dense[start : start + batch]
        distinct = distinct_in_order(dense)
        slots = state.slot_of[distinct]
        resident = slots >= 0
        missing = distinct[~resident]
        hits += len(dense) - len(missing)
        hit_slots = slots[resident]
        decision = policy.access(hit_slots, state.unique[missing])
        if check:
            check_admission(policy, hit_slots, len(missing), decision)
        state.apply(missing[decision.admit], decision.slots)
    return hits


def check_admission(
    policy: CachePolicy, hit_slots: np.ndarray, n_miss: int, decision: Admission
) -> None:
    """Assert that ``decision`` keeps the rules of base.py for this batch."""
    admit, slots = np.asarray(decision.admit), np.asarray(decision.slots)
    assert admit.dtype == bool and admit.shape == (n_miss,), "admit must be bool[len(miss_rows)]"
    assert slots.shape == (int(admit.sum()),), "one slot per admitted row"
    assert np.issubdtype(slots.dtype, np.integer), "slots must be integers"
    assert len(np.unique(slots)) == len(slots), "a slot returned twice in one batch"
    assert ((slots >= 0) & (slots < policy.capacity)).all(), "slot out of range"
    assert not policy.pinned[slots].any(), "a pinned slot was returned"
    assert not np.isin(slots, hit_slots).any(), "a slot hit in this batch was returned"
    busy = policy.pinned.copy()
    busy[hit_slots] = True
    room = policy.capacity - int(np.count_nonzero(busy))
    assert len(slots) <= max(room, 0), "admitted more rows than fit"
