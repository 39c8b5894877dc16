"""Copy-on-write checkpoint snapshots (issue 4): while the background writer copies the rows
of a checkpoint, training updates, evictions, write_rows, reset_table, drop_table, DRAM
re-planning and close change them; the checkpoint must still hold exactly the values of the
moment it was taken (the same bytes a synchronous snapshot writes). Real stores on disk; the
writer is slowed or held between its chunks through ``writer._fill_hook``."""

import glob
import os
import threading
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import ckpt
from tierstore.ckpt import writer

ROWS = 3000
S_IDS = np.arange(120, dtype=np.int64) * 7919  # every id the sparse table ever sees


def make_store(path, ddr_bytes=60_000, policy="adaptive"):
    """A dense table that churns between DRAM and SCM, one held whole, a float16 one (the
    torch update path) and a sparse-id one."""
    st = ts.Store(path, ddr_bytes=ddr_bytes, policy=policy)
    st.create_table(ts.TableSpec("a", ROWS, 8, optimizer=ts.RowWiseAdagrad(lr=0.1), seed=3))
    st.create_table(ts.TableSpec("b", 300, 4, optimizer=ts.Adagrad(lr=0.1)))
    st.create_table(ts.TableSpec("h", 400, 4, dtype="float16", optimizer=ts.SGD(lr=0.1)))
    st.create_table(ts.TableSpec("s", 10**12, 4, optimizer=ts.SGD(lr=0.1), id_space="sparse"))
    return st


def train(st, rng, steps=2):
    for _ in range(steps):
        ids = rng.zipf(1.3, 400) % ROWS
        st.apply_gradients("a", torch.from_numpy(ids), torch.randn(len(ids), 8))
        st.apply_pooled_gradients("a", torch.from_numpy(rng.integers(0, ROWS, 60)),
                                  torch.tensor([0, 30]), torch.randn(2, 8))
        st.apply_gradients("b", torch.from_numpy(rng.integers(0, 300, 50)), torch.randn(50, 4))
        st.apply_gradients("h", torch.from_numpy(rng.integers(0, 400, 50)), torch.randn(50, 4))
        st.apply_gradients("s", torch.from_numpy(rng.choice(S_IDS, 30)), torch.randn(30, 4))


def churn(st, rng):
    """Lookups of many other rows: evicts (and writes back) rows of table a."""
    st.lookup("a", torch.from_numpy(rng.integers(0, ROWS, 1500)))


def rows_of(st, t):
    return S_IDS if t == "s" else np.arange(st.open_table(t).spec.num_rows)


def dump(st, tables=None):
    """Weights and state of every row a test can touch, per table (the checkpoint-time truth)."""
    return {t: st.read_rows(t, rows_of(st, t)) for t in (tables or st.tables())}


def same(got, want):
    assert got.keys() == want.keys()
    for t in want:
        assert np.array_equal(got[t][0], want[t][0]), t
        assert np.array_equal(got[t][1], want[t][1]), t


class Gate:
    """Writer hook: the writer stops after its first chunk until ``go`` is set."""

    def __init__(self):
        self.reached = threading.Event()
        self.go = threading.Event()
        self.calls = 0

    def __call__(self, table, lo, hi):
        self.calls += 1
        if not self.reached.is_set():
            self.reached.set()
            assert self.go.wait(60), "the test never released the writer"


@pytest.fixture
def gate(monkeypatch):
    g = Gate()
    monkeypatch.setattr(writer, "COW_CHUNK_ROWS", 7)
    monkeypatch.setattr(writer, "_fill_hook", g)
    yield g
    g.go.set()


def held_checkpoint(st, root, gate, **kw):
    """A copy-on-write checkpoint whose writer is held after its first chunk."""
    h = ckpt.checkpoint(st, root, kw.pop("policy", "full"), 32, keep=None, **kw)
    assert h.snapshot["mode"] == "cow"
    assert gate.reached.wait(30)
    return h


def restored(st, h):
    st.restore(h.path)
    return dump(st)


def test_training_evictions_and_write_rows_during_snapshot(tmp_path, rng, gate):
    """Rows updated in DRAM (fused kernel and float16 torch path), on SCM, evicted, written by
    write_rows and never touched: all come back as they were when checkpoint() returned."""
    st = make_store(tmp_path / "s")
    train(st, rng, 4)
    churn(st, rng)
    want = dump(st)
    h = held_checkpoint(st, tmp_path / "ck", gate)
    ev = st.stats()["tables"]["a"]["evictions"]
    for _ in range(3):
        train(st, rng)
        churn(st, rng)
    assert st.stats()["tables"]["a"]["evictions"] > ev  # pending rows moved to SCM
    for t in ("a", "s"):  # write_rows over pending rows (some resident, some on SCM)
        r = np.sort(rng.choice(rows_of(st, t), 40, replace=False))
        w, s = st.read_rows(t, r)
        st.write_rows(t, r, w + 1, s + 1)
    assert dump(st)["a"][0].tobytes() != want["a"][0].tobytes()
    gate.go.set()
    man = h.wait()
    assert man["kind"] == "full" and h.stats["rows_copied_on_write"] > 0
    assert all(st._entry(t).cache.cow is None for t in st.tables())  # detached when done
    same(restored(st, h), want)
    st.close()


def test_same_bytes_as_sync_snapshot(tmp_path, rng, monkeypatch):
    """A copy-on-write checkpoint with training during its write and a synchronous one of the
    same state write identical chunks (4-bit adaptive, state fp32)."""
    st = make_store(tmp_path / "s")
    train(st, rng, 4)
    churn(st, rng)
    ckpt.checkpoint(st, tmp_path / "sync", "full", 4, snapshot="sync", wait=True)
    monkeypatch.setattr(writer, "COW_CHUNK_ROWS", 5)
    monkeypatch.setattr(writer, "_fill_hook", lambda *a: time.sleep(0.0002))
    h = ckpt.checkpoint(st, tmp_path / "cow", "full", 4, snapshot="cow")
    while not h.done():
        train(st, rng, 1)
        churn(st, rng)
    h.wait()
    assert h.stats["rows_copied_on_write"] > 0
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "sync/ckpt-*/*.zst")))
    assert names and names == sorted(
        os.path.basename(p) for p in glob.glob(str(tmp_path / "cow/ckpt-*/*.zst")))
    for n in names:
        a = open(glob.glob(str(tmp_path / "sync/ckpt-*" / n))[0], "rb").read()
        b = open(glob.glob(str(tmp_path / "cow/ckpt-*" / n))[0], "rb").read()
        assert a == b, n
    st.close()


def test_concurrent_training_while_writer_copies(tmp_path, rng, monkeypatch):
    """No holding: the writer copies 3 rows at a time while training, evictions and write-backs
    run on the other thread until the write is done; incremental checkpoints too."""
    st = make_store(tmp_path / "s", ddr_bytes=40_000)
    monkeypatch.setattr(writer, "COW_CHUNK_ROWS", 3)
    monkeypatch.setattr(writer, "_fill_hook", lambda *a: time.sleep(0))
    root = tmp_path / "ck"
    wants, handles = [], []
    for i in range(3):
        train(st, rng, 3)
        churn(st, rng)
        wants.append(dump(st))
        h = ckpt.checkpoint(st, root, "incremental", 32, keep=None)
        steps = 0
        while not h.done():
            train(st, rng, 1)
            churn(st, rng)
            if steps % 5 == 0:
                st.flush()
            steps += 1
        h.wait()
        handles.append(h)
    assert [h.kind for h in handles] == ["full", "cumulative", "cumulative"]
    for h, want in zip(handles, wants):
        same(restored(st, h), want)
    st.close()


def test_reset_table_during_snapshot(tmp_path, rng, gate):
    """reset_table copies the table's pending rows before clearing it."""
    st = make_store(tmp_path / "s")
    train(st, rng, 4)
    want = dump(st)
    h = held_checkpoint(st, tmp_path / "ck", gate)
    st.reset_table("a")
    st.reset_table("s")
    train(st, rng, 2)
    gate.go.set()
    h.wait()
    same(restored(st, h), want)
    st.close()


def test_drop_replan_and_close_during_snapshot(tmp_path, rng, gate):
    """drop_table, a DRAM re-plan (a new table replaces every slab) and close all copy the
    pending rows before their slab goes; the checkpoint completes after close."""
    st = make_store(tmp_path / "s")
    train(st, rng, 4)
    churn(st, rng)
    want = dump(st)
    h = held_checkpoint(st, tmp_path / "ck", gate)
    st.drop_table("b")
    st.create_table(ts.TableSpec("z", 100, 2))  # re-plans DRAM: a, h and s get new slabs
    train_tables = [t for t in st.tables() if t != "z"]
    assert train_tables == ["a", "h", "s"]
    st.apply_gradients("a", torch.arange(ROWS), torch.ones(ROWS, 8))
    st.close()
    gate.go.set()
    h.wait()
    st = ts.Store(tmp_path / "s", ddr_bytes=60_000)
    st.restore(h.path)
    got = dump(st, ["a", "b", "h", "s"])
    same(got, want)
    st.close()


def test_snapshot_mode_choice(tmp_path, rng):
    st = make_store(tmp_path / "s")
    assert writer.resolve_snapshot(st, "auto") == "cow"
    assert writer.resolve_snapshot(st, "sync") == "sync"
    with pytest.raises(ValueError, match="snapshot must be"):
        st.checkpoint(tmp_path / "ck", snapshot="lazy")
    train(st, rng)
    want = dump(st)
    h = ckpt.checkpoint(st, tmp_path / "ck", "full", 32, snapshot="sync")
    assert h.snapshot["mode"] == "sync"
    train(st, rng)
    h.wait()
    same(restored(st, h), want)
    with pytest.raises(ts.InvalidInput, match="sorted distinct"):
        st.snapshot_rows("a", [3, 1])
    snap = st.snapshot_rows("a", [1, 3])
    with pytest.raises(RuntimeError, match="in progress"):
        st.snapshot_rows("a", [5])
    snap.release()
    assert st._entry("a").cache.cow is None
    st.close()

    class Proxy:  # no snapshot_rows: "auto" falls back to a synchronous copy
        pass
    assert writer.resolve_snapshot(Proxy(), "auto") == "sync"
    with pytest.raises(ValueError, match="snapshot_rows"):
        writer.resolve_snapshot(Proxy(), "cow")
    shared = ts.Store(tmp_path / "svc", ddr_bytes=1 << 20, shm_unlink=False)
    try:
        assert writer.resolve_snapshot(shared, "auto") == "sync"  # clients write its slabs
    finally:
        shared.close()


def test_eviction_waits_for_a_copy_in_progress(tmp_path, rng, monkeypatch):
    """The writer has found where its rows live (DRAM positions) and not yet copied them: an
    eviction that would refill those slots with other rows must wait for the copy to end.
    The writer's copy kernel is replaced by a numpy equivalent that pauses in between."""
    from tierstore.optim import kernels
    st = make_store(tmp_path / "s", policy="lru")
    train(st, rng, 4)
    churn(st, rng)
    first = st.written_rows("a")[:7]
    assert st._entry("a").cache.capacity < 1000
    st.lookup("a", torch.from_numpy(first))  # the writer's first chunk is resident
    want = dump(st)
    monkeypatch.setattr(writer, "COW_CHUNK_ROWS", 7)
    in_copy, evicted = threading.Event(), threading.Event()

    def slow_copy(flags, rows, lo, hi, index, weights, state, w_out, s_out, base, copied,
                  missing):
        k = np.arange(lo, hi)
        k = k[flags[rows[k]] != 0]
        pos = index[rows[k]].astype(np.int64)
        if not in_copy.is_set():
            in_copy.set()
            evicted.wait(0.5)  # the lock holds the eviction back, so this times out
        res = pos > 0
        w_out[k[res] - base] = weights[pos[res]]
        s_out[k[res] - base] = state[pos[res]]
        n, m = int(res.sum()), int((~res).sum())
        copied[:n] = k[res]
        missing[:m] = k[~res]
        return n, m

    monkeypatch.setattr(kernels, "copy_flagged_rows", slow_copy)
    h = ckpt.checkpoint(st, tmp_path / "ck", "full", 32, keep=None)
    assert in_copy.wait(30)
    st.lookup("a", torch.arange(ROWS - 1000, ROWS))  # LRU: evicts every resident row
    evicted.set()
    assert not st._entry("a").cache.positions(first).any()
    h.wait()
    same(restored(st, h), want)
    st.close()
