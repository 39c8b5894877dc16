"""The fused write kernel (tierstore/optim/kernels.py) against plain numpy references: the
contribution sort, each optimizer kind, duplicate summation order and the row flags."""

import numpy as np
import pytest

from tierstore.ckpt import kernels as ck
from tierstore.optim import kernels

DIM = 8


@pytest.mark.parametrize("key_bits", [1, 11, 17, 25])
@pytest.mark.parametrize("scaled", [False, True])
def test_sort_contributions_is_a_stable_sort_by_position(rng, key_bits, scaled):
    n = 3000
    pos = rng.integers(0, 1 << key_bits, n)
    src = rng.integers(0, 500, n)
    scale = rng.random(n).astype(np.float32) if scaled else np.empty(0, np.float32)
    keys = np.full(2 * n + 5, -7, dtype=np.int64)
    out = kernels.sort_contributions(pos, src, scale, key_bits, keys)
    order = np.argsort(pos, kind="stable")
    np.testing.assert_array_equal(out >> 32, pos[order])
    payload = out & 0xFFFFFFFF
    np.testing.assert_array_equal(payload, order if scaled else src[order])
    assert (keys[2 * n:] == -7).all()  # stays inside 2n


def reference(kind, pos, src, scale, grad, w, state, lr, eps, wd):
    """Sum each row's contributions in input order (float32), then update it."""
    w, state = w.copy(), state.copy()
    for p in np.unique(pos):
        acc = np.zeros(w.shape[1], np.float32)
        for i in np.flatnonzero(pos == p):
            c = scale[i] if len(scale) else np.float32(1)
            acc = acc + np.float32(c) * grad[src[i]]
        if kind == kernels.SGD:
            w[p] -= np.float32(lr) * acc
        elif kind == kernels.ROWWISE_ADAGRAD:
            acc = acc + np.float32(wd) * w[p]
            state[p, 0] += np.mean(acc * acc, dtype=np.float32)
            w[p] -= np.float32(lr) * acc / (np.sqrt(state[p, 0]) + np.float32(eps))
        else:
            state[p] += acc * acc
            w[p] -= np.float32(lr) * acc / (np.sqrt(state[p]) + np.float32(eps))
    return w, state


KINDS = [(kernels.SGD, 0), (kernels.ROWWISE_ADAGRAD, 1), (kernels.ADAGRAD, DIM)]


@pytest.mark.parametrize("kind,state_dim", KINDS, ids=["sgd", "rowwise", "adagrad"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("pos_dtype", [np.int64, np.int32])
def test_apply_rows_matches_reference(rng, kind, state_dim, scaled, pos_dtype):
    slots, n, bags = 3000, 700, 64
    w0 = rng.standard_normal((slots, DIM)).astype(np.float32)
    s0 = rng.random((slots, state_dim)).astype(np.float32)
    pos = rng.integers(1, 200, n).astype(pos_dtype)  # many duplicates
    pos[:50] = rng.integers(1, slots, 50)  # and rows far apart (a two-pass sort)
    src = rng.integers(0, bags, n)
    grad = rng.standard_normal((bags, DIM)).astype(np.float32)
    scale = rng.random(n).astype(np.float32) if scaled else np.empty(0, np.float32)
    w, s = w0.copy(), s0.copy()
    dirty, modified = np.zeros(slots, np.uint8), np.zeros(slots, np.uint8)
    keys = np.empty(2 * n, np.int64)
    u = kernels.apply_rows(kind, pos, src, scale, grad, w, s, dirty, modified, 0.05, 1e-6, 0.01,
                           keys)
    want_w, want_s = reference(kind, pos, src, scale, grad, w0, s0, 0.05, 1e-6, 0.01)
    touched = np.zeros(slots, bool)
    touched[pos] = True
    assert u == touched.sum()
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, want_s, rtol=1e-5, atol=1e-6)
    assert np.array_equal(w[~touched], w0[~touched])  # bit for bit
    np.testing.assert_array_equal(dirty, touched.astype(np.uint8))
    np.testing.assert_array_equal(modified, touched.astype(np.uint8))


@pytest.mark.parametrize("scaled", [False, True])
def test_duplicates_are_summed_in_input_order(scaled):
    # float32: 1e8 + -1e8 + 1 = 1 in this order; in gradient-row order (-1e8 + 1 + 1e8) it is 0
    grad = np.array([[-1e8], [1.0], [1e8]], dtype=np.float32)
    src = np.array([2, 0, 1, 1])
    pos = np.array([1, 1, 1, 2])
    scale = np.ones(4, np.float32) if scaled else np.empty(0, np.float32)
    w = np.zeros((3, 1), np.float32)
    flags = np.zeros(3, np.uint8)
    kernels.apply_rows(kernels.SGD, pos, src, scale, grad, w, np.zeros((3, 0), np.float32),
                       flags, flags.copy(), 1.0, 0.0, 0.0, np.empty(8, np.int64))
    assert w[1, 0] == -1.0 and w[2, 0] == -1.0


def test_empty_batch_changes_nothing():
    w = np.ones((4, DIM), np.float32)
    flags = np.zeros(4, np.uint8)
    u = kernels.apply_rows(kernels.ROWWISE_ADAGRAD, np.empty(0, np.int64), np.empty(0, np.int64),
                           np.empty(0, np.float32), np.ones((2, DIM), np.float32), w,
                           np.zeros((4, 1), np.float32), flags, flags, 0.1, 1e-8, 0.0,
                           np.empty(0, np.int64))
    assert u == 0 and (w == 1).all() and not flags.any()


@pytest.mark.parametrize("scaled", [False, True])
def test_positions_below_first_are_skipped(scaled):
    rng = np.random.default_rng(7)
    pos = rng.integers(0, 6, 40)  # a third of them 0 or 1
    src = rng.integers(0, 8, 40)
    grad = rng.standard_normal((8, DIM)).astype(np.float32)
    scale = rng.random(40).astype(np.float32) if scaled else np.empty(0, np.float32)
    w0 = rng.standard_normal((6, DIM)).astype(np.float32)
    w, s = w0.copy(), np.zeros((6, 1), np.float32)
    flags = np.zeros(6, np.uint8)
    u = kernels.apply_rows(kernels.ROWWISE_ADAGRAD, pos, src, scale, grad, w, s, flags,
                           flags.copy(), 0.1, 1e-8, 0.0, np.empty(80, np.int64), 2)
    keep = pos >= 2
    w_ref, s_ref = w0.copy(), np.zeros((6, 1), np.float32)
    kernels.apply_rows(kernels.ROWWISE_ADAGRAD, pos[keep], src[keep],
                       scale[keep] if scaled else scale, grad, w_ref, s_ref,
                       np.zeros(6, np.uint8), np.zeros(6, np.uint8), 0.1, 1e-8, 0.0,
                       np.empty(80, np.int64))
    assert u == len(np.unique(pos[keep]))
    assert np.array_equal(w, w_ref) and np.array_equal(s, s_ref)
    assert np.array_equal(w[:2], w0[:2]) and not flags[:2].any()


def test_clear_slots_moves_only_the_given_slots_flags():
    """Evictions fold their slots' modified flags with it (DDRCache._fold_modified)."""
    modified = np.array([0, 1, 1, 0, 1], np.uint8)
    flags = np.zeros(100, np.uint8)
    pos = np.array([1, 3, 4])
    rows = np.array([10, 30, 40], np.int32)
    assert ck.clear_slots(modified, pos, rows, flags) == 2
    assert flags.nonzero()[0].tolist() == [10, 40]
    assert modified.tolist() == [0, 0, 1, 0, 0]  # slot 2 was not given: kept


@pytest.mark.parametrize("scaled", [False, True])
def test_sum_at_is_torchs_index_add_bit_for_bit(rng, scaled):
    """The client's per-row gradient sums (sent to the service) equal torch's index_select,
    multiply and index_add_ exactly: same products, same order of the adds."""
    import torch
    from tierstore.tiers.ddr import sum_at
    at, src = rng.integers(0, 300, 6000), rng.integers(0, 512, 6000)
    g = rng.standard_normal((512, 24)).astype(np.float32)
    scale = rng.random(6000).astype(np.float32) if scaled else np.empty(0, np.float32)
    contrib = torch.from_numpy(g).index_select(0, torch.from_numpy(src))
    if scaled:
        contrib = contrib * torch.from_numpy(scale).unsqueeze(1)
    want = torch.zeros(300, 24).index_add_(0, torch.from_numpy(at), contrib)
    assert torch.equal(sum_at(at, 300, src, scale, g), want)
