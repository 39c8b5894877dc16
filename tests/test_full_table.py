"""A dense table that fits in its DRAM share is loaded whole at open, row r in slot r, so the
fast path reads positions as ids + 1 without touching the index (DDRCache.full_table)."""

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import Service, dump, full_table

ROWS, DIM = 3000, 16


def _spec(name="t", rows=ROWS):
    return ts.TableSpec(name, rows, DIM, optimizer=ts.RowWiseAdagrad(lr=0.05, eps=1e-8), seed=3)


def _train(api, rng, steps=6, rows=ROWS):
    for _ in range(steps):
        ids = torch.from_numpy(rng.integers(0, rows, 400))
        off = torch.arange(0, 400, 8)
        api.pooled("t", ids, off)
        api.apply_pooled_gradients("t", ids, off, torch.from_numpy(
            rng.standard_normal((50, DIM)).astype(np.float32)))


def test_fitting_table_is_loaded_whole_in_identity_slots(tmp_path):
    with ts.Store(tmp_path / "big", ddr_bytes=1 << 26) as store:
        store.create_table(_spec())
        cache = store._entry("t").cache
        st = store.stats()["tables"]["t"]
        assert cache.full_table
        assert st["rows_in_dram"] == ROWS and st["lookups"] == 0
        assert np.array_equal(cache.row_of_pos[1:ROWS + 1], np.arange(ROWS))
        assert np.array_equal(cache.index.array, np.arange(1, ROWS + 1))
        got = full_table(store, "t")
        st = store.stats()["tables"]["t"]
        assert st["misses"] == 0 and st["hits"] == st["lookups"] == ROWS
    # the same rows as a store that generates them on first read from SCM
    with ts.Store(tmp_path / "small", ddr_bytes=64 << 10) as small:
        small.create_table(_spec())
        assert not small._entry("t").cache.full_table
        assert torch.equal(got, full_table(small, "t"))


def test_fitting_table_trains_and_reopens_to_what_was_written(tmp_path, rng):
    """Training on a preloaded table equals training on a cache that evicts, and reopening
    (whole, or with a small DRAM share) gives back the written rows and state bit for bit."""
    with ts.Store(tmp_path / "a", ddr_bytes=1 << 26) as a, \
            ts.Store(tmp_path / "b", ddr_bytes=32 << 10) as b:
        a.create_table(_spec())
        b.create_table(_spec())
        _train(a, np.random.default_rng(5))
        _train(b, np.random.default_rng(5))
        want_w, want_s = dump(a, "t")
        got_w, got_s = dump(b, "t")
        np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-6)
        a.flush()
    for ddr in (1 << 26, 32 << 10):
        with ts.Store(tmp_path / "a", ddr_bytes=ddr) as again:
            w, s = dump(again, "t")
            assert again._entry("t").cache.full_table == (ddr == 1 << 26)
            assert np.array_equal(w, want_w) and np.array_equal(s, want_s)


@pytest.mark.parametrize("bad", [[0, ROWS], [-1, 2]])
def test_fast_path_range_errors_leave_the_table_intact(tmp_path, bad):
    with ts.Store(tmp_path / "s", ddr_bytes=1 << 26) as store:
        store.create_table(_spec())
        before = full_table(store, "t")
        with pytest.raises(ts.InvalidInput, match="num_rows=3000|>= 0"):
            store.pooled("t", torch.tensor(bad), torch.tensor([0]))
        with pytest.raises(ts.InvalidInput, match="num_rows=3000|>= 0"):
            store.lookup("t", torch.tensor(bad))
        assert torch.equal(full_table(store, "t"), before)


def test_service_client_reads_a_fitting_table_by_id(tmp_path):
    """Through tierstored: the layout says full_table, the client's unpinned fast path gives
    the embedded store's values, and a bad id is still a clear error."""
    batches_rng = np.random.default_rng(9)
    svc = Service(tmp_path / "svc", ddr_bytes="8MiB").start()
    try:
        with svc.connect() as conn:
            conn.create_table(_spec())
            _train(conn, batches_rng)
            ids = torch.arange(ROWS)
            got = conn.lookup("t", ids).clone()
            pooled = conn.pooled("t", ids[:400], torch.arange(0, 400, 8)).clone()
            with pytest.raises(ts.InvalidInput, match="num_rows=3000|>= 0"):
                conn.pooled("t", torch.tensor([0, ROWS]), torch.tensor([0]))
            st = conn.stats()["tables"]["t"]
            assert conn._tables["t"].full_table
    finally:
        assert svc.stop() == 0
    assert st["rows_in_dram"] == ROWS and st["misses"] == 0
    with ts.Store(tmp_path / "ref", ddr_bytes=1 << 26) as ref:
        ref.create_table(_spec())
        _train(ref, np.random.default_rng(9))
        assert torch.equal(got, full_table(ref, "t"))
        want = ref.pooled("t", ids[:400], torch.arange(0, 400, 8))
        torch.testing.assert_close(pooled, want, rtol=0, atol=1e-6)


def test_writer_pin_on_a_whole_table_holds_off_its_retirement(tmp_path):
    """A whole table's writer pins one sentinel slot, not every row: a re-plan that replaces
    the slab must still wait for it (else an update could land in a retired slab)."""
    import threading
    import time
    svc = Service(tmp_path / "svc", ddr_bytes="8MiB").start()
    try:
        with svc.connect() as a, svc.connect() as b:
            a.create_table(_spec("w", rows=60_000))
            a.apply_gradients("w", torch.arange(10), torch.ones(10, DIM))
            table = a._tables["w"]
            assert table.full_table
            table._pin(np.arange(5, dtype=np.int64))  # as in the middle of an update
            done = threading.Event()
            worker = threading.Thread(target=lambda: (b.create_table(_spec("x", rows=60_000)),
                                                      done.set()))
            worker.start()
            time.sleep(1.0)
            assert not done.is_set(), "the slab was retired under a pinned writer"
            table.end_op()  # the update is done: its pin goes
            worker.join(20)
            assert done.is_set()
            assert a.stats()["tables"]["w"]["capacity_rows"] < 60_000
            a.apply_gradients("w", torch.arange(10), torch.ones(10, DIM))  # re-attaches
    finally:
        assert svc.stop() == 0


def test_a_fitting_table_over_the_preload_limit_fills_its_identity_slots_lazily(tmp_path,
                                                                               monkeypatch):
    """Above PRELOAD_MAX_BYTES a table that fits is not loaded at open (it would cost ~1 s/GB):
    rows enter slot = row id on first use, the index serves the fast path, values are exact."""
    from tierstore.tiers import ddr
    monkeypatch.setattr(ddr, "PRELOAD_MAX_BYTES", ROWS * 8)
    with ts.Store(tmp_path / "lazy", ddr_bytes=1 << 26) as lazy, \
            ts.Store(tmp_path / "whole", ddr_bytes=1 << 26 + 1) as whole:
        lazy.create_table(_spec())
        cache = lazy._entry("t").cache
        assert not cache.full_table and lazy.stats()["tables"]["t"]["rows_in_dram"] == 0
        ids = torch.tensor([5, 2999, 17, 5])
        got = lazy.lookup("t", ids)
        assert lazy.stats()["tables"]["t"]["rows_in_dram"] == 3
        assert [cache.row_of_pos[r + 1] for r in (5, 17, 2999)] == [5, 17, 2999]
        monkeypatch.setattr(ddr, "PRELOAD_MAX_BYTES", 1 << 40)
        whole.create_table(_spec())
        assert whole._entry("t").cache.full_table
        assert torch.equal(got, whole.lookup("t", ids))
        _train(lazy, np.random.default_rng(4))
        _train(whole, np.random.default_rng(4))
        assert torch.equal(full_table(lazy, "t"), full_table(whole, "t"))
