"""Fused numba kernels for the sparse write path (float32 tables).

One call = dedupe + sum gradients per distinct slot + optimizer update + dirty mark, without
materialising a dense gradient. Measured against the torch version in benchmarks/bench_train.py.

Inputs, for ``n`` gradient contributions:
  slots: int64[n], the DRAM slot each contribution updates (duplicates allowed);
  src:   int64[n], row of ``grad`` holding the contribution (for pooled backward: the bag);
  scale: float32[n] multiplier per contribution, or an empty array for 1.0 (mean pooling,
         per-sample weights);
  grad:  float32[m, dim];
  mark:  int64[capacity] scratch, all -1 on entry and on return.
"""

from __future__ import annotations

import numba
import numpy as np

_JIT = dict(nogil=True, cache=True)


@numba.njit(**_JIT)
def accumulate(slots, src, scale, grad, mark, uslots, acc):
    """Sum contributions per distinct slot (first-occurrence order) into acc; returns #distinct."""
    dim = grad.shape[1]
    scaled = scale.shape[0] > 0
    u = 0
    for i in range(slots.shape[0]):
        s = slots[i]
        j = mark[s]
        b = src[i]
        c = scale[i] if scaled else np.float32(1.0)
        if j < 0:
            j = u
            mark[s] = u
            uslots[u] = s
            u += 1
            for d in range(dim):
                acc[j, d] = c * grad[b, d]
        else:
            for d in range(dim):
                acc[j, d] += c * grad[b, d]
    for j in range(u):
        mark[uslots[j]] = -1
    return u


@numba.njit(fastmath=True, **_JIT)
def sgd_update(uslots, u, acc, w, dirty, lr):
    dim = w.shape[1]
    lr32 = np.float32(lr)
    for j in range(u):
        s = uslots[j]
        for d in range(dim):
            w[s, d] -= lr32 * acc[j, d]
        dirty[s] = 1


@numba.njit(fastmath=True, **_JIT)
def rowwise_adagrad_update(uslots, u, acc, w, state, dirty, lr, eps, weight_decay):
    dim = w.shape[1]
    lr32 = np.float32(lr)
    eps32 = np.float32(eps)
    wd32 = np.float32(weight_decay)
    inv_dim = np.float32(1.0) / np.float32(dim)
    for j in range(u):
        s = uslots[j]
        if wd32 != 0:
            for d in range(dim):
                acc[j, d] += wd32 * w[s, d]
        g2 = np.float32(0.0)
        for d in range(dim):
            g2 += acc[j, d] * acc[j, d]
        st = state[s, 0] + g2 * inv_dim
        state[s, 0] = st
        m = lr32 / (np.sqrt(st) + eps32)
        for d in range(dim):
            w[s, d] -= m * acc[j, d]
        dirty[s] = 1


@numba.njit(fastmath=True, **_JIT)
def adagrad_update(uslots, u, acc, w, state, dirty, lr, eps):
    dim = w.shape[1]
    lr32 = np.float32(lr)
    eps32 = np.float32(eps)
    for j in range(u):
        s = uslots[j]
        for d in range(dim):
            g = acc[j, d]
            st = state[s, d] + g * g
            state[s, d] = st
            w[s, d] -= lr32 * g / (np.sqrt(st) + eps32)
        dirty[s] = 1


@numba.njit(**_JIT)
def distinct_positions(pos, mark, out):
    """Distinct values of ``pos`` (ints in [0, len(mark))) in first-occurrence order into out;
    returns how many. ``mark`` is all -1 on entry and on return."""
    u = 0
    for i in range(pos.shape[0]):
        p = pos[i]
        if mark[p] < 0:
            mark[p] = u
            out[u] = p
            u += 1
    for j in range(u):
        mark[out[j]] = -1
    return u
