"""The synthetic generator: determinism, cardinalities, skew, temporal locality, planted labels."""

import math

import numpy as np
import pytest
import torch

from tierstore.data import (
    PROFILES,
    SyntheticDataset,
    batches,
    binary_logloss,
    get_profile,
    open_dataset,
)
from tierstore.data.synthetic import BLOCK, CRITEO_KAGGLE_ROWS, power_law_ranks


def sample_ids(ds, n_blocks=4):
    blocks = [ds.block(b) for b in range(n_blocks)]
    return [np.concatenate([c.sparse[f] for c in blocks]) for f in range(26)], blocks


def test_deterministic_by_seed_and_split():
    a, b = SyntheticDataset("small", seed=7), SyntheticDataset("small", seed=7)
    ca, cb = a.block(3), b.block(3)
    assert np.array_equal(ca.labels, cb.labels) and np.array_equal(ca.dense, cb.dense)
    assert all(np.array_equal(x, y) for x, y in zip(ca.sparse, cb.sparse))
    other = SyntheticDataset("small", seed=8).block(3)
    ev = SyntheticDataset("small", seed=7, split="eval").block(3)
    for c in (other, ev):
        assert not np.array_equal(c.sparse[0], ca.sparse[0])
        assert not np.array_equal(c.dense, ca.dense)


def test_batches_do_not_depend_on_batch_size():
    ds = open_dataset("synthetic:small,seed=1")
    big = next(iter(batches(ds, 3000)))
    small = [b for _, b in zip(range(3), batches(ds, 1000))]
    assert torch.equal(big.labels, torch.cat([b.labels for b in small]))
    assert torch.equal(big.feature("cat_5")[0], torch.cat([b.feature("cat_5")[0] for b in small]))


@pytest.mark.parametrize("name,scale", [("small", 1.0), ("criteo_kaggle", 0.001), ("meta", 0.001)])
def test_ids_within_cardinalities(name, scale):
    ds = SyntheticDataset(name, seed=0, scale=scale)
    ids, _ = sample_ids(ds, 2)
    for f, x in enumerate(ids):
        assert x.dtype == np.int64 and x.min() >= 0 and x.max() < ds.cardinalities[f]
    if name == "small":  # small tables: most rows show up
        assert all(len(np.unique(x)) > 0.3 * n for x, n in zip(ids, ds.cardinalities))


def test_profiles_and_scaling():
    assert get_profile("criteo_kaggle").cardinalities == CRITEO_KAGGLE_ROWS
    assert CRITEO_KAGGLE_ROWS[:4] == (1460, 583, 10131227, 2202608)
    p = get_profile("criteo_kaggle", scale=0.01)
    assert p.cardinalities[2] == 101312 and p.cardinalities[8] == 1 and p.scale == 0.01
    ds = open_dataset("synthetic:criteo_kaggle,scale=0.01,seed=3")
    assert ds.cardinalities == p.cardinalities and ds.seed == 3
    assert set(PROFILES) >= {"small", "criteo_kaggle", "meta"}


def test_unknown_profile_and_option_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown synthetic profile 'nope'; valid: criteo_kaggle, meta, small"):
        open_dataset("synthetic:nope")
    with pytest.raises(ValueError, match="unknown synthetic option 'sclae'.*valid: num_samples, pooling, scale, seed"):
        open_dataset("synthetic:small,sclae=2")
    with pytest.raises(ValueError, match="expected float"):
        open_dataset("synthetic:small,scale=big")


def test_frequency_skew():
    ds = SyntheticDataset("small", seed=0)
    ids, _ = sample_ids(ds, 4)
    for f in (0, 12, 25):
        counts = np.sort(np.bincount(ids[f], minlength=ds.cardinalities[f]))[::-1]
        top = max(1, len(counts) // 100)
        share = counts[:top].sum() / counts.sum()
        assert share > 0.2, (f, share)  # uniform would give 0.01


def reuse_distances(x):
    """Distance from each lookup to the previous lookup of the same id."""
    order = np.argsort(x, kind="stable")
    same = x[order][1:] == x[order][:-1]
    return (order[1:] - order[:-1])[same]


def test_temporal_locality():
    ds = SyntheticDataset("criteo_kaggle", seed=0, scale=0.01)
    ids, _ = sample_ids(ds, 1)
    x = ids[2]  # 101,312 rows
    shuffled = np.random.default_rng(0).permutation(x)
    d, ds_ = reuse_distances(x), reuse_distances(shuffled)
    assert np.median(d) < 0.5 * np.median(ds_)
    assert (d <= ds.profile.reuse_window).mean() > (ds_ <= ds.profile.reuse_window).mean() + 0.05


def test_power_law_ranks():
    u = np.random.default_rng(0).random(200_000)
    r = power_law_ranks(u, 1000, 1.0)
    assert r.min() == 0 and r.max() == 999
    c = np.bincount(r, minlength=1000)
    # density 1/x on [1, 1001): rank k gets log((k + 2) / (k + 1)) / log(1001)
    for k in (0, 9, 99):
        assert abs(c[k] / len(u) - math.log((k + 2) / (k + 1)) / math.log(1001)) < 0.004


def test_labels_follow_the_planted_model():
    ds = SyntheticDataset("small", seed=2)
    it = batches(ds, BLOCK)
    ys, ps = [], []
    for _ in range(6):
        b = next(it)
        ys.append(b.labels.numpy())
        ps.append(1 / (1 + np.exp(-ds.planted_logit(b))))
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert abs(y.mean() - p.mean()) < 4 * math.sqrt(p.mean() * (1 - p.mean()) / len(y))
    assert 0.1 < y.mean() < 0.4
    planted = binary_logloss(p, y)
    constant = binary_logloss(np.full_like(p, y.mean()), y)
    assert planted < 0.95 * constant
    best = ds.bayes_logloss(4 * BLOCK)
    assert abs(best["logloss"] - planted) < 0.02 and best["ne"] < 0.95


def test_multi_hot_pooling():
    ds = open_dataset("synthetic:small,pooling=3,seed=4")
    b = next(iter(batches(ds, 100)))
    assert (b.lengths == 3).all() and len(b.lengths) == 26 * 100
    assert len(b.values) == 26 * 300
    v, lengths = b.feature("cat_1")
    assert len(v) == 300 and v.max() < ds.cardinalities[1]
    assert ds.planted_logit(b).shape == (100,)
    mixed = SyntheticDataset("small", pooling=[1, 2] * 13)
    b = next(iter(batches(mixed, 10)))
    assert b.lengths.tolist()[:10] == [1] * 10 and b.lengths.tolist()[10:20] == [2] * 10
    assert len(b.values) == 10 * 39
    with pytest.raises(ValueError, match="pooling"):
        SyntheticDataset("small", pooling=0)


def test_reuse_histogram_and_meta_stats_parser():
    from tierstore.data.calibrate import (
        DEFAULT_STATS,
        load_locality_stats,
        reuse_histogram,
    )
    rows, lookups = reuse_histogram([np.array([1, 1, 2, 3, 3, 3, 3]), np.array([5, 5, 5])])
    np.testing.assert_allclose(rows[:3], [1 / 4, 1 / 4, 2 / 4])
    np.testing.assert_allclose(lookups[:3], [1 / 10, 2 / 10, 7 / 10])
    stats = load_locality_stats(DEFAULT_STATS)
    assert len(stats) == 17 and stats[0]["indices"] == 887017990
    assert stats[0]["row_share"][0] == 0.473 and stats[0]["lookup_share"][-1] == 0.019
