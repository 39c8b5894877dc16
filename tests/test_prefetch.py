"""Store.prefetch: a table's next batch resolved on the store's prefetch thread while the
caller works on other tables. The same decisions, counts and rows as without it; errors at
once for bad input and from the table's next operation for a failed prefetch."""

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import dump
from tierstore.errors import InvalidInput

T, ROWS, DIM, BATCH, POOL = 3, 5000, 8, 64, 4


def _store(path, cache_rows=60, policy="adaptive"):
    spec = ts.TableSpec("t0", ROWS, DIM, optimizer=ts.RowWiseAdagrad(lr=0.05, eps=1e-8))
    s = ts.Store(path, ddr_bytes=T * cache_rows * ts.Store.cached_row_bytes(spec), policy=policy)
    for t in range(T):
        s.create_table(ts.TableSpec(f"t{t}", ROWS, DIM,
                                    optimizer=ts.RowWiseAdagrad(lr=0.05, eps=1e-8)))
    return s


def _batches(n, seed=0):
    """Zipf-ish ids (a hot head and a long tail, so the policy admits some misses and bypasses
    others) with BATCH bags of POOL ids per table."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = [torch.from_numpy(np.minimum(g.zipf(1.2, BATCH * POOL) - 1, ROWS - 1))
               for _ in range(T)]
        out.append(ids)
    return out


OFF = torch.arange(0, BATCH * POOL + 1, POOL)


def _train(s, batches, grads, prefetch):
    """Forward + backward of each batch over every table; with ``prefetch``, each table's
    next batch is prefetched right after its backward (the pipelined step). Returns the
    forward outputs."""
    outs = []
    for i, b in enumerate(batches):
        for t in range(T):
            outs.append(s.pooled(f"t{t}", b[t], OFF, include_last_offset=True))
            s.apply_pooled_gradients(f"t{t}", b[t], OFF, grads[i], include_last_offset=True)
            if prefetch and i + 1 < len(batches):
                s.prefetch(f"t{t}", batches[i + 1][t])
    return outs


def test_prefetched_training_equals_plain_training_bit_for_bit(tmp_path):
    batches = _batches(12)
    grads = [torch.randn(BATCH, DIM) for _ in batches]
    with _store(tmp_path / "a") as a, _store(tmp_path / "b") as b:
        plain = _train(a, batches, grads, prefetch=False)
        piped = _train(b, batches, grads, prefetch=True)
        sa, sb = a.stats()["tables"], b.stats()["tables"]
        for t in range(T):
            name = f"t{t}"
            assert sa[name]["bypassed"] > 0 and sa[name]["evictions"] > 0  # both paths taken
            for k in ("lookups", "hits", "misses", "evictions", "writebacks", "bypassed"):
                assert sa[name][k] == sb[name][k], (name, k)
            wa, st_a = dump(a, name)
            wb, st_b = dump(b, name)
            assert np.array_equal(wa, wb) and np.array_equal(st_a, st_b)
        for x, y in zip(plain, piped):
            assert torch.equal(x, y)


def test_prefetch_counts_a_batch_once_and_its_forward_uses_it(tmp_path):
    b = _batches(1)[0]
    with _store(tmp_path / "s") as s:
        s.prefetch("t0", b[0])
        after_prefetch = s.stats()["tables"]["t0"]
        assert after_prefetch["lookups"] == len(b[0])
        assert after_prefetch["misses"] > 0
        s.pooled("t0", b[0], OFF, include_last_offset=True)
        after_forward = s.stats()["tables"]["t0"]
        assert after_forward["lookups"] == len(b[0]), "the forward counted the batch again"
        assert after_forward["misses"] == after_prefetch["misses"]


def test_lookup_of_a_prefetched_batch_is_exact(tmp_path):
    b = _batches(2)
    with _store(tmp_path / "s") as s, _store(tmp_path / "ref") as ref:
        for i in range(2):
            s.prefetch("t1", b[i][1])
            got = s.lookup("t1", b[i][1])
            assert torch.equal(got, ref.lookup("t1", b[i][1]))
        assert s.stats()["tables"]["t1"]["lookups"] == ref.stats()["tables"]["t1"]["lookups"]


def test_a_different_batch_after_a_prefetch_is_resolved_again_correctly(tmp_path):
    b = _batches(3)
    grad = torch.randn(BATCH, DIM)
    with _store(tmp_path / "s") as s, _store(tmp_path / "ref") as ref:
        s.prefetch("t0", b[0][0])
        outs = []
        for store in (s, ref):
            outs.append(store.pooled("t0", b[1][0], OFF, include_last_offset=True))
            store.apply_pooled_gradients("t0", b[1][0], OFF, grad, include_last_offset=True)
        # residency differs (the unused prefetch admitted rows): the bags' sums may add in
        # another order, the rows' values may not
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
        for store in (s, ref):
            store.pooled("t0", b[2][0], OFF, include_last_offset=True)
        ids = torch.arange(ROWS)
        assert torch.equal(s.lookup("t0", ids), ref.lookup("t0", ids))
        # the unused prefetch counted its lookups once more than the reference
        st, rt = s.stats()["tables"]["t0"], ref.stats()["tables"]["t0"]
        assert st["lookups"] == rt["lookups"] + len(b[0][0])


def test_the_caller_may_reuse_its_buffer_after_prefetch(tmp_path):
    b = _batches(1)[0]
    buf = b[0].clone()
    with _store(tmp_path / "s") as s, _store(tmp_path / "ref") as ref:
        s.prefetch("t0", buf)
        buf.fill_(7)  # the prefetch copied the ids: batch b[0] is what it resolves
        got = s.pooled("t0", b[0], OFF, include_last_offset=True)
        assert torch.equal(got, ref.pooled("t0", b[0], OFF, include_last_offset=True))
        assert s.stats()["tables"]["t0"]["lookups"] == len(b[0])


@pytest.mark.parametrize("bad", [torch.tensor([0, ROWS]), torch.tensor([-1]),
                                 torch.tensor([0.5]), torch.zeros(2, 2, dtype=torch.long)])
def test_bad_ids_raise_at_prefetch_and_change_nothing(tmp_path, bad):
    with _store(tmp_path / "s") as s:
        s.lookup("t0", torch.arange(10))
        before = s.stats()["tables"]["t0"]
        with pytest.raises(InvalidInput):
            s.prefetch("t0", bad)
        assert s.stats()["tables"]["t0"] == before
        assert s.lookup("t0", torch.arange(3)).shape == (3, DIM)


def test_unknown_table_raises(tmp_path):
    with _store(tmp_path / "s") as s, pytest.raises(ts.UnknownTable):
        s.prefetch("nope", torch.arange(3))


def test_a_failed_prefetch_raises_from_the_tables_next_operation_once(tmp_path, monkeypatch):
    from tierstore.tiers.ddr import DDRCache

    def failing(self, ids):
        raise OSError("simulated SCM read error")
    b = _batches(1)[0]
    with _store(tmp_path / "s") as s:
        monkeypatch.setattr(DDRCache, "prefetch", failing)
        s.prefetch("t0", b[0])
        s.pooled("t1", b[1], OFF, include_last_offset=True)  # another table: unaffected
        with pytest.raises(OSError, match="simulated"):
            s.pooled("t0", b[0], OFF, include_last_offset=True)
        monkeypatch.undo()
        out = s.pooled("t0", b[0], OFF, include_last_offset=True)  # raised once; works again
        assert out.shape == (BATCH, DIM)


def test_prefetch_of_a_table_held_whole_is_a_no_op(tmp_path):
    with ts.Store(tmp_path / "s", ddr_bytes=64 << 20) as s:
        s.create_table(ts.TableSpec("t", 1000, 4))
        s.prefetch("t", torch.arange(100))
        assert s.stats()["tables"]["t"]["lookups"] == 0
        s.prefetch("t", torch.tensor([1000]))  # not even checked: nothing to do
        with pytest.raises(InvalidInput):  # the operation that uses the ids checks them
            s.pooled("t", torch.tensor([1000]), torch.tensor([0]))
        assert s.stats()["tables"]["t"]["lookups"] == 0


def test_close_flush_and_checkpoint_wait_for_a_running_prefetch(tmp_path):
    """A prefetch still running when the store flushes, checkpoints or closes: its admitted
    rows and the trained rows reach SCM, and the store reopens to the trained values."""
    batches = _batches(4)
    grads = [torch.randn(BATCH, DIM) for _ in batches]
    with _store(tmp_path / "ref") as ref:
        _train(ref, batches, grads, prefetch=False)
        expect = {f"t{t}": dump(ref, f"t{t}") for t in range(T)}
    s = _store(tmp_path / "s")
    _train(s, batches, grads, prefetch=True)
    s.prefetch("t2", batches[0][2])
    s.checkpoint(tmp_path / "ck", policy="full", bits=32)
    s.prefetch("t1", batches[1][1])
    s.flush()
    s.prefetch("t0", batches[2][0])
    s.close()
    with ts.Store(tmp_path / "s", ddr_bytes=1 << 20) as again:
        for name, (w, st) in expect.items():
            got_w, got_s = again.read_rows(name, np.arange(ROWS))
            assert np.array_equal(got_w, w) and np.array_equal(got_s, st)
