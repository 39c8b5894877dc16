"""Crash behaviour with a real child process killed by SIGKILL, and the one-owner lock."""

import os
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


def test_torn_journal_is_ignored_and_complete_journal_replayed(tmp_path, monkeypatch):
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

    # killed while writing the journal: its payload goes first and the header that arms it
    # after, so a payload without its header is ignored and the row file is untouched
    rf.write(rows, np.full((2, 4), 3.0, np.float32), np.zeros((2, 0), np.float32))
    rf.close()
    from tierstore.tiers.rowfile import _JHDR, JMAGIC, JMAGIC_V1
    rec = RowFile(path, spec).layout.record_bytes
    plen = 2 * 8 + 2 * rec + 8
    payload = rows.tobytes() + np.full((2, rec), 0x41, np.uint8).tobytes() + (2).to_bytes(8, "little")
    with open(path + ".journal", "r+b") as j:
        j.write(b"\0" * 8 + _JHDR.pack(JMAGIC, 2, plen, 0)[8:] + payload)  # disarmed header
    rf = RowFile(path, spec)
    assert (rf.read(rows)[0] == 3.0).all()
    rf.close()
    # killed in the middle of the journal's payload, or after it but before the header that
    # arms it: nothing is replayed
    from tierstore.tiers import rowfile
    real_pwrite, real_pwritev = os.pwrite, os.pwritev
    for where in ("payload", "header"):
        rf = RowFile(path, spec)

        def pwritev(fd, parts, offset):
            if fd == rf.jfd and where == "payload":  # half the bytes land, then the kill
                data = b"".join(bytes(p) for p in parts)
                real_pwrite(fd, data[: len(data) // 2], offset)
                raise RuntimeError("killed")
            return real_pwritev(fd, parts, offset)

        def pwrite(fd, data, offset):
            if fd == rf.jfd and offset == 0 and bytes(data[:8]) == JMAGIC and where == "header":
                raise RuntimeError("killed")
            return real_pwrite(fd, data, offset)
        monkeypatch.setattr(rowfile.os, "pwritev", pwritev)
        monkeypatch.setattr(rowfile.os, "pwrite", pwrite)
        rf.write(rows, np.full((2, 4), 5.0, np.float32), np.zeros((2, 0), np.float32))
        with pytest.raises(RuntimeError, match="killed"):
            rf.wait()
        monkeypatch.setattr(rowfile.os, "pwritev", real_pwritev)
        monkeypatch.setattr(rowfile.os, "pwrite", real_pwrite)
        rf.close()
        rf = RowFile(path, spec)
        assert (rf.read(rows)[0] == 3.0).all(), where
        rf.close()
    # an armed header over a short payload (never written that way; still ignored)
    with open(path + ".journal", "r+b") as j:
        j.truncate(0)
        j.write(_JHDR.pack(JMAGIC, 2, plen, 0) + payload[:plen - 10])
    rf = RowFile(path, spec)
    assert (rf.read(rows)[0] == 3.0).all()
    rf.close()
    # a journal of the earlier format (one write, CRC32 over the payload): replayed when the
    # CRC checks out, ignored when it does not
    good = RowFile(path, spec)
    w4 = np.full((2, 4), 4.0, np.float32)
    good._apply = lambda *a: (_ for _ in ()).throw(RuntimeError("killed"))
    good.write(rows, w4, np.zeros((2, 0), np.float32))
    with pytest.raises(RuntimeError, match="killed"):
        good.wait()
    good.close()
    with open(path + ".journal", "rb") as j:
        body = j.read()[_JHDR.size:_JHDR.size + plen]
    import zlib
    for crc, expect in ((zlib.crc32(body) ^ 1, 3.0), (zlib.crc32(body), 4.0)):
        with open(path + ".journal", "r+b") as j:
            j.truncate(0)
            j.write(_JHDR.pack(JMAGIC_V1, 2, plen, crc) + body)
        rf = RowFile(path, spec)
        assert (rf.read(rows)[0] == expect).all()
        rf.close()
