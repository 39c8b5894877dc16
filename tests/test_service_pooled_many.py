"""``pooled_many``: pooled lookups of several tables with one resolve in flight while the client
pools the table before. A real tierstored process whose DRAM holds a few percent of the rows;
references from an embedded all-DRAM Store (rows are generated from (seed, id), so both hold
the same values)."""

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import ops
from tierstore.client import connection as connection_mod
from tierstore.client.attached import Stale

ROWS, DIM, TABLES = 20_000, 16, 4


def _spec(name):
    return ts.TableSpec(name, num_rows=ROWS, dim=DIM, optimizer=ts.RowWiseAdagrad(lr=0.05))


def _batches(seed, n=3000, bags=150):
    g = np.random.default_rng(seed)
    ids = [torch.from_numpy(g.integers(0, ROWS, n)) for _ in range(TABLES)]
    ids[1] = ids[1] % 50  # a few hot rows: resident after the first call
    offsets = [torch.arange(0, n, n // bags)] * TABLES
    psw = [None, None, torch.from_numpy(g.random(n).astype(np.float32)), None]
    return ids, offsets, psw


@pytest.fixture
def ref(tmp_path):
    with ts.Store(tmp_path / "ref", ddr_bytes=1 << 28) as store:
        for t in range(TABLES):
            store.create_table(_spec(f"t{t}"))
        yield store


def _names():
    return [f"t{t}" for t in range(TABLES)]


def _expected(ref, ids, offsets, psw, mode="sum"):
    return [ref.pooled(f"t{t}", ids[t], offsets[t], mode=mode, per_sample_weights=psw[t])
            for t in range(TABLES)]


def test_pooled_many_is_pooled_per_table_with_the_next_resolve_in_flight(small_service, ref,
                                                                          monkeypatch):
    events = []
    real_send, real_end = connection_mod.Connection._resolve_send, ops.pooled_end

    def send(self, t, *a):
        events.append(("send", t.name))
        return real_send(self, t, *a)

    def end(cache, *a):
        events.append(("pooled", cache.name))
        return real_end(cache, *a)
    monkeypatch.setattr(connection_mod.Connection, "_resolve_send", send)
    monkeypatch.setattr(ops, "pooled_end", end)
    with small_service.connect() as conn:
        for name in _names():
            conn.create_table(_spec(name))
        for seed in range(3):
            ids, offsets, psw = _batches(seed)
            events.clear()
            got = conn.pooled_many(_names(), ids, offsets, per_sample_weights=psw)
            for g, want in zip(got, _expected(ref, ids, offsets, psw)):
                torch.testing.assert_close(g, want, rtol=0, atol=1e-6)
            # table t2's resolve was sent before table t0's batch was pooled, and so on
            sends = [n for e, n in events if e == "send"]
            assert len(sends) >= 2
            for a, b in zip(sends, sends[1:]):
                assert events.index(("send", b)) < events.index(("pooled", a))
        mean = conn.pooled_many(_names(), ids, offsets, mode="mean")
        for g, want in zip(mean, _expected(ref, ids, offsets, [None] * TABLES, "mean")):
            torch.testing.assert_close(g, want, rtol=0, atol=1e-6)
        assert conn.stats()["tables"]["t0"]["bypassed"] > 0  # rows served from SCM too


def test_bad_input_in_the_middle_raises_and_leaves_the_connection_usable(small_service, ref):
    ids, offsets, psw = _batches(7)
    with small_service.connect() as conn:
        for name in _names():
            conn.create_table(_spec(name))
        bad = list(ids)
        bad[2] = bad[2].clone()
        bad[2][5] = -1
        with pytest.raises(ts.InvalidInput, match="t2"):
            conn.pooled_many(_names(), bad, offsets)
        with pytest.raises(ts.UnknownTable):
            conn.pooled_many(["t0", "t1", "nope", "t3"], ids, offsets)
        with pytest.raises(ts.InvalidInput, match="pooled_many"):
            conn.pooled_many(_names(), ids[:3], offsets)
        got = conn.pooled_many(_names(), ids, offsets)  # the protocol is still in step
        for g, want in zip(got, _expected(ref, ids, offsets, [None] * TABLES)):
            torch.testing.assert_close(g, want, rtol=0, atol=1e-6)
        one = conn.pooled("t3", ids[3], offsets[3])
        torch.testing.assert_close(one, got[3], rtol=0, atol=1e-6)


def test_a_refused_resolve_is_taken_again_by_the_plain_path(small_service, ref, monkeypatch):
    """A table re-planned while its resolve was in flight (the reply is Stale): pooled_many
    pools it again at the end, through pooled(), and still returns every table in order."""
    real = connection_mod.Connection._answer
    refused = []

    def answer(self, f):
        got = real(self, f)
        if not refused and f.i == 1:
            refused.append(f.i)
            return Stale("t1 (test)")
        return got
    monkeypatch.setattr(connection_mod.Connection, "_answer", answer)
    ids, offsets, _ = _batches(11)
    ids[1] = ids[0].flip(0)  # t1 misses too, so it has a resolve in flight
    with small_service.connect() as conn:
        for name in _names():
            conn.create_table(_spec(name))
        got = conn.pooled_many(_names(), ids, offsets)
    assert refused == [1]
    for g, want in zip(got, _expected(ref, ids, offsets, [None] * TABLES)):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-6)


def test_store_pooled_many_is_pooled_per_table(ref):
    ids, offsets, psw = _batches(3)
    got = ref.pooled_many(_names(), ids, offsets, per_sample_weights=psw)
    for g, want in zip(got, _expected(ref, ids, offsets, psw)):
        assert torch.equal(g, want)
    with pytest.raises(ts.InvalidInput, match="pooled_many"):
        ref.pooled_many(_names(), ids, offsets[:2])
