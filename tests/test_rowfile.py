"""The SCM row file: slab-direct reads and writes, and write-behind (tierstore/tiers/rowfile.py)."""

import threading

import numpy as np
import pytest

import tierstore as ts
from tierstore.rowinit import initial_rows
from tierstore.tiers import rowfile, write_behind
from tierstore.tiers.rowfile import RowFile

SPECS = [
    ts.TableSpec("f32", 500, 8, optimizer=ts.RowWiseAdagrad(lr=0.1)),
    ts.TableSpec("f16_odd", 500, 5, dtype="float16", optimizer=ts.Adagrad(lr=0.1)),
    ts.TableSpec("sgd", 500, 3, optimizer=ts.SGD(lr=0.1), init="normal"),
]


def _values(spec, n, rng):
    lay = spec.layout
    w = rng.standard_normal((n, spec.dim)).astype(lay.np_dtype)
    s = rng.random((n, lay.state_dim)).astype(np.float32)
    return w, s


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_slab_direct_read_and_write_match_read_and_write(tmp_path, spec):
    rng = np.random.default_rng(1)
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    lay = spec.layout
    written = np.unique(rng.integers(0, spec.num_rows, 120))
    w, s = _values(spec, len(written), rng)
    rf.write(written, w, s)

    # write_slots: values taken from slab rows, written to other rows
    slab_w = np.zeros((40, spec.dim), lay.np_dtype)
    slab_s = np.zeros((40, lay.state_dim), np.float32)
    slab_w[1:], slab_s[1:] = _values(spec, 39, rng)
    pos = rng.permutation(np.arange(1, 40))[:20]
    others = np.setdiff1d(np.arange(spec.num_rows), written)[:20]
    rf.write_slots(others, slab_w, slab_s, pos)
    got_w, got_s = rf.read(others)
    assert np.array_equal(got_w, slab_w[pos]) and np.array_equal(got_s, slab_s[pos])

    # read_into: written rows, slot-written rows and never-written rows (initial values)
    ask = np.concatenate([written[:30], others[:10], np.setdiff1d(
        np.arange(spec.num_rows), np.concatenate([written, others]))[:15]])
    want_w, want_s = rf.read(ask)
    out_w = np.full((80, spec.dim), 7, lay.np_dtype)
    out_s = np.full((80, lay.state_dim), 7, np.float32)
    dest = rng.permutation(np.arange(1, 80))[:len(ask)]
    rf.read_into(ask, out_w, out_s, dest)
    assert np.array_equal(out_w[dest], want_w) and np.array_equal(out_s[dest], want_s)
    untouched = np.setdiff1d(np.arange(80), dest)
    assert (out_w[untouched] == 7).all() and (out_s[untouched] == 7).all()
    assert rf.rows_written() == len(written) + len(others)
    rf.close()

    # and what was written is what a fresh open reads
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    got_w, _ = rf.read(written)
    assert np.array_equal(got_w, w)
    rf.close()


def _hold_writer():
    """Block the process's background write thread until the returned event is set."""
    go, started = threading.Event(), threading.Event()

    def hold():
        started.set()
        go.wait(10)
    write_behind._current().submit(hold)
    assert started.wait(5)
    return go


def test_write_behind_reads_wait_only_for_their_rows(tmp_path):
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    rng = np.random.default_rng(2)
    w, s = _values(spec, 3, rng)
    rows = np.array([10, 20, 30])
    go = _hold_writer()
    try:
        rf.write(rows, w, s)  # queued behind the held job: not in the file yet
        assert not rf._pending[0].done()
        # rows that are not being written are read at once, without waiting
        other_w, _ = rf.read(np.array([11, 40]))
        assert not rf._pending[0].done()
        assert other_w.shape == (2, spec.dim)

        # a row that is being written: the read waits for the write and sees it
        result = {}
        reader = threading.Thread(target=lambda: result.update(w=rf.read(np.array([20]))[0]))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive(), "the read did not wait for the pending write of its row"
    finally:
        go.set()
    reader.join(5)
    assert np.array_equal(result["w"], w[1:2])
    rf.close()


def test_background_write_error_comes_out_of_the_next_call(tmp_path):
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    w, s = _values(spec, 2, np.random.default_rng(3))
    rf.write(np.array([1, 2]), w, s)
    rf.wait()
    rf.jfd, good = -1, rf.jfd  # the journal append will fail (bad file descriptor)
    rf.write(np.array([3, 4]), w, s)
    with pytest.raises(OSError):
        rf.read(np.array([3]))
    rf.jfd = good
    # the file is still usable and the failed rows kept their old (initial) values
    fresh = initial_rows(spec.init, spec.seed, np.array([3, 4]), spec.dim, np.float32)
    assert np.array_equal(rf.read(np.array([3, 4]))[0], fresh)
    assert rf.rows_written() == 2
    assert np.array_equal(rf.read(np.array([1, 2]))[0], w)
    rf.close()


@pytest.fixture
def deferred_writes():
    """This process's row-file writes deferred (as in tierstored) for one test."""
    write_behind.defer()
    try:
        yield
    finally:
        write_behind.defer(False)


def _in_file(rf, rows):
    """Rows as the file's mapping holds them now (no wait for a pending write)."""
    lay = rf.layout
    rec = rf.records[rows]
    return (rec[:, :lay.state_offset].copy().view(lay.np_dtype).reshape(len(rows), -1),
            rec[:, lay.flag_offset].copy())


def test_deferred_writes_run_when_asked_or_when_waited_for(tmp_path, deferred_writes):
    """Deferred (tierstored's mode): a write is not in the file until run_deferred() runs it,
    oldest first, or something waits for it (a read of its rows, the next write of the file,
    flush); it runs once; its error comes out of the next call on the file, not run_deferred."""
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    other = RowFile(str(tmp_path / "u.rows"), spec)
    rng = np.random.default_rng(7)
    rows = np.array([5, 9])
    w1, s1 = _values(spec, 2, rng)
    w2, s2 = _values(spec, 2, rng)
    rf.write(rows, w1, s1)
    other.write(rows, w2, s2)
    assert write_behind.busy()
    assert (_in_file(rf, rows)[1] == 0).all() and (_in_file(other, rows)[1] == 0).all()
    assert write_behind.run_deferred() == 2  # both files, in submission order
    assert np.array_equal(_in_file(rf, rows)[0], w1) and (_in_file(rf, rows)[1] == 1).all()
    assert np.array_equal(_in_file(other, rows)[0], w2)
    assert not write_behind.busy() and write_behind.run_deferred() == 0

    rf.write(rows, w2, s2)  # a read of its rows runs it first
    assert np.array_equal(_in_file(rf, rows)[0], w1)
    assert np.array_equal(rf.read(rows)[0], w2)
    assert write_behind.run_deferred() == 1 and np.array_equal(rf.read(rows)[1], s2)  # once

    rf.write(rows, w1, s1)  # flush runs it too
    rf.flush()
    assert np.array_equal(_in_file(rf, rows)[0], w1)
    write_behind.run_deferred()

    rf.jfd, good = -1, rf.jfd  # a failing write: run_deferred does not raise, the file does
    rf.write(rows, w2, s2)
    assert write_behind.run_deferred() == 1
    with pytest.raises(OSError):
        rf.read(rows)
    rf.jfd = good
    assert np.array_equal(rf.read(rows)[0], w1)
    rf.close()
    other.close()


def test_switching_back_to_the_thread_runs_deferred_writes(tmp_path):
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    w, s = _values(spec, 1, np.random.default_rng(8))
    write_behind.defer()
    try:
        rf.write(np.array([3]), w, s)
        assert _in_file(rf, np.array([3]))[1][0] == 0
    finally:
        write_behind.defer(False)
    assert not write_behind.deferred()
    assert _in_file(rf, np.array([3]))[1][0] == 1 and not write_behind.busy()
    rf.write(np.array([4]), w, s)  # on the thread again
    rf.wait()
    assert np.array_equal(_in_file(rf, np.array([4]))[0], w)
    rf.close()


def test_update_computes_on_the_background_thread(tmp_path):
    """RowFile.update returns before its compute runs (on the write thread); a read of its rows
    waits for it and sees the computed values, other rows do not wait; a compute that raises
    fails the next call and leaves the rows as they were."""
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    w, s = _values(spec, 3, np.random.default_rng(4))
    rf.write(np.array([1, 2, 3]), w, s)
    rf.wait()
    gate = threading.Event()
    ran_on = []

    def compute(w_job, s_job):
        gate.wait(10)
        ran_on.append(threading.current_thread().name)
        w_job *= 2
        s_job += 1

    rf.update(np.array([1, 2]), w[:2].copy(), s[:2].copy(), compute)
    assert not ran_on  # update returned first
    assert np.array_equal(rf.read(np.array([3]))[0], w[2:])  # not held by the job: no wait
    gate.set()
    got_w, got_s = rf.read(np.array([1, 2]))
    assert ran_on and ran_on[0].startswith("tierstore-rowfile")
    assert np.array_equal(got_w, w[:2] * 2) and np.array_equal(got_s, s[:2] + 1)

    def broken(w_job, s_job):
        w_job[:] = 0
        raise RuntimeError("compute failed")

    rf.update(np.array([1]), w[:1].copy(), s[:1].copy(), broken)
    with pytest.raises(RuntimeError, match="compute failed"):
        rf.read(np.array([1]))
    assert np.array_equal(rf.read(np.array([1]))[0], w[:1] * 2)
    rf.close()


@pytest.mark.parametrize("mode", ["mmap", "pwrite"])
def test_both_write_paths_store_the_same_records(tmp_path, monkeypatch, mode):
    """The background thread writes through the mapping or with pwrite per row (chosen by the
    size of the open row files, or TIERSTORE_SCM_WRITES): the file holds the same bytes, and
    a reopen reads what was written."""
    monkeypatch.setattr(rowfile, "WRITE_MODE", mode)
    spec = SPECS[1]  # float16, odd dim: padding bytes inside the record
    rng = np.random.default_rng(4)
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    rows = rng.permutation(spec.num_rows)[:200]
    w, s = _values(spec, len(rows), rng)
    rf.write(rows, w, s)
    rf.write(rows[:50], w[50:100], s[50:100])  # rewrite some rows
    rf.flush()
    ref = spec.layout.pack(np.concatenate([w[50:100], w[50:]]),
                           np.concatenate([s[50:100], s[50:]]))
    got = np.fromfile(str(tmp_path / "t.rows"), dtype=np.uint8)[rowfile.HEADER:] \
        .reshape(spec.num_rows, -1)[rows]
    assert np.array_equal(got, ref)
    assert rf.rows_written() == 200
    rf.close()
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    assert rf.rows_written() == 200
    got_w, got_s = rf.read(rows)
    assert np.array_equal(got_w[:50], w[50:100]) and np.array_equal(got_s[50:], s[50:])
    rf.close()


def test_auto_write_path_follows_the_size_of_open_row_files(monkeypatch):
    monkeypatch.setattr(rowfile, "WRITE_MODE", "auto")
    monkeypatch.setattr(rowfile, "_dirty_background_bytes", lambda: 1 << 30)
    monkeypatch.setattr(rowfile, "_open_bytes", [512 << 20])
    assert rowfile._write_through_mapping()
    monkeypatch.setattr(rowfile, "_open_bytes", [2 << 30])
    assert not rowfile._write_through_mapping()


def test_slab_direct_calls_refuse_arrays_they_could_not_write_in_place(tmp_path):
    spec = SPECS[0]
    rf = RowFile(str(tmp_path / "t.rows"), spec)
    w = np.zeros((10, 2 * spec.dim), np.float32)[:, ::2]  # a strided view
    s = np.zeros((10, spec.layout.state_dim), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        rf.read_into(np.array([1, 2]), w, s, np.array([3, 4]))
    rf.close()


def test_write_order_is_ascending_and_stable():
    """Writes go to the file in ascending row order (pwrite measured ~1.9x faster than in a
    random order); equal ids keep their input order, as numpy's stable argsort."""
    rng = np.random.default_rng(9)
    for n, num_rows in [(0, 10), (1, 10), (5000, 1_000_000), (3000, 100), (64, 2**31)]:
        rows = rng.integers(0, num_rows, n).astype(np.int64)
        order = rowfile._write_order(rows, num_rows)
        assert np.array_equal(order, np.argsort(rows, kind="stable"))
    big = np.array([5, 3, 9], dtype=np.int64)  # beyond the radix sort's 31 bits: input order
    assert np.array_equal(rowfile._write_order(big, 2**31 + 1), [0, 1, 2])
