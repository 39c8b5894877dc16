"""Batches in the KeyedJaggedTensor layout and resuming a batch iterator from its state."""

import json

import numpy as np
import pytest
import torch
from test_data import random_lines, reference, write

from tierstore.data import SPARSE_KEYS, TsvDataset, batches, open_dataset, prepare
from tierstore.data.synthetic import BLOCK


def test_batch_layout_is_key_major():
    ds = open_dataset("synthetic:small,seed=5")
    b = next(iter(batches(ds, 7)))
    chunk = ds.block(0)
    assert b.keys == list(SPARSE_KEYS) and b.batch_size == 7
    assert b.values.dtype == b.lengths.dtype == b.offsets.dtype == torch.int64
    assert b.dense.dtype == b.labels.dtype == torch.float32 and b.dense.shape == (7, 13)
    assert (b.lengths == 1).all() and b.offsets.tolist() == list(range(26 * 7 + 1))
    for f in (0, 9, 25):
        np.testing.assert_array_equal(b.values[f * 7:(f + 1) * 7].numpy(), chunk.sparse[f][:7])
    np.testing.assert_array_equal(b.labels.numpy(), chunk.labels[:7])
    with pytest.raises(KeyError, match="cat_26"):
        b.feature("cat_26")


@pytest.mark.parametrize("spec", ["synthetic:small,seed=6", "synthetic:small,seed=6,pooling=2"])
def test_to_kjt_matches_torchrec(spec):
    from torchrec.sparse import jagged_tensor as jt  # installed by make install
    ds = open_dataset(spec)
    b = next(iter(batches(ds, 5)))
    ref = jt.KeyedJaggedTensor.from_lengths_sync(keys=list(SPARSE_KEYS), values=b.values,
                                                  lengths=b.lengths)
    kjt = b.to_kjt()
    assert kjt.keys() == ref.keys() and kjt.stride() == 5
    assert torch.equal(kjt.values(), ref.values()) and torch.equal(kjt.offsets(), ref.offsets())
    p = ds.pooling[3]
    ids = np.concatenate([ds.block(0).sparse[3][:5 * p]])
    assert kjt["cat_3"].values().tolist() == ids.tolist()
    assert kjt["cat_3"].lengths().tolist() == [p] * 5
    assert torch.equal(kjt["cat_3"].values(), b.feature("cat_3")[0])


def resume_check(ds, batch_size, k):
    """The batch after k batches equals the first batch of a fresh iterator loaded with the
    (JSON round-tripped) state."""
    it = batches(ds, batch_size)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    want = [next(it) for _ in range(2)]
    again = batches(ds, batch_size)
    again.load_state_dict(state)
    got = [next(again) for _ in range(2)]
    for w, g in zip(want, got):
        for key in ("values", "lengths", "dense", "labels"):
            assert torch.equal(getattr(w, key), getattr(g, key)), key
    assert again.samples == it.samples


def test_resume_synthetic_across_blocks():
    ds = open_dataset("synthetic:small,seed=9")
    resume_check(ds, 3000, 2)  # next batch spans blocks 0 and 1
    resume_check(open_dataset("synthetic:small,seed=9,pooling=2"), 1000, 9)


def test_resume_tsv_and_prepared(tmp_path):
    lines = random_lines(120, seed=4)
    src = write(tmp_path / "r.tsv", lines, gz=True)
    tsv = TsvDataset(src, block_bytes=2000)  # ~8 lines per block: batches span blocks
    resume_check(tsv, 13, 3)
    out = str(tmp_path / "prep")
    prepare(src, out, shard_rows=50, progress=False)
    resume_check(open_dataset(out), 13, 3)
    prep = open_dataset(out)
    prep.chunk_rows = 7
    resume_check(prep, 13, 5)


def test_start_skips_samples(tmp_path):
    ds = open_dataset("synthetic:small,seed=2")
    a = next(iter(batches(ds, 10, start=BLOCK - 3)))
    whole = next(iter(batches(ds, BLOCK + 7)))
    assert torch.equal(a.labels, whole.labels[BLOCK - 3:])
    lines = random_lines(30)
    tsv = open_dataset(write(tmp_path / "s.tsv", lines))
    b = next(iter(batches(tsv, 4, start=25)))
    assert torch.equal(b.labels, torch.from_numpy(reference(lines)[0][25:29]))


def test_end_drop_last_and_repeat(tmp_path):
    lines = random_lines(10)
    tsv = open_dataset(write(tmp_path / "e.tsv", lines))
    assert [len(b) for b in batches(tsv, 4)] == [4, 4, 2]
    assert [len(b) for b in batches(tsv, 4, drop_last=True)] == [4, 4]
    it = batches(tsv, 4, repeat=True)
    got = [next(it) for _ in range(5)]
    assert [len(b) for b in got] == [4, 4, 4, 4, 4] and it.epoch == 1
    labels = torch.from_numpy(reference(lines)[0])
    assert torch.equal(got[2].labels, torch.cat([labels[8:], labels[:2]]))
    it = batches(tsv, 4)
    list(it)
    state = it.state_dict()
    again = batches(tsv, 4)
    again.load_state_dict(state)
    assert list(again) == []
    syn = open_dataset("synthetic:small,num_samples=10000")
    assert sum(len(b) for b in batches(syn, 4096)) == 10000


def test_state_of_another_dataset_is_refused():
    it = batches(open_dataset("synthetic:small,seed=1"), 8)
    other = batches(open_dataset("synthetic:small,seed=2"), 8)
    with pytest.raises(ValueError, match="batch iterator state is for dataset"):
        other.load_state_dict(it.state_dict())


def test_remap_takes_ids_modulo_rows(tmp_path):
    tsv = open_dataset(write(tmp_path / "h.tsv", random_lines(6)))
    b = next(iter(batches(tsv, 6)))
    rows = [100 + k for k in range(26)]
    r = b.remap(rows)
    for k in (0, 7, 25):
        key = f"cat_{k}"
        assert torch.equal(r.feature(key)[0], b.feature(key)[0] % rows[k])
    assert (r.values >= 0).all() and (r.values < 126).all()
