"""Evaluation metrics of click models: log loss, normalized entropy (NE), ROC AUC.

All take labels in {0, 1} and predicted click probabilities (or logits where named), as numpy
arrays of one shape [N], and return Python floats.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def logloss_from_logits(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean binary cross-entropy, computed stably from logits (log(1 + e^x) - y x)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


def entropy(labels: np.ndarray) -> float:
    """Log loss of the best constant predictor (the labels' mean)."""
    p = float(np.clip(np.mean(labels), _EPS, 1 - _EPS))
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def normalized_entropy(logloss: float, labels: np.ndarray) -> float:
    """NE (He et al., 2014): log loss divided by the entropy of the base rate; below 1 means
    better than predicting the average click rate."""
    return float(logloss / entropy(labels))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan if only one
    class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    if len(counts) < len(s):  # ties: every member of a tie group gets the group's mean rank
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / counts)[inv]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))
