"""Checkpoints under failure (issue 4): a writer process SIGKILLed at every named point of a
write, flipped bytes, truncated chunks, missing parents. Real stores, real processes."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import ckpt
from tierstore.ckpt import format as fmt

ROWS = 3000
DDR = 40_000  # ~150 cached rows: updates churn to SCM

# The writer child: open the store, optionally restore (so its checkpoint is an increment of
# the chain), train, save the state it is about to checkpoint, checkpoint with the pause hook.
WRITER = r"""
import sys, numpy as np, torch
import tierstore as ts
from tierstore import ckpt
path, root, restore_from, expect, keep, seed = sys.argv[1:7]
st = ts.Store(path, ddr_bytes=%d)
if restore_from != "-":
    st.restore(restore_from)
rng = np.random.default_rng(int(seed))
for _ in range(3):
    ids = rng.zipf(1.3, 300) %% %d
    st.apply_gradients("a", torch.from_numpy(ids), torch.from_numpy(rng.standard_normal((300, 8), dtype=np.float32)))
rows = np.union1d(st.written_rows("a"), np.arange(20))
w, s = st.read_rows("a", rows)
np.savez(expect, rows=rows, w=w, s=s)
h = ckpt.checkpoint(st, root, "incremental", 32, keep=int(keep), step=3, wait=True)
print("committed", h.name, flush=True)
""" % (DDR, ROWS)


def train(st, rng, steps=3):
    for _ in range(steps):
        ids = rng.zipf(1.3, 300) % ROWS
        st.apply_gradients("a", torch.from_numpy(ids),
                           torch.from_numpy(rng.standard_normal((300, 8), dtype=np.float32)))


def state(st):
    rows = np.union1d(st.written_rows("a"), np.arange(20))
    w, s = st.read_rows("a", rows)
    return rows, w, s


def same(x, y):
    return all(np.array_equal(a, b) for a, b in zip(x, y))


@pytest.fixture
def chain(tmp_path):
    """A store and a root holding ckpt-000001 (full) and ckpt-000002 (cumulative), fp32, with
    the state each one holds; the store is closed."""
    path, root = str(tmp_path / "store"), str(tmp_path / "ck")
    rng = np.random.default_rng(5)
    st = ts.Store(path, ddr_bytes=DDR)
    st.create_table(ts.TableSpec("a", ROWS, 8, optimizer=ts.RowWiseAdagrad(lr=0.1)))
    want = {}
    for _ in range(2):
        train(st, rng)
        p = st.checkpoint(root, policy="incremental", bits=32, keep=2, step=1, wait=True,
                          extra_state={"dense": torch.arange(6.0), "reader": {"pos": 9}})
        want[os.path.basename(p)] = state(st)
    st.close()
    return path, root, want


def check_restorable(path, root, want):
    """Every listed checkpoint verifies and restores to exactly its state."""
    listed = ckpt.list_checkpoints(root)
    assert all(r["restorable"] for r in listed), listed
    rep = ckpt.verify_root(root)
    assert rep["ok"], rep
    with ts.Store(path, ddr_bytes=DDR) as st:
        for r in listed:
            if r["name"] in want:
                st.restore(r["path"])
                assert same(state(st), want[r["name"]]), r["name"]
    return [r["name"] for r in listed]


# (pause point, restore first so the write is an increment, keep)
POINTS = [("snapshot", True, 2), ("begin", True, 2), ("chunk:2", True, 2), ("chunk:3", False, 2),
          ("manifest", True, 2), ("committed", True, 2), ("retention", False, 1)]


def test_sigkill_at_every_point_of_a_write(tmp_path, chain):
    path0, root0, want = chain
    procs = []
    for i, (point, inc, keep) in enumerate(POINTS):  # all writers at once: one startup cost
        d = tmp_path / f"run{i}"
        shutil.copytree(os.path.dirname(path0), d)
        path, root = str(d / "store"), str(d / "ck")
        marker, expect = str(d / "paused"), str(d / "expect.npz")
        env = {**os.environ, "TIERSTORE_CKPT_PAUSE": point, "TIERSTORE_CKPT_PAUSE_FILE": marker,
               "OMP_NUM_THREADS": "1"}
        restore_from = os.path.join(root, "ckpt-000002") if inc else "-"
        p = subprocess.Popen([sys.executable, "-c", WRITER, path, root, restore_from, expect,
                              str(keep), str(i)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        procs.append((point, inc, keep, p, path, root, marker, expect))
    for point, inc, keep, p, path, root, marker, expect in procs:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert p.poll() is None, (point, p.communicate())
            assert time.monotonic() < deadline, f"writer never reached {point}"
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()

        e = np.load(expect)
        mine = {**want, "ckpt-000003": (e["rows"], e["w"], e["s"])}
        names = check_restorable(path, root, mine)
        if point in ("committed", "retention"):
            assert "ckpt-000003" in names, point  # complete and valid
            assert ckpt.list_checkpoints(root)[-1]["kind"] == ("cumulative" if inc else "full")
        else:
            assert "ckpt-000003" not in names, point  # absent
        if point == "retention":  # the old chain goes newest first: what is left restores
            assert "ckpt-000002" not in names
        else:
            assert {"ckpt-000001", "ckpt-000002"} <= set(names), point
        # the next writer cleans up what the killed one left and carries on
        with ts.Store(path, ddr_bytes=DDR) as st:
            h = ckpt.checkpoint(st, root, "incremental", 32, keep=5, wait=True)
            assert fmt.seq_of(h.name) >= 3 and fmt.incomplete(root) == [], point
            assert ckpt.verify(h.path)["ok"]


def test_child_writer_completes_without_pause(tmp_path, chain):
    """The same child, not paused, commits an increment that restores to its state."""
    path, root, want = chain
    expect = str(tmp_path / "expect.npz")
    out = subprocess.run([sys.executable, "-c", WRITER, path, root,
                          os.path.join(root, "ckpt-000002"), expect, "2", "1"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "committed ckpt-000003" in out.stdout
    e = np.load(expect)
    names = check_restorable(path, root, {**want, "ckpt-000003": (e["rows"], e["w"], e["s"])})
    assert names == ["ckpt-000001", "ckpt-000002", "ckpt-000003"]


def flip(path, pos, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ mask]))


def test_verify_names_every_damaged_file_and_restore_changes_nothing(tmp_path, chain):
    path, root, want = chain
    c2 = os.path.join(root, "ckpt-000002")
    files = sorted(e["file"] for e in fmt.chunk_entries(fmt.read_manifest(c2)))
    assert any(f.endswith(".ids.zst") for f in files) and any(f.endswith(".w.zst") for f in files)
    assert any(f.endswith(".s.zst") for f in files) and any(f.startswith("dense/") for f in files)
    with ts.Store(path, ddr_bytes=DDR) as st:
        st.restore(os.path.join(root, "ckpt-000001"))
        train(st, np.random.default_rng(9))
        before = state(st)
        for f in files + [fmt.MANIFEST]:
            full = os.path.join(c2, f)
            size = os.path.getsize(full)
            for pos in {0, size // 2, size - 1}:
                flip(full, pos)
                rep = ckpt.verify(c2)
                assert not rep["ok"] and rep["problems"][0]["file"] == f"ckpt-000002/{f}", (f, rep)
                with pytest.raises(ckpt.CorruptCheckpoint) as ei:
                    st.restore(c2)
                assert f"ckpt-000002/{f}" in str(ei.value)
                assert same(state(st), before)  # failed before changing anything
                flip(full, pos)
            assert ckpt.verify(c2)["ok"]
        # truncated chunk
        w = next(f for f in files if f.endswith(".w.zst"))
        with open(os.path.join(c2, w), "r+b") as fh:
            fh.truncate(os.path.getsize(os.path.join(c2, w)) - 3)
        rep = ckpt.verify(c2)
        assert rep["problems"][0]["file"] == f"ckpt-000002/{w}"
        assert rep["problems"][0]["problem"].startswith("truncated")
        with pytest.raises(ckpt.CorruptCheckpoint, match="truncated"):
            st.restore(c2)
        assert same(state(st), before)
        # a chunk gone
        os.unlink(os.path.join(c2, w))
        assert ckpt.verify(c2)["problems"][0]["problem"] == "missing"


def test_every_byte_of_a_chunk_and_manifest(chain):
    """Any single flipped byte is detected (CRC32 on chunks; the manifest is checked against
    its own checksum and its one canonical serialization)."""
    path, root, want = chain
    c1 = os.path.join(root, "ckpt-000001")
    ids = next(e for e in fmt.read_manifest(c1)["chunks"] if e["what"] == "ids")
    for name, step in ((ids["file"], 1), (fmt.MANIFEST, 3)):
        full = os.path.join(c1, name)
        for pos in range(0, os.path.getsize(full), step):
            for mask in (0x01, 0x80):
                flip(full, pos, mask)
                assert not ckpt.verify(c1)["ok"], (name, pos, mask)
                flip(full, pos, mask)
    assert ckpt.verify(c1)["ok"]


def test_missing_parent_is_named(tmp_path, chain):
    path, root, want = chain
    shutil.rmtree(os.path.join(root, "ckpt-000001"))
    rep = ckpt.verify(os.path.join(root, "ckpt-000002"))
    assert not rep["ok"]
    assert rep["problems"][0]["file"] == "ckpt-000001"
    assert "missing" in rep["problems"][0]["problem"]
    listed = ckpt.list_checkpoints(root)
    assert [r["name"] for r in listed] == ["ckpt-000002"] and not listed[0]["restorable"]
    assert "ckpt-000001" in listed[0]["problem"]
    with ts.Store(path, ddr_bytes=DDR) as st:
        before = state(st)
        with pytest.raises(ckpt.CorruptCheckpoint, match="ckpt-000001"):
            st.restore(os.path.join(root, "ckpt-000002"))
        assert same(state(st), before)
    from tierstore.cli import main
    assert main(["ckpt", "verify", "--root", root]) == 1


def test_cli_verify_names_the_file(chain, capsys):
    from tierstore.cli import main
    path, root, want = chain
    c2 = os.path.join(root, "ckpt-000002")
    w = next(e["file"] for e in fmt.read_manifest(c2)["chunks"] if e["what"] == "weights")
    flip(os.path.join(c2, w), 5)
    assert main(["ckpt", "verify", c2]) == 1
    out = capsys.readouterr().out
    assert f"ckpt-000002/{w}: checksum mismatch" in out
    assert main(["ckpt", "restore", "--path", path, c2]) == 1
    assert "cannot restore ckpt-000002" in capsys.readouterr().err
