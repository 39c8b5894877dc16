"""Click-model metrics against direct definitions."""

import numpy as np
import torch

from tierstore.train import metrics


def test_logloss_matches_torch_and_is_stable():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000) * 30  # large logits: a naive log(sigmoid) would overflow
    y = (rng.random(1000) < 0.3).astype(np.float64)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(y)).item()
    assert abs(metrics.logloss_from_logits(x, y) - want) < 1e-9


def test_ne_of_constant_predictor_is_one():
    y = (np.random.default_rng(1).random(5000) < 0.2).astype(np.float64)
    p = y.mean()
    ll = metrics.logloss_from_logits(np.full(5000, np.log(p / (1 - p))), y)
    assert abs(metrics.normalized_entropy(ll, y) - 1.0) < 1e-9


def test_auc_against_pairwise_definition_with_ties():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 20, 400).astype(np.float64)  # many ties
    y = (rng.random(400) < 0.4).astype(np.float64)
    pos, neg = s[y == 1], s[y == 0]
    want = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) \
        / (len(pos) * len(neg))
    assert abs(metrics.auc(s, y) - want) < 1e-12
    assert metrics.auc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert np.isnan(metrics.auc(np.arange(3.0), np.zeros(3)))
