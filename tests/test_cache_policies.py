"""Cache policies of the DDR tier: the base.py contract, exactness, and crafted-trace behaviour."""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import pytest

from tierstore.cache import (
    AdaptivePolicy,
    BeladyPolicy,
    LFUPolicy,
    LRUPolicy,
    POLICIES,
    make_policy,
)
from tierstore.cache.belady import next_use_positions
from tierstore.cache.replay import check_admission, replay_policy
from tierstore.cache.sketch import CountMinSketch, GhostLists
from tierstore.cache.traces import load_trace, parse_zipf_spec, trace_from_spec, zipf

NAMES = ["lru", "lfu", "adaptive", "belady"]


def build(name: str, capacity: int, trace: np.ndarray, batch: int = 1):
    if name == "belady":
        return make_policy(name, capacity, future=trace, batch=batch)
    return make_policy(name, capacity)


class Cache:
    """A minimal tier for tests: slot map, per-access hit flags, contract checks."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self.row_in: dict[int, int] = {}
        self.slot_rows = np.full(policy.capacity, -1, dtype=np.int64)
        if hasattr(policy, "bind_rows"):
            policy.bind_rows(self.slot_rows)

    def run(self, ids) -> list[bool]:
        """One batch (ids may repeat); returns hit flags per id (a missing row's first
        occurrence is the miss, as the tier counts); checks the Admission."""
        ids = [int(x) for x in ids]
        distinct = list(dict.fromkeys(ids))
        flags = first_occurrence_flags(ids, set(self.slot_of))
        hit_slots = np.array([self.slot_of[x] for x in distinct if x in self.slot_of], np.int64)
        missing = np.array([x for x in distinct if x not in self.slot_of], np.int64)
        decision = self.policy.access(hit_slots, missing)
        check_admission(self.policy, hit_slots, len(missing), decision)
        for row, slot in zip(missing[decision.admit].tolist(), decision.slots.tolist()):
            self.evict(slot)
            self.slot_of[row] = slot
            self.row_in[slot] = row
            self.slot_rows[slot] = row
        return flags

    def evict(self, slot: int) -> None:
        old = self.row_in.pop(slot, None)
        if old is not None:
            del self.slot_of[old]
            self.slot_rows[slot] = -1

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.evict(slot)
        self.policy.release(np.array(slots, dtype=np.int64))

    def replay(self, trace: np.ndarray, batch: int = 1) -> list[bool]:
        flags: list[bool] = []
        for start in range(0, len(trace), batch):
            flags += self.run(trace[start : start + batch])
        return flags


def first_occurrence_flags(ids: list[int], resident: set) -> list[bool]:
    """Hit flags of one batch: resident rows, and repeats of a row seen earlier in the batch."""
    seen: set = set()
    flags = []
    for x in ids:
        flags.append(x in resident or x in seen)
        seen.add(x)
    return flags


def reference_lru(trace: np.ndarray, capacity: int, batch: int = 1) -> tuple[list[bool], set]:
    """LRU with base.py's batch semantics, on an OrderedDict."""
    cache: OrderedDict[int, None] = OrderedDict()
    flags: list[bool] = []
    for start in range(0, len(trace), batch):
        ids = [int(x) for x in trace[start : start + batch]]
        flags += first_occurrence_flags(ids, set(cache))
        distinct = list(dict.fromkeys(ids))
        touched = set()
        for x in distinct:
            if x in cache:
                cache.move_to_end(x)
                touched.add(x)
        for x in distinct:
            if x in touched:
                continue
            if len(cache) >= capacity:
                oldest = next(iter(cache))
                if oldest in touched:
                    break  # every resident row is in use by this batch
                del cache[oldest]
            cache[x] = None
            touched.add(x)
    return flags, set(cache)


# ----------------------------------------------------------------------------------- factory
def test_make_policy_names_and_errors() -> None:
    assert set(POLICIES) == set(NAMES)
    for name in ("lru", "lfu", "adaptive"):
        policy = make_policy(name, 8)
        assert policy.name == name and policy.capacity == 8
    assert isinstance(make_policy("belady", 4, future=np.arange(10)), BeladyPolicy)
    with pytest.raises(ValueError, match="lru, lfu, adaptive, belady"):
        make_policy("arc", 8)
    with pytest.raises(ValueError, match="future"):
        make_policy("belady", 8)
    with pytest.raises(ValueError, match="future"):
        make_policy("lru", 8, future=np.arange(3))
    with pytest.raises(ValueError):
        make_policy("lru", 0)


# --------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_contract_under_pins_and_releases(name: str, batch: int) -> None:
    """Random batches with pinned and released slots: every Admission obeys base.py."""
    rng = np.random.default_rng(batch)
    trace = rng.zipf(1.3, 3000) % 200
    cache = Cache(build(name, 24, trace, batch))
    policy = cache.policy
    for start in range(0, len(trace), batch):
        if rng.random() < 0.2 and cache.row_in:
            resident = list(cache.row_in)
            policy.pin(rng.choice(resident, size=min(5, len(resident)), replace=False))
        if rng.random() < 0.2:
            policy.unpin(np.flatnonzero(policy.pinned))
        if rng.random() < 0.05 and cache.row_in:
            cache.release([int(rng.choice(list(cache.row_in)))])
        cache.run(trace[start : start + batch])  # check_admission inside
        assert len(cache.row_in) <= policy.capacity


@pytest.mark.parametrize("name", NAMES)
def test_batch_larger_than_cache_admits_what_fits(name: str) -> None:
    trace = np.arange(100, dtype=np.int64)
    policy = build(name, 10, trace, batch=100)
    policy.pin(np.array([0, 1]))
    decision = policy.access(np.empty(0, np.int64), trace)
    assert decision.admit.sum() <= 8
    assert not np.isin(decision.slots, [0, 1]).any()
    if name != "belady":  # belady bypasses rows it will not see again
        assert decision.admit.sum() == 8 and decision.admit[:8].all()


@pytest.mark.parametrize("name", NAMES)
def test_hit_slots_are_never_victims(name: str) -> None:
    """A full cache where every slot but one is hit: the misses may only take that one."""
    trace = np.array([0, 1, 2, 3, 0, 1, 2, 3, 10, 11, 1, 2, 3, 0, 10])
    cache = Cache(build(name, 4, trace, batch=5))
    cache.run(trace[:5])
    cache.run(trace[5:10])  # hits 1, 2, 3 and misses 10, 11: at most one admitted
    assert {1, 2, 3} <= set(cache.slot_of) and len(cache.slot_of) == 4


@pytest.mark.parametrize("name", NAMES)
def test_release_and_reset_free_slots(name: str) -> None:
    trace = np.concatenate([np.arange(8), [100], np.arange(200, 208)])
    cache = Cache(build(name, 8, trace))
    cache.replay(trace[:8])
    slot = cache.slot_of[3]
    cache.release([slot, slot])  # twice: still one free slot
    cache.policy.release(np.array([slot]))
    assert cache.run([100]) == [False]
    assert cache.slot_of[100] == slot  # the freed slot is used, nothing evicted
    assert set(cache.slot_of) == {0, 1, 2, 4, 5, 6, 7, 100}
    cache.policy.reset()
    admitted = [cache.policy.access(np.empty(0, np.int64), trace[i : i + 1]) for i in range(9, 17)]
    slots = np.concatenate([d.slots for d in admitted])
    assert sorted(slots.tolist()) == list(range(8))  # all free again: no slot reused


@pytest.mark.parametrize("name", NAMES)
def test_metadata_bytes(name: str) -> None:
    policy = build(name, 10_000, np.arange(5))
    if hasattr(policy, "bind_rows"):
        policy.bind_rows(np.full(10_000, -1, dtype=np.int64))
    per_slot = policy.metadata_bytes() / 10_000
    budget = {"lru": 5.5, "lfu": 7.5, "adaptive": 9.5, "belady": 20}[name]
    assert 4 <= per_slot <= budget


# -------------------------------------------------------------------------------------- LRU
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_lru_is_exact(batch: int) -> None:
    rng = np.random.default_rng(batch)
    for capacity in (1, 2, 5, 17):
        trace = rng.integers(0, 3 * capacity + 2, size=600)
        cache = Cache(LRUPolicy(capacity, pool_size=4))
        expected, resident = reference_lru(trace, capacity, batch)
        assert cache.replay(trace, batch) == expected
        assert set(cache.slot_of) == resident


def test_lru_survives_stamp_renumbering() -> None:
    rng = np.random.default_rng(3)
    trace = rng.integers(0, 40, size=3000)
    policy = LRUPolicy(16, pool_size=4)
    policy._stamps.limit = 64  # force a renumbering every few dozen accesses
    assert Cache(policy).replay(trace) == reference_lru(trace, 16)[0]


def test_lru_replay_matches_reference() -> None:
    trace = zipf(0.8, 5000, 20000, seed=5)
    expected = sum(reference_lru(trace, 300)[0])
    assert replay_policy(make_policy("lru", 300), trace)["hits"] == expected
    expected = sum(reference_lru(trace, 300, 50)[0])
    assert replay_policy(make_policy("lru", 300), trace, batch=50, check=True)["hits"] == expected


# -------------------------------------------------------------------------------------- LFU
def test_lfu_evicts_least_frequent_then_oldest() -> None:
    cache = Cache(LFUPolicy(3))
    cache.replay(np.array([1, 1, 1, 2, 2, 3, 4]))  # 4 evicts 3 (count 1)
    assert set(cache.slot_of) == {1, 2, 4}
    cache.replay(np.array([4, 5]))  # counts 1:3 2:2 4:2; 5 evicts 2 (older than 4)
    assert set(cache.slot_of) == {1, 4, 5}


def test_lfu_counts_decay() -> None:
    policy = LFUPolicy(2, decay_period=4)
    cache = Cache(policy)
    cache.replay(np.array([1, 1, 1, 2]))  # 4 accesses: counts 3, 1 halve to 1, 0
    assert sorted(policy._counts.tolist()) == [0, 1]
    cache.replay(np.array([3]))  # evicts 2 (count 0), not 1
    assert set(cache.slot_of) == {1, 3}


# ----------------------------------------------------------------------------------- Belady
def optimal_hits(trace: tuple[int, ...], capacity: int) -> int:
    """Most hits any policy (with bypass) can get: exhaustive search."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(trace):
            return 0
        x = trace[i]
        if x in cache:
            return 1 + best(i + 1, cache)
        options = [best(i + 1, cache)]
        if len(cache) < capacity:
            options.append(best(i + 1, cache | {x}))
        else:
            options += [best(i + 1, (cache - {y}) | {x}) for y in cache]
        return max(options)

    return best(0, frozenset())


def test_belady_is_optimal_on_small_traces() -> None:
    rng = np.random.default_rng(11)
    crafted = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 1, 2])  # LRU gets 0 hits at capacity 2
    assert sum(reference_lru(crafted, 2)[0]) == 0
    traces = [crafted] + [rng.integers(0, 5, size=14) for _ in range(25)]
    for trace in traces:
        for capacity in (1, 2, 3):
            hits = replay_policy(BeladyPolicy(capacity, future=trace), trace, check=True)["hits"]
            assert hits == optimal_hits(tuple(trace.tolist()), capacity)


def test_belady_bypasses_rows_used_later_than_all_residents() -> None:
    trace = np.array([1, 2, 3, 1, 2, 3])
    policy = BeladyPolicy(2, future=trace)
    cache = Cache(policy)
    cache.replay(trace[:2])
    assert cache.run([3]) == [False] and 3 not in cache.slot_of  # 3 is used after 1 and 2
    assert cache.replay(trace[3:5]) == [True, True]


def test_belady_rejects_a_batch_that_is_not_the_future() -> None:
    policy = BeladyPolicy(2, future=np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        policy.access(np.empty(0, np.int64), np.array([7]))


def test_next_use_positions() -> None:
    assert next_use_positions(np.array([5, 6, 5, 5, 6])).tolist() == [2, 4, 3, 8, 9]


# --------------------------------------------------------------------------------- adaptive
def test_adaptive_scan_does_not_flush_hot_set() -> None:
    rng = np.random.default_rng(0)
    hot = np.arange(100)
    warm = np.concatenate([rng.permutation(hot) for _ in range(20)])
    scan = np.arange(10_000, 12_000)
    trace = np.concatenate([warm, scan, rng.permutation(hot)])
    for name, least in (("adaptive", 0.9), ("lru", 0.0)):
        flags = Cache(make_policy(name, 200)).replay(trace)
        after = np.mean(flags[-100:])
        assert after >= least if name == "adaptive" else after == 0.0


def shifting_working_set(phases: int = 12, size: int = 200, passes: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    parts = []
    for phase in range(phases):
        ids = np.arange(phase * size, (phase + 1) * size)
        parts += [rng.permutation(ids) for _ in range(passes)]
    return np.concatenate(parts)


def test_adaptive_follows_recency_when_the_working_set_shifts() -> None:
    trace = shifting_working_set()
    rate = {n: replay_policy(make_policy(n, 250), trace)["hit_rate"] for n in NAMES[:3]}
    assert rate["lru"] > rate["lfu"] + 0.5  # a recency trace
    assert rate["adaptive"] >= rate["lru"] - 0.1


def test_adaptive_uses_frequency_on_zipf() -> None:
    trace = zipf(0.9, 20_000, 40_000, seed=2)
    rate = {n: replay_policy(make_policy(n, 200), trace)["hit_rate"] for n in NAMES[:3]}
    assert rate["lfu"] > rate["lru"] + 0.03  # a frequency trace
    assert rate["adaptive"] >= rate["lfu"] - 0.01


def test_adaptive_window_moves_toward_the_workload() -> None:
    recency = AdaptivePolicy(250)
    replay_policy(recency, shifting_working_set())
    frequency = AdaptivePolicy(250)
    replay_policy(frequency, zipf(0.9, 20_000, 40_000, seed=2))
    assert recency.window_target > 0.5 * 250
    assert frequency.window_target < 0.1 * 250


@pytest.mark.parametrize("trace_kind", ["zipf", "shifting"])
def test_adaptive_single_path_matches_batch_path(trace_kind: str) -> None:
    """The scalar path for single misses takes exactly the decisions of the array path."""
    if trace_kind == "zipf":
        trace = zipf(1.0, 3000, 12_000, seed=4)
    else:
        trace = shifting_working_set(phases=6)
    decisions = []
    for single in (True, False):
        policy = AdaptivePolicy(150)
        policy.single_path = single
        cache = Cache(policy)
        flags = cache.replay(trace)
        decisions.append((flags, dict(cache.slot_of), policy.window_target))
    assert decisions[0] == decisions[1]


# --------------------------------------------------------------------------------- sketches
def test_count_min_sketch_over_estimates_and_halves() -> None:
    sketch = CountMinSketch(width=64, sample=10_000)
    rows = np.arange(200, dtype=np.int64)
    truth = np.arange(200) % 9
    for k in range(1, 9):
        sketch.increment(rows[truth >= k])
    sketch.increment(rows[:1])  # the single-row path
    truth[0] += 1
    estimate = sketch.estimate(rows)
    assert (estimate >= truth).all()
    assert [sketch.estimate_one(r) for r in rows[:20]] == estimate[:20].tolist()
    sketch._halve()
    assert (sketch.estimate(rows) <= (estimate // 2) + 0).all()
    for _ in range(40):
        sketch.increment(rows[5:6])
    assert sketch.estimate_one(5) == CountMinSketch.MAX_COUNT


@pytest.mark.parametrize("bits", [8, 16])
def test_ghost_lists_remember_recent_rows_only(bits: int) -> None:
    ghosts = GhostLists(entries=1000, fingerprint_bits=bits)
    ghosts.add(0, np.arange(50, dtype=np.int64))
    ghosts.add(1, np.array([7000], dtype=np.int64))
    ghosts.add(1, np.array([7001], dtype=np.int64))  # the single-row path
    in_window, in_main = ghosts.lookup(np.array([3, 7000, 7001], dtype=np.int64))
    assert in_window.tolist() == [True, False, False] and in_main.tolist() == [False, True, True]
    assert ghosts.lookup_one(3) == (True, False) and ghosts.lookup_one(7001) == (False, True)
    assert ghosts.remembered(0) >= 45 and ghosts.remembered(1) == 2
    never = np.arange(10**6, 10**6 + 20_000, dtype=np.int64)
    false_hits = np.mean(ghosts.lookup(never)[0])
    assert false_hits < 3 * 50 / 1000 * 2.0**-bits + 0.002
    for start in range(10_000, 20_000, 100):  # 10x the size: the first rows are forgotten
        ghosts.add(0, np.arange(start, start + 100, dtype=np.int64))
    assert np.mean(ghosts.lookup(np.arange(50, dtype=np.int64))[0]) < 0.1
    assert np.mean(ghosts.lookup(np.arange(19_900, 20_000, dtype=np.int64))[0]) > 0.8
    assert ghosts.lookup_one(7000) == (False, True)


# ----------------------------------------------------------------------------------- traces
def test_load_trace(tmp_path) -> None:
    path = tmp_path / "trace.txt"
    path.write_text("5\n17\n\n5\n9000000000\n")
    assert load_trace(path).tolist() == [5, 17, 5, 9000000000]
    assert load_trace(path).dtype == np.int64
    path.write_text("1\nx\n")
    with pytest.raises(ValueError, match="integer"):
        load_trace(path)
    path.write_text("1\n-2\n")
    with pytest.raises(ValueError, match="negative"):
        load_trace(path)


def test_zipf_traces() -> None:
    a = trace_from_spec("zipf:alpha=1.05,n=1000,len=5000,seed=3")
    assert a.dtype == np.int64 and len(a) == 5000 and a.min() >= 0 and a.max() < 1000
    assert np.array_equal(a, zipf(1.05, 1000, 5000, 3))
    assert not np.array_equal(a, zipf(1.05, 1000, 5000, 4))
    counts = np.bincount(a, minlength=1000)
    assert np.sort(counts)[-1] > 10 * np.sort(counts)[-100]  # skewed
    assert set(np.argsort(counts)[-10:].tolist()) != set(range(10))  # ranks are permuted
    assert parse_zipf_spec("zipf:alpha=0.9,n=10,len=3,seed=1") == dict(
        alpha=0.9, n=10, len=3, seed=1
    )
    for bad in ("zipf:alpha=0.9,n=10,len=3", "zipf:alpha=0.9,n=10,len=3,seed=1,x=2", "zipf:n=a"):
        with pytest.raises(ValueError):
            parse_zipf_spec(bad)


def _adaptive_state(policy: AdaptivePolicy) -> tuple:
    """Everything the adaptive policy decides with (stamps compared by order: the Python path
    renumbers nothing here, so they are equal outright)."""
    sk, gh = policy._sketch, policy._ghosts
    return (policy._seg.tobytes(), policy._stamps.values.tobytes(), policy._stamps.now,
            list(policy._size), policy._window, policy._direction, policy._run,
            sk._table.tobytes(), sk.additions, gh._tables[0].tobytes(),
            gh._tables[1].tobytes(), list(gh._occupied), policy._free._next,
            policy._free._released.tolist(), policy.pinned.tobytes())


@pytest.mark.parametrize("trace_kind", ["zipf", "shifting", "scan"])
@pytest.mark.parametrize("batch", [2, 37, 500])
def test_adaptive_batch_kernel_matches_python_path(trace_kind: str, batch: int) -> None:
    """The numba batch path (adaptive_batch.py) takes exactly the Python path's decisions and
    leaves exactly its state (segments, stamps, sizes, window, sketch, ghosts, free list),
    batch after batch, with rows pinned by the tier and slots released in between."""
    if trace_kind == "zipf":
        trace = zipf(1.05, 4000, 30_000, seed=7)
    elif trace_kind == "shifting":
        trace = shifting_working_set(phases=6)
    else:
        rng = np.random.default_rng(3)
        trace = np.concatenate([rng.integers(0, 300, 8000), np.arange(10_000, 16_000),
                                rng.integers(0, 300, 8000)])
    caches = []
    for kernel in (True, False):
        policy = AdaptivePolicy(200, sample=2.0)  # small sample: the sketch halves often
        policy.batch_kernel = kernel
        caches.append(Cache(policy))
    rng = np.random.default_rng(11)
    for i, start in enumerate(range(0, len(trace), batch)):
        if i % 7 == 3:  # the tier pins a few slots (a reader) for a batch or two
            pins = rng.choice(200, 5, replace=False)
            for c in caches:
                c.policy.pinned[:] = False
                c.policy.pinned[pins] = True
        if i % 11 == 5:
            for c in caches:
                c.policy.pinned[:] = False
        if i % 13 == 6:  # the tier drops a few rows
            occupied = sorted(caches[0].row_in)
            gone = [occupied[j] for j in rng.choice(len(occupied), min(3, len(occupied)),
                                                     replace=False)]
            for c in caches:
                c.release(list(gone))
        flags = [c.run(trace[start: start + batch]) for c in caches]
        assert flags[0] == flags[1], f"batch {i}"
        assert caches[0].slot_of == caches[1].slot_of, f"batch {i}"
        assert _adaptive_state(caches[0].policy) == _adaptive_state(caches[1].policy), \
            f"batch {i}"
