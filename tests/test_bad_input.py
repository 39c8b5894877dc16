"""Bad input raises a clear error naming the problem; the store stays usable and unchanged."""

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import dump


@pytest.fixture
def store(store_dir):
    s = ts.Store(store_dir, ddr_bytes=40 * ts.Store.cached_row_bytes(
        ts.TableSpec("t", 100, 8, optimizer=ts.RowWiseAdagrad())), policy="lru")
    s.create_table(ts.TableSpec("t", 100, 8, optimizer=ts.RowWiseAdagrad(lr=0.1)))
    s.apply_gradients("t", torch.arange(0, 100, 3), torch.randn(34, 8))
    yield s
    s.close()


IDX = torch.tensor([1, 2, 3, 4])
OFF = torch.tensor([0, 2])

BAD_CALLS = {
    "unknown table": (lambda s: s.lookup("nope", IDX), ts.UnknownTable, "nope"),
    "id out of range": (lambda s: s.lookup("t", torch.tensor([1, 100])), ts.InvalidInput, "< num_rows"),
    "negative id": (lambda s: s.lookup("t", torch.tensor([-1, 2])), ts.InvalidInput, ">= 0"),
    "float ids": (lambda s: s.lookup("t", torch.tensor([1.0, 2.0])), ts.InvalidInput, "integers"),
    "2-D ids": (lambda s: s.lookup("t", torch.zeros(2, 2, dtype=torch.long)), ts.InvalidInput, "1-D"),
    "offsets not monotone": (lambda s: s.pooled("t", IDX, torch.tensor([0, 3, 2])), ts.InvalidInput,
                             "non-decreasing"),
    "offsets out of bounds": (lambda s: s.pooled("t", IDX, torch.tensor([0, 5])), ts.InvalidInput,
                              "past the end"),
    "offsets not from 0": (lambda s: s.pooled("t", IDX, torch.tensor([1, 2])), ts.InvalidInput,
                           "start at 0"),
    "last offset mismatch": (lambda s: s.pooled("t", IDX, torch.tensor([0, 2, 3]),
                                                include_last_offset=True), ts.InvalidInput, "last offset"),
    "float offsets": (lambda s: s.pooled("t", IDX, torch.tensor([0.0, 2.0])), ts.InvalidInput, "integer"),
    "bad mode": (lambda s: s.pooled("t", IDX, OFF, mode="max"), ts.InvalidInput, "mode"),
    "psw with mean": (lambda s: s.pooled("t", IDX, OFF, mode="mean", per_sample_weights=torch.ones(4)),
                      ts.InvalidInput, "mode='sum'"),
    "psw wrong length": (lambda s: s.pooled("t", IDX, OFF, per_sample_weights=torch.ones(3)),
                         ts.InvalidInput, "shape (4,)"),
    "grads wrong shape": (lambda s: s.apply_gradients("t", IDX, torch.ones(4, 7)), ts.InvalidInput,
                          "shape (4, 8)"),
    "grads wrong dtype": (lambda s: s.apply_gradients("t", IDX, torch.ones(4, 8, dtype=torch.long)),
                          ts.InvalidInput, "floating point"),
    "grads not finite": (lambda s: s.apply_gradients("t", IDX, torch.full((4, 8), float("nan"))),
                         ts.InvalidInput, "NaN"),
    "grads with bad ids": (lambda s: s.apply_gradients("t", torch.tensor([1, 2, 3, 400]),
                                                       torch.ones(4, 8)), ts.InvalidInput, "num_rows"),
    "pooled grad wrong shape": (lambda s: s.apply_pooled_gradients("t", IDX, OFF, torch.ones(3, 8)),
                                ts.InvalidInput, "shape (2, 8)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_raises_and_changes_nothing(store, case):
    call, exc, words = BAD_CALLS[case]
    before = dump(store, "t")
    counters = dict(store.stats()["tables"]["t"])
    with pytest.raises(exc) as info:
        call(store)
    assert words in str(info.value)
    after = dump(store, "t")
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert store.stats()["tables"]["t"]["lookups"] == counters["lookups"]
    assert store.lookup("t", IDX).shape == (4, 8)  # still usable


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="bad name!", num_rows=10, dim=4), "table name"),
    (dict(name="t2", num_rows=0, dim=4), "num_rows"),
    (dict(name="t2", num_rows=10, dim=0), "dim"),
    (dict(name="t2", num_rows=10, dim=4, dtype="int8"), "dtype"),
    (dict(name="t2", num_rows=10, dim=4, init="ones"), "init"),
    (dict(name="t2", num_rows=10, dim=4, id_space="hashed"), "id_space"),
    (dict(name="t2", num_rows=10, dim=4, optimizer="adam"), "optimizer"),
])
def test_bad_spec(kwargs, words):
    with pytest.raises(ts.InvalidSpec, match=words):
        ts.TableSpec(**kwargs)


def test_bad_optimizer_hyper_parameters():
    with pytest.raises(ValueError, match="lr"):
        ts.RowWiseAdagrad(lr=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ts.Adagrad(eps=float("nan"))


def test_table_that_does_not_fit_and_duplicates(store):
    huge_rows = ts.TableSpec("wide", 10**9, 4096)
    with pytest.raises(ts.InvalidSpec, match="does not fit"):
        store.create_table(huge_rows)
    assert store.tables() == ["t"]
    with pytest.raises(ts.TableExists):
        store.create_table(ts.TableSpec("t", 5, 2))
    assert store.open_table("t").spec.num_rows == 100


def test_drop_table(store):
    store.create_table(ts.TableSpec("u", 10, 4))
    store.lookup("u", torch.tensor([1]))
    store.drop_table("u")
    assert store.tables() == ["t"]
    with pytest.raises(ts.UnknownTable):
        store.lookup("u", torch.tensor([1]))
    with pytest.raises(ts.UnknownTable):
        store.drop_table("u")
    store.create_table(ts.TableSpec("u", 10, 4, init="zeros"))  # the name is free again
    assert store.lookup("u", torch.tensor([1])).abs().sum() == 0


def test_closed_store_refuses_work(store_dir):
    s = ts.Store(store_dir, ddr_bytes=1 << 20)
    s.create_table(ts.TableSpec("t", 10, 4))
    s.close()
    with pytest.raises(ts.TierstoreError, match="closed"):
        s.lookup("t", torch.tensor([1]))


def test_bad_store_arguments(store_dir):
    with pytest.raises(ValueError, match="ddr_bytes"):
        ts.Store(store_dir, ddr_bytes=0)
    with pytest.raises(ValueError, match="lru"):
        ts.Store(store_dir, policy="fifo")
