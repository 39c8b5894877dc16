"""Lookups, pooling and every optimizer against plain torch references, with the table in DRAM
completely and with a small cache that forces evictions, write-backs and reloads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tierstore as ts
from conftest import full_table

DIM = 16
ROWS = 500


def make(store_dir, cache_rows, optimizer=None, dtype="float32", policy="lru", rows=ROWS):
    spec = ts.TableSpec("t", rows, DIM, dtype=dtype, optimizer=optimizer or ts.SGD(0.1), seed=7)
    ddr = cache_rows * ts.Store.cached_row_bytes(spec)
    store = ts.Store(store_dir, ddr_bytes=ddr, policy=policy)
    store.create_table(spec)
    return store


@pytest.mark.parametrize("cache_rows", [ROWS, 37])
def test_lookup_returns_the_same_rows_whatever_the_cache(store_dir, rng, cache_rows):
    big = make(store_dir + "-big", ROWS)
    ref = full_table(big, "t")
    store = make(store_dir, cache_rows)
    for _ in range(20):
        ids = torch.from_numpy(rng.integers(0, ROWS, 64))
        assert torch.equal(store.lookup("t", ids), ref[ids])
    st = store.stats()["tables"]["t"]
    assert st["lookups"] == 20 * 64
    assert st["rows_in_dram"] <= cache_rows
    if cache_rows < ROWS:
        assert st["evictions"] > 0


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("cache_rows", [ROWS, 23])
def test_pooled_matches_embedding_bag(store_dir, rng, mode, cache_rows):
    store = make(store_dir, cache_rows)
    ref = make(store_dir + "-ref", ROWS)
    w = full_table(ref, "t")
    for _ in range(10):
        lengths = rng.integers(0, 6, 32)  # includes empty bags
        idx = torch.from_numpy(rng.integers(0, ROWS, lengths.sum()))
        off = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        got = store.pooled("t", idx, off, mode=mode)
        want = F.embedding_bag(idx, w, off, mode=mode)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        # FBGEMM's B+1 convention gives the same bags
        off1 = torch.cat([off, torch.tensor([len(idx)])])
        got1 = store.pooled("t", idx, off1, mode=mode, include_last_offset=True)
        torch.testing.assert_close(got1, want, rtol=1e-6, atol=1e-6)


def test_pooled_per_sample_weights(store_dir, rng):
    store = make(store_dir, 19)
    ref = make(store_dir + "-ref", ROWS)
    w = full_table(ref, "t")
    idx = torch.from_numpy(rng.integers(0, ROWS, 100))
    off = torch.arange(0, 100, 10)
    psw = torch.rand(100)
    got = store.pooled("t", idx, off, per_sample_weights=psw)
    torch.testing.assert_close(got, F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=psw))


def ref_update(kind, w, s, g, opt):
    """Independent reference of the three sparse optimizers on distinct rows."""
    if kind == "sgd":
        return w - opt.lr * g, s
    if kind == "rowwise_adagrad":
        g = g + opt.weight_decay * w
        s = s + (g * g).mean(1, keepdim=True)
        return w - opt.lr * g / (torch.sqrt(s) + opt.eps), s
    s = s + g * g
    return w - opt.lr * g / (torch.sqrt(s) + opt.eps), s


OPTS = [ts.SGD(lr=0.3), ts.RowWiseAdagrad(lr=0.2, eps=1e-6, weight_decay=0.01),
        ts.Adagrad(lr=0.2, eps=1e-6)]


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.kind)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("cache_rows", [ROWS, 29])
def test_apply_gradients_sums_duplicates_then_updates(store_dir, rng, opt, dtype, cache_rows):
    store = make(store_dir, cache_rows, opt, dtype)
    w = full_table(store, "t").to(torch.float32)
    s = torch.zeros(ROWS, opt.state_dim(DIM))
    for _ in range(6):
        ids = torch.from_numpy(rng.integers(0, 60, 80))  # many duplicates
        g = torch.randn(80, DIM)
        store.apply_gradients("t", ids, g)
        u, inv = torch.unique(ids, return_inverse=True)
        gs = torch.zeros(len(u), DIM).index_add_(0, inv, g)
        nw, ns = ref_update(opt.kind, w[u], s[u], gs, opt)
        w[u] = nw.to(getattr(torch, dtype)).to(torch.float32)
        s[u] = ns
        store.lookup("t", torch.from_numpy(rng.integers(0, ROWS, 50)))  # churn the cache
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(full_table(store, "t").to(torch.float32), w, **tol)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.kind)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pooled_backward_equals_autograd(store_dir, rng, opt, mode):
    store = make(store_dir, 41, opt)
    w0 = full_table(store, "t")
    # Bag lengths that are powers of two and integer gradients make every sum exact in any
    # order, so the comparison does not depend on summation order (Adagrad's first step divides
    # by |g| and would magnify a rounding difference of a near-cancelled sum).
    lengths = rng.choice([0, 1, 2, 4, 8], 64)
    idx = torch.from_numpy(rng.integers(0, 90, lengths.sum()))
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    grad_out = torch.from_numpy(rng.integers(-8, 9, (64, DIM)).astype(np.float32))
    leaf = w0.clone().requires_grad_()
    F.embedding_bag(idx, leaf, off, mode=mode).backward(grad_out)
    u = torch.unique(idx)
    want_w, _ = ref_update(opt.kind, w0[u], torch.zeros(len(u), opt.state_dim(DIM)),
                           leaf.grad[u], opt)
    store.pooled("t", idx, off, mode=mode)
    store.apply_pooled_gradients("t", idx, off, grad_out, mode=mode)
    got = full_table(store, "t")
    torch.testing.assert_close(got[u], want_w, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(ROWS, dtype=torch.bool)
    untouched[u] = False
    assert torch.equal(got[untouched], w0[untouched])


def test_rows_survive_eviction_and_reload(store_dir, rng):
    store = make(store_dir, 8, ts.RowWiseAdagrad(lr=0.5))
    ids = torch.arange(8)
    store.lookup("t", ids)  # training reads rows before it updates them: they are in DRAM
    store.apply_gradients("t", ids, torch.ones(8, DIM))
    written = store.lookup("t", ids).clone()
    state = store._entry("t").cache.state[store._entry("t").cache.positions(ids.numpy())].copy()
    assert store.stats()["tables"]["t"]["dirty_rows"] == 8
    store.lookup("t", torch.arange(100, 200))  # evicts all eight
    st = store.stats()["tables"]["t"]
    assert st["writebacks"] >= 8 and st["evictions"] >= 8
    assert store._entry("t").cache.positions(ids.numpy()).max() == 0  # really gone from DRAM
    assert torch.equal(store.lookup("t", ids), written)
    c = store._entry("t").cache
    np.testing.assert_array_equal(c.state[c.positions(ids.numpy())], state)


def test_close_and_reopen_keeps_everything(store_dir, rng):
    store = make(store_dir, 31, ts.Adagrad(lr=0.1))
    for _ in range(5):
        ids = torch.from_numpy(rng.integers(0, ROWS, 40))
        store.apply_gradients("t", ids, torch.randn(40, DIM))
    before = full_table(store, "t")
    store.close()
    again = ts.Store(store_dir, ddr_bytes=1 << 20)
    assert again.tables() == ["t"]
    assert torch.equal(full_table(again, "t"), before)
    assert again.stats()["tables"]["t"]["rows_on_scm"] > 0


def test_untouched_rows_are_deterministic_and_cost_nothing(tmp_path):
    spec = ts.TableSpec("huge", 10**9, 8, seed=3)
    with ts.Store(tmp_path / "a", ddr_bytes=1 << 20) as a:
        a.create_table(spec)
        ids = torch.tensor([5, 10**9 - 1, 123456789])
        x = a.lookup("huge", ids).clone()
        st = a.stats()
        assert st["tables"]["huge"]["bytes"]["scm"] < 1 << 20  # sparse file
    with ts.Store(tmp_path / "b", ddr_bytes=1 << 20) as b:
        b.create_table(spec)
        y = b.lookup("huge", torch.tensor([123456789, 5]))
    assert torch.equal(y, x[[2, 0]])
    assert x.abs().max() <= 1 / np.sqrt(8) and x.std() > 0


@pytest.mark.parametrize("init", ["uniform", "normal", "zeros"])
def test_init_distributions(store_dir, init):
    with ts.Store(store_dir, ddr_bytes=8 << 20) as s:
        s.create_table(ts.TableSpec("t", 4000, 64, init=init, seed=1))
        w = full_table(s, "t")
    if init == "zeros":
        assert torch.count_nonzero(w) == 0
    elif init == "uniform":
        assert w.abs().max() <= 1 / 8 and abs(w.std().item() - (1 / 8) / np.sqrt(3)) < 1e-3
    else:
        assert abs(w.std().item() - 1 / 8) < 1e-3 and abs(w.mean().item()) < 1e-3


def test_sparse_id_space_creates_rows_on_first_touch(store_dir):
    spec = ts.TableSpec("s", 1000, DIM, id_space="sparse", optimizer=ts.SGD(1.0))
    big = [2**62 + 5, 7, 2**40]
    with ts.Store(store_dir, ddr_bytes=4 * ts.Store.cached_row_bytes(spec)) as s:
        s.create_table(spec)
        first = s.lookup("s", torch.tensor(big)).clone()
        s.apply_gradients("s", torch.tensor(big), torch.ones(3, DIM))
        s.lookup("s", torch.arange(100, 120))  # evict them (cache of 4 rows)
        assert s.stats()["tables"]["s"]["rows_on_scm"] >= 3
    with ts.Store(store_dir, ddr_bytes=1 << 20) as s:
        torch.testing.assert_close(s.lookup("s", torch.tensor(big)), first - 1.0)


def test_gradients_for_rows_not_in_dram_update_scm(store_dir):
    store = make(store_dir, 4, ts.SGD(lr=1.0))
    before = store.lookup("t", torch.arange(10, 13)).clone()
    store.lookup("t", torch.arange(100, 104))  # cache full of other rows
    store.apply_gradients("t", torch.tensor([10, 11, 12, 10]), torch.ones(4, DIM))
    assert store.stats()["tables"]["t"]["dirty_rows"] == 0
    want = before - torch.tensor([2.0, 1.0, 1.0]).unsqueeze(1)
    torch.testing.assert_close(store.lookup("t", torch.arange(10, 13)), want)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.kind)
def test_fused_kernel_and_torch_path_agree(tmp_path, rng, opt):
    stores = [make(str(tmp_path / f"s{i}"), ROWS, opt) for i in range(2)]
    stores[1]._entry("t").cache.fused = False
    for _ in range(4):
        lengths = rng.integers(1, 6, 50)
        idx = torch.from_numpy(rng.integers(0, 120, lengths.sum()))
        off = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
        g = torch.randn(50, DIM)
        for s in stores:
            s.pooled("t", idx, off, mode="mean")
            s.apply_pooled_gradients("t", idx, off, g, mode="mean")
    a, b = (full_table(s, "t") for s in stores)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(a, full_table(make(str(tmp_path / "fresh"), ROWS, opt), "t"))
