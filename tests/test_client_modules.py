"""TierEmbeddingBag / TierEmbeddingBagCollection over an embedded Store: forward against
nn.EmbeddingBag, backward against torch autograd plus the reference optimizer step, and the
TorchRec KeyedJaggedTensor / KeyedTensor path."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import tierstore as ts
from conftest import full_table
from test_store_exactness import ref_update
from tierstore.client.modules import TierEmbeddingBag, TierEmbeddingBagCollection

DIM = 8
ROWS = 60


def open_store(store_dir, specs, cache_rows=None):
    """A store with ``specs``; cache_rows limits DRAM so rows are evicted and reloaded."""
    ddr = 8 << 20 if cache_rows is None else cache_rows * sum(
        ts.Store.cached_row_bytes(s) for s in specs)
    store = ts.Store(store_dir, ddr_bytes=ddr, policy="lru")
    for s in specs:
        store.create_table(s)
    return store


def spec(name="t", optimizer=None, dim=DIM, seed=7):
    return ts.TableSpec(name, ROWS, dim, optimizer=optimizer or ts.SGD(0.5), seed=seed)


def bags(rng, batch, choices=(0, 1, 2, 4, 8)):
    """Bag lengths (powers of two and empty bags: sums and means are exact in any order)."""
    lengths = rng.choice(choices, batch)
    idx = torch.from_numpy(rng.integers(0, ROWS, lengths.sum()))
    starts = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return idx, starts, torch.from_numpy(lengths)


def int_grad(rng, shape):
    return torch.from_numpy(rng.integers(-4, 5, shape).astype(np.float32))


# -- TierEmbeddingBag: forward ------------------------------------------------------------------
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("cache_rows", [None, 9])
def test_forward_equals_embedding_bag(store_dir, rng, mode, include_last_offset, cache_rows):
    store = open_store(store_dir, [spec()], cache_rows)
    w = full_table(store, "t")
    ref = nn.EmbeddingBag.from_pretrained(w, mode=mode, include_last_offset=include_last_offset)
    m = TierEmbeddingBag(store, "t", mode=mode, include_last_offset=include_last_offset)
    assert m.embedding_dim == DIM and m.table == "t" and list(m.parameters()) == []
    for _ in range(3):
        idx, starts, _ = bags(rng, 16)
        off = torch.cat([starts, torch.tensor([len(idx)])]) if include_last_offset else starts
        got = m(idx, off)
        assert got.requires_grad and got.shape == (16, DIM)
        torch.testing.assert_close(got, ref(idx, off), rtol=1e-6, atol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(m(idx, off), ref(idx, off), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_forward_per_sample_weights(store_dir, rng, include_last_offset):
    store = open_store(store_dir, [spec()])
    w = full_table(store, "t")
    idx, starts, _ = bags(rng, 12)
    off = torch.cat([starts, torch.tensor([len(idx)])]) if include_last_offset else starts
    psw = torch.rand(len(idx))
    m = TierEmbeddingBag(store, "t", include_last_offset=include_last_offset)
    want = F.embedding_bag(idx, w, off, mode="sum", per_sample_weights=psw,
                           include_last_offset=include_last_offset)
    torch.testing.assert_close(m(idx, off, psw), want)


# -- TierEmbeddingBag: backward = the optimizer step ---------------------------------------------
OPTS = [ts.SGD(lr=0.3), ts.RowWiseAdagrad(lr=0.2, eps=1e-6, weight_decay=0.01)]


def reference_step(w0, opt, idx, off, grad_out, mode, include_last_offset=False, psw=None):
    """Weights after one step: autograd through nn.EmbeddingBag, then the reference optimizer
    on the rows the batch looked up (FBGEMM's semantics)."""
    ref = nn.EmbeddingBag.from_pretrained(w0.clone(), freeze=False, mode=mode,
                                          include_last_offset=include_last_offset)
    ref(idx, off, per_sample_weights=psw).backward(grad_out)
    u = torch.unique(idx)
    w = w0.clone()
    w[u], _ = ref_update(opt.kind, w0[u], torch.zeros(len(u), opt.state_dim(DIM)),
                         ref.weight.grad[u], opt)
    return w


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: o.kind)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_backward_applies_the_optimizer_like_autograd(store_dir, rng, opt, mode,
                                                      include_last_offset):
    store = open_store(store_dir, [spec(optimizer=opt)], cache_rows=30)
    w0 = full_table(store, "t")
    idx, starts, _ = bags(rng, 24)
    off = torch.cat([starts, torch.tensor([len(idx)])]) if include_last_offset else starts
    target = int_grad(rng, (24, DIM))
    m = TierEmbeddingBag(store, "t", mode=mode, include_last_offset=include_last_offset)
    (m(idx, off) * target).sum().backward()  # d loss / d out = target
    want = reference_step(w0, opt, idx, off, target, mode, include_last_offset)
    got = full_table(store, "t")
    assert not torch.equal(got, w0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_backward_is_one_step_and_no_grad_records_nothing(store_dir, rng):
    store = open_store(store_dir, [spec(optimizer=ts.SGD(0.5))])
    w0 = full_table(store, "t")
    idx, off, _ = bags(rng, 10)
    m = TierEmbeddingBag(store, "t")
    with torch.no_grad():
        out = m(idx, off)
    assert not out.requires_grad and out.grad_fn is None
    out = m(idx, off)
    grad = int_grad(rng, (10, DIM))
    out.backward(grad, retain_graph=True)
    once = full_table(store, "t")
    out.backward(grad)  # the same graph again: a second step, applied at once
    twice = full_table(store, "t")
    leaf = w0.clone().requires_grad_()
    F.embedding_bag(idx, leaf, off, mode="sum").backward(grad)
    torch.testing.assert_close(once, w0 - 0.5 * leaf.grad)
    torch.testing.assert_close(twice, w0 - 2 * 0.5 * leaf.grad)


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_per_sample_weight_gradient_equals_autograd(store_dir, rng, include_last_offset):
    opt = ts.SGD(0.25)
    store = open_store(store_dir, [spec(optimizer=opt)])
    w0 = full_table(store, "t")
    idx, starts, _ = bags(rng, 16)
    off = torch.cat([starts, torch.tensor([len(idx)])]) if include_last_offset else starts
    psw0 = torch.rand(len(idx))
    grad = int_grad(rng, (16, DIM))
    m = TierEmbeddingBag(store, "t", include_last_offset=include_last_offset)
    psw = psw0.clone().requires_grad_()
    m(idx, off, psw).backward(grad)

    ref_psw = psw0.clone().requires_grad_()
    leaf = w0.clone().requires_grad_()
    F.embedding_bag(idx, leaf, off, mode="sum", per_sample_weights=ref_psw,
                    include_last_offset=include_last_offset).backward(grad)
    assert psw.grad is not None and psw.grad.abs().sum() > 0
    torch.testing.assert_close(psw.grad, ref_psw.grad)  # from the rows before the update
    torch.testing.assert_close(full_table(store, "t"), w0 - 0.25 * leaf.grad)


def test_weights_without_grad_get_none(store_dir, rng):
    store = open_store(store_dir, [spec()])
    idx, off, _ = bags(rng, 4, choices=(1, 2))
    psw = torch.rand(len(idx))
    m = TierEmbeddingBag(store, "t")
    m(idx, off, psw).sum().backward()
    assert psw.grad is None


# -- TierEmbeddingBagCollection ------------------------------------------------------------------
FEATURES = {"f_user": "a", "f_item": "b", "f_hist": "a"}  # f_user and f_hist share table a


def collection_store(store_dir, opt=None):
    return open_store(store_dir, [spec("a", opt, seed=1), spec("b", opt, dim=4, seed=2)],
                      cache_rows=40)


def jagged(rng, keys, batch, weighted=False):
    per_key = [bags(rng, batch) for _ in keys]
    values = torch.cat([p[0] for p in per_key])
    lengths = torch.cat([p[2] for p in per_key])
    weights = torch.rand(len(values)) if weighted else None
    return values, lengths, weights


def test_collection_equals_one_module_per_feature(store_dir, rng):
    store = collection_store(store_dir)
    ebc = TierEmbeddingBagCollection(store, FEATURES)
    assert ebc.embedding_dims == {"f_user": DIM, "f_item": 4, "f_hist": DIM}
    assert ebc.tables == ["a", "b"] and len(ebc.embedding_bags) == 2
    assert ebc.embedding_bag("f_hist") is ebc.embedding_bag("f_user")
    keys = ["f_item", "f_user", "f_hist"]
    values, lengths, weights = jagged(rng, keys, 6, weighted=True)
    for w in (None, weights):
        out = ebc(keys, values, lengths, w)
        assert list(out) == keys
        start = 0
        for i, key in enumerate(keys):
            lens = lengths[i * 6:(i + 1) * 6]
            idx = values[start:start + int(lens.sum())]
            psw = None if w is None else w[start:start + len(idx)]
            start += len(idx)
            single = TierEmbeddingBag(store, FEATURES[key])
            want = single(idx, torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)[:-1]]),
                          psw)
            assert out[key].shape == (6, ebc.embedding_dims[key])
            torch.testing.assert_close(out[key], want)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_collection_training_step_sums_shared_table_gradients(store_dir, rng, mode):
    opt = ts.RowWiseAdagrad(lr=0.2, eps=1e-6)
    store = collection_store(store_dir, opt)
    w0 = {t: full_table(store, t) for t in ("a", "b")}
    ebc = TierEmbeddingBagCollection(store, FEATURES, mode=mode)
    keys = list(FEATURES)
    values, lengths, _ = jagged(rng, keys, 8)
    targets = {k: int_grad(rng, (8, ebc.embedding_dims[k])) for k in keys}
    out = ebc(keys, values, lengths)
    sum((out[k] * targets[k]).sum() for k in keys).backward()

    # Reference: one nn.EmbeddingBag per table, every feature through its table's bag, one
    # optimizer step per table on the summed gradient.
    ref = {t: nn.EmbeddingBag.from_pretrained(w.clone(), freeze=False, mode=mode)
           for t, w in w0.items()}
    start, looked_up, loss = 0, {"a": [], "b": []}, 0
    for i, key in enumerate(keys):
        lens = lengths[i * 8:(i + 1) * 8]
        idx = values[start:start + int(lens.sum())]
        start += len(idx)
        off = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)[:-1]])
        loss = loss + (ref[FEATURES[key]](idx, off) * targets[key]).sum()
        looked_up[FEATURES[key]].append(idx)
    loss.backward()
    for t in ("a", "b"):
        u = torch.unique(torch.cat(looked_up[t]))
        want = w0[t].clone()
        dim = w0[t].shape[1]
        want[u], _ = ref_update(opt.kind, w0[t][u], torch.zeros(len(u), 1),
                                ref[t].weight.grad[u], opt)
        assert not torch.equal(full_table(store, t), w0[t])
        torch.testing.assert_close(full_table(store, t), want, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"table {t} (dim {dim}): {m}")


def test_keyed_jagged_tensor_path_and_keyed_tensor_output(store_dir, rng):
    store = collection_store(store_dir)
    ebc = TierEmbeddingBagCollection(store, FEATURES)
    keys = ["f_user", "f_item", "f_hist"]
    values, lengths, weights = jagged(rng, keys, 5, weighted=True)
    for w in (None, weights):
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths,
                                                  weights=w)
        plain = ebc(keys, values, lengths, w)
        from_kjt = ebc(kjt)
        assert list(from_kjt) == keys
        for k in keys:
            assert torch.equal(from_kjt[k], plain[k])
        kt = ebc.forward_keyed(kjt)
        assert isinstance(kt, KeyedTensor)
        assert kt.keys() == keys and kt.length_per_key() == [DIM, 4, DIM]
        assert kt.values().shape == (5, 2 * DIM + 4)
        for k in keys:
            assert torch.equal(kt[k], plain[k])
        assert torch.equal(ebc.forward_keyed(keys, values, lengths, w).values(), kt.values())


def test_keyed_tensor_output_trains_like_the_dict(store_dir, rng):
    opt = ts.SGD(0.5)
    keys = ["f_user", "f_item"]
    values, lengths, _ = jagged(rng, keys, 4)
    grad = int_grad(rng, (4, DIM + 4))
    after = []
    for i, keyed in enumerate((False, True)):
        store = collection_store(f"{store_dir}-{i}", opt)
        ebc = TierEmbeddingBagCollection(store, FEATURES)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        if keyed:
            out = ebc.forward_keyed(kjt).values()
        else:
            out = torch.cat(list(ebc(kjt).values()), dim=1)
        out.backward(grad)
        after.append([full_table(store, t) for t in ("a", "b")])
        store.close()
    for x, y in zip(*after):
        assert torch.equal(x, y)


# -- errors ----------------------------------------------------------------------------------------
def test_errors_name_the_problem(store_dir, rng, monkeypatch):
    store = collection_store(store_dir)
    with pytest.raises(ValueError, match="mode must be 'sum' or 'mean'"):
        TierEmbeddingBag(store, "a", mode="max")
    with pytest.raises(ValueError, match="mode must be"):
        TierEmbeddingBagCollection(store, FEATURES, mode="max")
    with pytest.raises(ts.UnknownTable):
        TierEmbeddingBag(store, "nope")
    m = TierEmbeddingBag(store, "a", mode="mean")
    with pytest.raises(ts.InvalidInput, match="per_sample_weights need mode='sum'"):
        m(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))
    with pytest.raises(ts.InvalidInput, match="indices must be a 1-D integer"):
        m(torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(ts.InvalidInput, match="offset 3 is past the end"):
        m(torch.tensor([1, 2]), torch.tensor([0, 3]))  # past the end: the store's check
    assert "table='a', embedding_dim=8, mode='mean'" in repr(m)

    ebc = TierEmbeddingBagCollection(store, FEATURES)
    v, lens = torch.tensor([1, 2, 3]), torch.tensor([1, 2])
    with pytest.raises(ts.InvalidInput, match=r"unknown features \['zzz'\]"):
        ebc(["f_user", "zzz"], v, lens)
    with pytest.raises(ts.InvalidInput, match="lengths sum to 3 but values has 2"):
        ebc(["f_user", "f_item"], v[:2], lens)
    with pytest.raises(ts.InvalidInput, match="not a multiple of the 2 keys"):
        ebc(["f_user", "f_item"], v, torch.tensor([1, 1, 1]))
    with pytest.raises(ts.InvalidInput, match="lengths must be >= 0"):
        ebc(["f_user", "f_item"], v, torch.tensor([4, -1]))
    with pytest.raises(ts.InvalidInput, match="more than once"):
        ebc(["f_user", "f_user"], v, lens)
    with pytest.raises(ts.InvalidInput, match="weights must be floating point of shape"):
        ebc(["f_user", "f_item"], v, lens, torch.ones(2))
    with pytest.raises(ts.InvalidInput, match="values and lengths are required"):
        ebc(["f_user"])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f_user", "f_item"], values=v, lengths=lens)
    with pytest.raises(ts.InvalidInput, match="not both"):
        ebc(kjt, v, lens)
    with pytest.raises(ts.InvalidInput, match="weights need mode='sum'"):
        TierEmbeddingBagCollection(store, FEATURES, mode="mean")(
            ["f_user", "f_item"], v, lens, torch.ones(3))
    monkeypatch.setitem(sys.modules, "torchrec.sparse.jagged_tensor", None)
    with pytest.raises(ImportError, match="forward_keyed needs torchrec"):
        ebc.forward_keyed(["f_user", "f_item"], v, lens)
