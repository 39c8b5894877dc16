"""Crash behaviour with a real child process killed by SIGKILL, and the one-owner lock."""

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import dump

CHILD_PRELUDE = textwrap.dedent("""
    import json, sys, time, numpy as np, torch
    import tierstore as ts
    path, mode = sys.argv[1], sys.argv[2]
    spec_a = ts.TableSpec("a", 2000, 16, optimizer=ts.RowWiseAdagrad(lr=0.1), seed=1)
    spec_b = ts.TableSpec("b", 300, 8, init="zeros", optimizer=ts.SGD(lr=1.0))
    store = ts.Store(path, ddr_bytes=64 * ts.Store.cached_row_bytes(spec_a)
                     + 32 * ts.Store.cached_row_bytes(spec_b), policy="lru")
    if "a" not in store.tables():
        store.create_table(spec_a); store.create_table(spec_b)
    rng = np.random.default_rng(int(sys.argv[3]))
""")

CHILD_FLUSH_THEN_WAIT = CHILD_PRELUDE + textwrap.dedent("""
    for step in range(30):
        ids = torch.from_numpy(rng.integers(0, 2000, 128))
        store.lookup("a", ids)
        store.apply_gradients("a", ids, torch.from_numpy(rng.standard_normal((128, 16)).astype("float32")))
    store.flush()
    e = store._entry("a")
    rows = np.arange(2000)
    w, s = e.backing.read(rows)
    pos = e.cache.positions(rows); res = pos > 0
    w[res] = e.cache.weights[pos[res]]; s[res] = e.cache.state[pos[res]]
    np.save(sys.argv[4], np.concatenate([w.view(np.uint32), s.view(np.uint32)], axis=1))
    print("flushed", flush=True)
    time.sleep(60)
""")

# Every row of "b" only ever holds k * ones(8) for an integer k (SGD lr 1, grads -1): a torn row
# would mix two values. Rows are evicted and written back continuously (cache of 32 rows).
CHILD_WORK_FOREVER = CHILD_PRELUDE + textwrap.dedent("""
    print("working", flush=True)
    while True:
        ids = torch.from_numpy(np.unique(rng.integers(0, 300, 64)))
        store.lookup("b", ids)
        store.apply_gradients("b", ids, -torch.ones(len(ids), 8))
        if rng.random() < 0.05:
            store.flush()
""")


def run_child(script, path, seed, extra=""):
    return subprocess.Popen([sys.executable, "-c", script, path, "x", str(seed), extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_flushed_state_survives_sigkill_bit_for_bit(tmp_path):
    path, expect = str(tmp_path / "s"), str(tmp_path / "expect.npy")
    child = run_child(CHILD_FLUSH_THEN_WAIT, path, 5, expect)
    line = child.stdout.readline()
    assert line.strip() == "flushed", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait()
    with ts.Store(path, ddr_bytes=1 << 20) as store:
        w, s = dump(store, "a")
        got = np.concatenate([w.view(np.uint32), s.view(np.uint32)], axis=1)
    np.testing.assert_array_equal(got, np.load(expect))


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.9])
def test_killed_mid_work_reopens_consistent(tmp_path, delay):
    path = str(tmp_path / "s")
    child = run_child(CHILD_WORK_FOREVER, path, int(delay * 10))
    assert child.stdout.readline().strip() == "working", child.stderr.read()
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with ts.Store(path, ddr_bytes=1 << 20) as store:
        assert sorted(store.tables()) == ["a", "b"]
        w = store.lookup("b", torch.arange(300))
        assert torch.equal(w, w[:, :1].expand(-1, 8)), "a row mixes two values (torn)"
        assert torch.equal(w, w.round()) and (w >= 0).all()
        # the store is fully usable afterwards
        store.apply_gradients("b", torch.tensor([0]), -torch.ones(1, 8))
        assert store.lookup("b", torch.tensor([0]))[0, 0] == w[0, 0] + 1


def test_second_process_gets_a_clear_error(tmp_path):
    path = str(tmp_path / "s")
    with ts.Store(path, ddr_bytes=1 << 20) as store:
        store.create_table(ts.TableSpec("t", 10, 4))
        code = ("import tierstore as ts, sys\n"
                "try:\n ts.Store(sys.argv[1])\n"
                "except ts.StoreLocked as e:\n print('LOCKED', e); sys.exit(3)\n")
        r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
        assert r.returncode == 3 and "LOCKED" in r.stdout and "another process" in r.stdout
        with pytest.raises(ts.StoreLocked):
            ts.Store(path)  # a second Store object in this process too
        assert store.lookup("t", torch.tensor([1])).shape == (1, 4)  # the owner is unaffected


def test_torn_journal_is_ignored_and_complete_journal_replayed(tmp_path):
    from tierstore.tiers.rowfile import RowFile
    spec = ts.TableSpec("r", 100, 4, init="zeros")
    path = str(tmp_path / "r.rows")
    rf = RowFile(path, spec)
    rows = np.array([3, 7])
    rf.write(rows, np.full((2, 4), 1.0, np.float32), np.zeros((2, 0), np.float32))
    rf.wait()

    # a crash after the journal append but before the rows were applied (the write runs in
    # the background: its error comes out of the next call on the file)
    rf._apply = lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))
    rf.write(rows, np.full((2, 4), 2.0, np.float32), np.zeros((2, 0), np.float32))
    with pytest.raises(RuntimeError, match="killed"):
        rf.wait()
    assert rf.read(rows)[0][0, 0] == 1.0  # not applied yet
    rf.close()
    rf = RowFile(path, spec)
    assert (rf.read(rows)[0] == 2.0).all()  # replayed at open
    assert rf.rows_written() == 2

    # a torn journal append (killed mid-write): the row file is untouched
    rf.write(rows, np.full((2, 4), 3.0, np.float32), np.zeros((2, 0), np.float32))
    rf.close()
    with open(path + ".journal", "r+b") as j:
        from tierstore.tiers.rowfile import _JHDR, JMAGIC
        body = np.full((2, 4), 9.0, np.float32)
        head = _JHDR.pack(JMAGIC, 2, 2 * 8 + 2 * 24 + 8, 12345)  # wrong CRC = torn payload
        j.write(head + rows.tobytes() + body.tobytes()[:10])
    rf = RowFile(path, spec)
    assert (rf.read(rows)[0] == 3.0).all()
    rf.close()
