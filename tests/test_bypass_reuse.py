"""Rows the policy does not admit are read from SCM in the forward (a Bypass) and updated on
SCM in the backward; the backward reuses the forward's read while the row file is unchanged
(RowFile.generation), and reads the file again once anything wrote it."""

import threading

import numpy as np
import pytest
import torch

import tierstore as ts
from test_store_policies import store_with_cache

HOT = torch.arange(64)
COLD = torch.arange(5000, 5100)


def _warm(s):
    for _ in range(5):
        s.lookup("t", HOT)


def _count_reads(store):
    """Wrap the table's row file read (the real one runs) to count the rows read from it."""
    backing = store._entry("t").backing
    real, seen = backing.read, []

    def read(rows):
        seen.append(len(rows))
        return real(rows)
    backing.read = read
    return seen


def test_backward_reuses_the_forward_bypass_read(tmp_path):
    batch = torch.cat([HOT, COLD])
    off = torch.arange(0, len(batch), 4)
    grad = torch.randn(len(off), 4)
    with store_with_cache(tmp_path / "s", "adaptive", cache_rows=64) as s, \
            ts.Store(tmp_path / "ref", ddr_bytes=1 << 20) as ref:
        ref.create_table(ts.TableSpec("t", 20_000, 4, optimizer=ts.SGD(0.1)))
        _warm(s)
        seen = _count_reads(s)
        out = s.pooled("t", batch, off)
        assert s.stats()["tables"]["t"]["bypassed"] >= len(COLD)
        forward_reads = sum(seen)
        s.apply_pooled_gradients("t", batch, off, grad)
        assert sum(seen) == forward_reads, "the backward read SCM again"
        torch.testing.assert_close(out, ref.pooled("t", batch, off), rtol=0, atol=0)
        ref.apply_pooled_gradients("t", batch, off, grad)
        ids = torch.cat([batch, torch.arange(200, 300)])
        assert torch.equal(s.lookup("t", ids), ref.lookup("t", ids))


def test_a_write_between_forward_and_backward_is_not_lost(tmp_path):
    """write_rows on bypassed rows after the forward: the backward updates the new values."""
    batch = torch.cat([HOT, COLD])
    with store_with_cache(tmp_path / "s", "adaptive", cache_rows=64) as s:
        _warm(s)
        s.lookup("t", batch)
        assert s.stats()["tables"]["t"]["bypassed"] >= len(COLD)
        rows = COLD[:10].numpy()
        new_w = np.full((10, 4), 3.0, dtype=np.float32)
        s.write_rows("t", rows, new_w, np.zeros((10, 0), dtype=np.float32))
        s.apply_gradients("t", COLD[:10], torch.ones(10, 4))
        got = s.lookup("t", COLD[:10])
        assert torch.equal(got, torch.full((10, 4), 3.0 - 0.1))


@pytest.mark.parametrize("policy", ["adaptive", "lru"])
def test_backward_reuses_forward_positions_only_for_the_same_ids(tmp_path, policy):
    """The backward takes the forward's slab positions when its ids equal the forward's and
    nothing moved since; ids changed in place after the forward, or a batch that admitted
    rows in between, are looked up again (each compared with an all-DRAM store)."""
    batch = torch.cat([HOT, COLD])
    off = torch.arange(0, len(batch), 4)
    grad = torch.randn(len(off), 4)
    with store_with_cache(tmp_path / "s", policy, cache_rows=64) as s, \
            ts.Store(tmp_path / "ref", ddr_bytes=1 << 20) as ref:
        ref.create_table(ts.TableSpec("t", 20_000, 4, optimizer=ts.SGD(0.1)))
        _warm(s)
        for step in range(3):
            ids = batch.clone()
            s.pooled("t", ids, off)
            if step == 1:  # the same tensor, other rows, before the backward
                ids[:8] = torch.arange(9000, 9008)
            if step == 2:  # another batch moves rows in and out in between
                s.lookup("t", torch.arange(7000, 7200))
                ref.lookup("t", torch.arange(7000, 7200))
            s.apply_pooled_gradients("t", ids, off, grad)
            ref.apply_pooled_gradients("t", ids, off, grad)
        every = torch.cat([HOT, COLD, torch.arange(9000, 9008), torch.arange(7000, 7200)])
        assert torch.equal(s.lookup("t", every), ref.lookup("t", every))


def test_scm_update_runs_behind_and_keeps_its_own_gradient(tmp_path):
    """The update of bypassed rows runs on the row file's write thread after the backward
    returns (RowFile.update); the caller may overwrite its gradient at once without changing
    that update, and the next read of those rows sees it."""
    from tierstore.tiers import write_behind
    batch = torch.cat([HOT, COLD])
    off = torch.arange(0, len(batch), 4)
    grad = torch.randn(len(off), 4)
    want_grad = grad.clone()
    with store_with_cache(tmp_path / "s", "adaptive", cache_rows=64) as s, \
            ts.Store(tmp_path / "ref", ddr_bytes=1 << 20) as ref:
        ref.create_table(ts.TableSpec("t", 20_000, 4, optimizer=ts.SGD(0.1)))
        _warm(s)
        s.pooled("t", batch, off)
        hold = threading.Event()
        blocker = write_behind._current().submit(hold.wait, 10)  # the write thread is busy
        s.apply_pooled_gradients("t", batch, off, grad)
        grad.fill_(1e3)  # the caller reuses its buffer before the update has run
        hold.set()
        blocker.result()
        ref.apply_pooled_gradients("t", batch, off, want_grad)
        assert torch.equal(s.lookup("t", batch), ref.lookup("t", batch))
