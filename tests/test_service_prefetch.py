"""Connection.prefetch: a table's next batch resolved by a real tierstored while the client
works on other tables. Two tables with the same spec trained on the same batches, one with
prefetch and one without, end bit for bit equal, each batch counted once."""

import numpy as np
import pytest
import torch

import tierstore as ts
from conftest import kill_with_request_in_flight
from tierstore.errors import InvalidInput

ROWS, DIM, BATCH, POOL = 20_000, 16, 64, 8
OFF = torch.arange(0, BATCH * POOL + 1, POOL)


def _spec(name):
    return ts.TableSpec(name, num_rows=ROWS, dim=DIM, optimizer=ts.RowWiseAdagrad(lr=0.05))


def _batches(n, seed=0):
    g = np.random.default_rng(seed)
    return [torch.from_numpy(np.minimum(g.zipf(1.1, BATCH * POOL) - 1, ROWS - 1))
            for _ in range(n)]


def _rows(conn, name):
    return conn.lookup(name, torch.arange(ROWS)).clone()


def _counts(conn, name):
    st = conn.stats()["tables"][name]
    return {k: st[k] for k in ("lookups", "hits", "misses", "bypassed")}


@pytest.mark.parametrize("forward", ["pooled", "pooled_many"])
def test_prefetched_table_trains_like_a_plain_one(small_service, forward):
    batches = _batches(10)
    grads = [torch.randn(BATCH, DIM) for _ in batches]
    with small_service.connect() as conn:
        conn.create_table(_spec("a"))
        conn.create_table(_spec("b"))
        for i, b in enumerate(batches):
            if forward == "pooled":
                outs = [conn.pooled(n, b, OFF, include_last_offset=True) for n in ("a", "b")]
            else:
                outs = conn.pooled_many(["a", "b"], [b, b], [OFF, OFF],
                                        include_last_offset=True)
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
            for n in ("a", "b"):
                conn.apply_pooled_gradients(n, b, OFF, grads[i], include_last_offset=True)
                if n == "a" and i + 1 < len(batches):
                    conn.prefetch("a", batches[i + 1])  # in flight beside b's update
        ca, cb = _counts(conn, "a"), _counts(conn, "b")
        # each batch counted once (the two tables' policies need not decide alike: their
        # sketches hash differently)
        assert ca["lookups"] == cb["lookups"] == len(batches) * BATCH * POOL
        assert ca["misses"] > 0
        assert torch.equal(_rows(conn, "a"), _rows(conn, "b"))


def test_prefetch_counts_once_and_a_different_batch_is_resolved_again(small_service):
    b0, b1 = _batches(2, seed=3)
    with small_service.connect() as conn, \
            ts.Store(small_service.root + "/ref", ddr_bytes=1 << 26) as ref:
        conn.create_table(_spec("a"))
        ref.create_table(_spec("a"))
        conn.prefetch("a", b0)  # counted now; stats() keeps it (no re-plan)
        assert conn.stats()["tables"]["a"]["lookups"] == len(b0)
        out = conn.pooled("a", b0, OFF, include_last_offset=True)  # the prefetch is used
        assert conn.stats()["tables"]["a"]["lookups"] == len(b0)
        torch.testing.assert_close(out, ref.pooled("a", b0, OFF, include_last_offset=True),
                                   rtol=1e-6, atol=1e-6)
        conn.prefetch("a", b0)
        out = conn.pooled("a", b1, OFF, include_last_offset=True)  # not the prefetched batch
        torch.testing.assert_close(out, ref.pooled("a", b1, OFF, include_last_offset=True),
                                   rtol=1e-6, atol=1e-6)
        assert conn.stats()["tables"]["a"]["lookups"] == 3 * len(b0)


def test_an_update_before_the_prefetched_forward_gives_it_up(small_service):
    b0, b1 = _batches(2, seed=4)
    g = torch.randn(BATCH, DIM)
    with small_service.connect() as conn, \
            ts.Store(small_service.root + "/ref", ddr_bytes=1 << 26) as ref:
        for api in (conn, ref):
            api.create_table(_spec("a"))
        conn.prefetch("a", b1)
        for api in (conn, ref):
            api.apply_pooled_gradients("a", b0, OFF, g, include_last_offset=True)
        out = conn.pooled("a", b1, OFF, include_last_offset=True)
        torch.testing.assert_close(out, ref.pooled("a", b1, OFF, include_last_offset=True),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(_rows(conn, "a"), ref.lookup("a", torch.arange(ROWS)))


def test_bad_ids_raise_at_prefetch_and_the_connection_stays_usable(small_service):
    with small_service.connect() as conn:
        conn.create_table(_spec("a"))
        for bad in (torch.tensor([ROWS]), torch.tensor([-1]), torch.tensor([0.5])):
            with pytest.raises(InvalidInput):
                conn.prefetch("a", bad)
        with pytest.raises(ts.UnknownTable):
            conn.prefetch("nope", torch.arange(3))
        assert conn.pooled("a", torch.arange(8), torch.tensor([0])).shape == (1, DIM)


def test_create_table_while_a_prefetch_holds_pins(small_service):
    """The client's own re-plan (a new table changes every share) would wait for the
    prefetched batch's pins: the connection gives the prefetch up first, and the batch is
    resolved again (on the new slab) when it runs."""
    b0 = _batches(1, seed=5)[0]
    with small_service.connect() as conn, \
            ts.Store(small_service.root + "/ref", ddr_bytes=1 << 26) as ref:
        for api in (conn, ref):
            api.create_table(_spec("a"))
        conn.pooled("a", b0, OFF, include_last_offset=True)
        conn.prefetch("a", b0)
        conn.create_table(_spec("c"))  # re-plans DRAM: would time out on held pins
        out = conn.pooled("a", b0, OFF, include_last_offset=True)
        torch.testing.assert_close(out, ref.pooled("a", b0, OFF, include_last_offset=True),
                                   rtol=1e-6, atol=1e-6)


def test_service_killed_with_a_prefetch_in_flight(tmp_path):
    """The service dies with a prefetch unanswered: the next call raises ConnectionLost within
    a second (conftest.kill_with_request_in_flight)."""
    def send(conn):
        conn.prefetch("t", _batches(1)[0])
        assert conn._inflight
    kill_with_request_in_flight(tmp_path / "svc", send)
