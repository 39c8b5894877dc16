"""Open copy-on-write snapshots (issue 4, the stall): ``checkpoint()`` only takes each
table's modified-row record (``Store.take_modified(t, deferred=True)``) and returns; the
writer thread enumerates it, decides the kind and narrows the snapshot to the rows to save.
While it has not (held here through ``writer._prepare_hook``), training, evictions of slots
whose flags were taken, write_rows, reset_table and close go on; the checkpoint must hold
exactly the state of the moment it was taken, and the next one exactly what changed after.
Real stores on disk; the row-file scan of written rows on real sparse files."""

import threading

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import ckpt
from tierstore.ckpt import writer
from tierstore.tiers.rowfile import RowFile

from test_ckpt_cow import ROWS, churn, dump, make_store, restored, rows_of, same, train


class Hold:
    """Prepare hook: the writer stops before deciding anything until ``go`` is set."""

    def __init__(self):
        self.reached = threading.Event()
        self.go = threading.Event()

    def __call__(self, handle):
        self.reached.set()
        assert self.go.wait(60), "the test never released the writer"
        self.go.clear()
        self.reached.clear()


@pytest.fixture
def hold(monkeypatch):
    h = Hold()
    monkeypatch.setattr(writer, "_prepare_hook", h)
    yield h
    h.go.set()


def open_checkpoint(st, root, hold, policy="incremental", bits=32):
    h = ckpt.checkpoint(st, root, policy, bits, keep=None)
    assert h.snapshot["mode"] == "cow" and h.snapshot["deferred"]
    assert hold.reached.wait(30)
    assert h._kind is None and not h.done()  # nothing decided yet
    return h


@pytest.mark.parametrize("write_rows", [False, True])
def test_open_window_keeps_both_checkpoints_exact(tmp_path, rng, hold, write_rows):
    """Rows modified before the checkpoint whose slots are evicted and refilled before the
    writer reads the record are saved; rows modified after it (even rows modified before too,
    still flagged in their slot) are saved by the next one, not lost; every value is the one
    of its moment. write_rows during the window: the checkpoint keeps the old values (what
    write_rows sets is not a modification, so the next delta cannot be compared)."""
    st = make_store(tmp_path / "s")
    root = tmp_path / "ck"
    train(st, rng, 4)
    churn(st, rng)
    base = ckpt.checkpoint(st, root, "consecutive", 32, keep=None)
    hold.reached.wait(30)
    hold.go.set()
    base.wait()
    train(st, rng, 3)  # modified since the baseline: flags in slots and in the tracker
    want1 = dump(st)
    h1 = open_checkpoint(st, root, hold, "consecutive")
    ev = st.stats()["tables"]["a"]["evictions"]
    for _ in range(3):
        train(st, rng)
        churn(st, rng)
    assert st.stats()["tables"]["a"]["evictions"] > ev  # taken slots refilled
    for t in ("a", "s") if write_rows else ():  # during the window (DRAM and SCM rows)
        r = np.sort(rng.choice(rows_of(st, t), 30, replace=False))
        w, s = st.read_rows(t, r)
        st.write_rows(t, r, w * 2, s + 1)
    hold.go.set()
    m1 = h1.wait()
    assert h1.kind == "delta" and m1["kind"] == "delta"
    assert h1.snapshot["rows"] > 0 and h1.stats["rows_copied_on_write"] > 0
    train(st, rng, 2)
    want2 = dump(st)
    h2 = open_checkpoint(st, root, hold, "consecutive")
    hold.go.set()
    assert h2.wait()["kind"] == "delta"
    if not write_rows:
        same(restored(st, h2), want2)
    same(restored(st, h1), want1)
    st.close()


def test_deferred_record_matches_plain_take(tmp_path):
    """Two stores trained identically: one takes its record deferred, the other plainly, at
    the same point; both see the same rows then, and the same rows after."""
    stores = [make_store(tmp_path / "x"), make_store(tmp_path / "y")]
    rngs = [np.random.default_rng(9), np.random.default_rng(9)]
    for st, g in zip(stores, rngs):
        train(st, g, 4)
        churn(st, g)
    snaps = {t: stores[0].take_modified(t, deferred=True) for t in stores[0].tables()}
    plain = {t: stores[1].take_modified(t) for t in stores[1].tables()}
    plain_written = {t: stores[1].written_rows(t) for t in stores[1].tables()}
    for st, g in zip(stores, rngs):  # more training and evictions before the enumeration
        train(st, g, 2)
        churn(st, g)
    for t, snap in snaps.items():
        got = snap.take_modified()
        assert np.array_equal(got, plain[t]), t
        w = snap.written_rows()
        # SCM rows written after the take may be included; every row written then is
        assert np.isin(plain_written[t], w).all(), t
        snap.fix(np.empty(0, np.int64))
    for t in snaps:
        assert np.array_equal(stores[0].take_modified(t), stores[1].take_modified(t)), t
    for st in stores:
        st.close()


def test_reset_and_close_wait_for_the_writer_to_decide(tmp_path, rng, hold):
    """reset_table and close during the open window wait until the writer has fixed the
    rows (it needs nothing from them), then copy the pending ones: the checkpoint is exact."""
    st = make_store(tmp_path / "s")
    train(st, rng, 4)
    churn(st, rng)
    want = dump(st)
    h = open_checkpoint(st, tmp_path / "ck", hold, "full")
    done = threading.Event()

    def reset_then_close():
        st.reset_table("a")
        train(st, np.random.default_rng(1), 1)
        st.close()
        done.set()

    t = threading.Thread(target=reset_then_close)
    t.start()
    assert not done.wait(0.3)  # reset_table is waiting for the writer's decision
    hold.go.set()
    t.join(60)
    assert done.is_set()
    h.wait()
    st = ts.Store(tmp_path / "s", ddr_bytes=60_000)
    same(restored(st, h), want)
    st.close()


def test_failed_decision_releases_and_next_is_a_baseline(tmp_path, rng, monkeypatch):
    """An error in the writer before the rows are decided detaches the open snapshots (the
    write path stops copying) and the next checkpoint is a baseline that restores exactly."""
    st = make_store(tmp_path / "s")
    train(st, rng, 2)

    def boom(handle):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(writer, "_prepare_hook", boom)
    with pytest.warns(UserWarning, match="disk on fire"):
        h = ckpt.checkpoint(st, tmp_path / "ck", "incremental", 32, keep=None)
        with pytest.raises(ckpt.CheckpointError, match="disk on fire"):
            h.wait()
    assert h.kind is None
    assert all(st._entry(t).cache.cow is None for t in st.tables())
    monkeypatch.setattr(writer, "_prepare_hook", None)
    train(st, rng, 2)
    want = dump(st)
    h2 = ckpt.checkpoint(st, tmp_path / "ck", "incremental", 32, keep=None)
    assert h2.kind == "full" and "disk on fire" in h2.reason
    h2.wait()
    same(restored(st, h2), want)
    st.close()


def test_row_file_scan_reads_data_extents_only(tmp_path):
    """written_rows of a sparse row file: exactly the rows written (against a scan of every
    record), none for a file of holes, none after clear."""
    spec = ts.TableSpec("t", 200_000, 16, optimizer=ts.RowWiseAdagrad(lr=0.1))
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    try:
        assert rf.written_rows().tolist() == []
        extents = rf._data_extents()
        assert sum(hi - lo for lo, hi in extents) < 1 << 20  # holes are not data
        rng = np.random.default_rng(0)
        for n in (1, 500, 20_000):
            rows = np.unique(rng.integers(0, spec.num_rows, n))
            rf.write(rows, rng.standard_normal((len(rows), 16)).astype(np.float32),
                     np.zeros((len(rows), 1), np.float32))
            rf.wait()  # writes finish in the background; read the records after
            full = np.flatnonzero(rf.records[:, rf.layout.flag_offset])
            got = rf.written_rows()
            assert np.array_equal(got, full)
            flags = np.zeros(spec.num_rows, np.uint8)
            assert rf.mark_written(flags) == len(full)
            assert np.array_equal(np.flatnonzero(flags), full)
        assert rf.written_rows()[-1] <= spec.num_rows - 1
        rf.write(np.array([spec.num_rows - 1]), np.ones((1, 16), np.float32),
                 np.zeros((1, 1), np.float32))  # the last record, at the end of the file
        assert rf.written_rows()[-1] == spec.num_rows - 1
        rf.clear()
        assert rf.written_rows().tolist() == []
    finally:
        rf.close()
