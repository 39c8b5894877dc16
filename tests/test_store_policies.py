"""Cache policies behind the real DRAM tier of a Store (issue 2's crafted-trace behaviour)."""

import numpy as np
import pytest
import torch

import tierstore as ts


def store_with_cache(path, policy, rows=20_000, cache_rows=100):
    spec = ts.TableSpec("t", rows, 4, optimizer=ts.SGD(0.1))
    s = ts.Store(path, ddr_bytes=cache_rows * ts.Store.cached_row_bytes(spec), policy=policy)
    s.create_table(spec)
    assert s.stats()["tables"]["t"]["capacity_rows"] == cache_rows
    return s


def hits_of(store, ids):
    before = store.stats()["tables"]["t"]["hits"]
    for i in ids:
        store.lookup("t", torch.tensor([int(i)]))
    return store.stats()["tables"]["t"]["hits"] - before


@pytest.mark.parametrize("policy", ["adaptive", "lfu"])
def test_a_scan_does_not_flush_the_hot_set(tmp_path, policy):
    hot = np.arange(50)
    with store_with_cache(tmp_path / policy, policy) as s:
        for _ in range(20):
            hits_of(s, hot)
        hits_of(s, np.arange(1000, 4000))  # one-time scan, 30x the cache
        kept = hits_of(s, hot)
    with store_with_cache(tmp_path / "lru", "lru") as s:
        for _ in range(20):
            hits_of(s, hot)
        hits_of(s, np.arange(1000, 4000))
        lru_kept = hits_of(s, hot)
    assert lru_kept == 0  # LRU loses the whole hot set to the scan
    assert kept >= 45, f"{policy} kept {kept} of 50 hot rows"


def test_recency_wins_on_a_shifting_working_set(tmp_path):
    # working sets of 80 rows, each used 10 times then never again: recency is what matters
    rates = {}
    for policy in ("lru", "lfu", "adaptive"):
        with store_with_cache(tmp_path / policy, policy) as s:
            rng = np.random.default_rng(0)
            for phase in range(15):
                ws = np.arange(80) + 1000 * phase
                hits_of(s, rng.permutation(np.tile(ws, 10)))
            st = s.stats()["tables"]["t"]
            rates[policy] = st["hits"] / st["lookups"]
    assert rates["lru"] > 0.85
    assert rates["adaptive"] >= rates["lru"] - 0.02
    assert rates["lfu"] < rates["lru"]


def test_pinned_hits_are_never_evicted_within_a_batch(tmp_path):
    with store_with_cache(tmp_path / "s", "adaptive", cache_rows=64) as s:
        for _ in range(5):
            s.lookup("t", torch.arange(64))
        # a batch with 64 resident rows and 100 new ones: the new ones cannot evict the batch's
        # own rows, so they are served from SCM (bypass) and results are still exact
        batch = torch.cat([torch.arange(64), torch.arange(5000, 5100)])
        ref = ts.Store(tmp_path / "ref", ddr_bytes=1 << 20)
        ref.create_table(ts.TableSpec("t", 20_000, 4, optimizer=ts.SGD(0.1)))
        assert torch.equal(s.lookup("t", batch), ref.lookup("t", batch))
        st = s.stats()["tables"]["t"]
        assert st["bypassed"] >= 100 and st["rows_in_dram"] == 64
        ref.close()
