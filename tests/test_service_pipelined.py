"""The pipelined ``apply`` (docs/service.md): the client sends the update of rows not in DRAM
and goes on without its reply. A real tierstored process, real clients; references from the
embedded Store doing the same operations."""

import threading
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore.client import connection as connection_mod
from tierstore.tiers import pins
from conftest import full_table, kill_with_request_in_flight

ROWS, DIM = 20_000, 16


def _spec(name="t"):
    return ts.TableSpec(name, num_rows=ROWS, dim=DIM, optimizer=ts.RowWiseAdagrad(lr=0.05))


def _batch(seed, n=2000, bags=100):
    g = np.random.default_rng(seed)
    ids = torch.from_numpy(g.integers(0, ROWS, n))
    offsets = torch.arange(0, n, n // bags)
    return ids, offsets, torch.from_numpy(g.standard_normal((bags, DIM)).astype(np.float32))


def _reference(tmp_path, steps):
    """Final rows after ``steps`` [(table, (ids, offsets, grad))] in an all-DRAM embedded store."""
    with ts.Store(tmp_path / "ref", ddr_bytes=1 << 28) as ref:
        for name in sorted({t for t, _ in steps}):
            ref.create_table(_spec(name))
        for name, (ids, off, g) in steps:
            ref.apply_pooled_gradients(name, ids, off, g)
        return {name: full_table(ref, name) for name in sorted({t for t, _ in steps})}


def test_apply_returns_before_its_reply_and_lands_before_the_next_read(small_service, tmp_path):
    steps = [("t", _batch(1)), ("t", _batch(2))]
    with small_service.connect() as conn:
        conn.create_table(_spec())
        conn.apply_pooled_gradients("t", *steps[0][1])
        assert conn._pending is not None  # sent, reply not read
        conn.apply_pooled_gradients("t", *steps[1][1])
        got = conn.lookup("t", torch.arange(ROWS)).clone()  # drains, then reads
        assert conn._pending is None
        assert conn.stats()["tables"]["t"]["rows_on_scm"] > 0
    torch.testing.assert_close(got, _reference(tmp_path, steps)["t"], rtol=0, atol=1e-6)


def test_update_of_a_replanned_table_is_sent_again(small_service, tmp_path, monkeypatch):
    """The table is re-planned between the client pinning its batch and the service reading
    its apply: the reply is Stale, nothing was applied, and the client sends the same update
    to the new slab. Its resident writes (made under pins the re-plan waits for) are kept;
    nothing is applied twice."""
    step = ("t", _batch(3))
    with small_service.connect() as conn, small_service.connect() as other:
        conn.create_table(_spec())
        real = connection_mod.Connection._apply_pipelined
        creator = []

        def replan_first(self, t, rows, summed):
            # another client creates a table: the service retires t's slab and waits for
            # this client's pins, which are held until the operation ends
            th = threading.Thread(target=other.create_table, args=(_spec("u"),))
            th.start()
            creator.append(th)
            deadline = time.monotonic() + 10
            while not t.ctrl[pins.RETIRED]:
                assert time.monotonic() < deadline, "the re-plan never started"
                time.sleep(0.001)
            real(self, t, rows, summed)

        monkeypatch.setattr(connection_mod.Connection, "_apply_pipelined", replan_first)
        stale_replies = []
        real_drain = connection_mod.Connection._reply

        def watch(self):
            reply = real_drain(self)
            stale_replies.append(reply.get("type"))
            return reply

        monkeypatch.setattr(connection_mod.Connection, "_reply", watch)
        conn.apply_pooled_gradients("t", *step[1])
        monkeypatch.setattr(connection_mod.Connection, "_apply_pipelined", real)
        creator[0].join(30)
        assert not creator[0].is_alive()
        got = conn.lookup("t", torch.arange(ROWS)).clone()
        assert "Stale" in stale_replies  # the service did refuse the first send
        assert "u" in conn.tables()
    torch.testing.assert_close(got, _reference(tmp_path, [step])["t"], rtol=0, atol=1e-6)


def test_overflowing_summed_gradients_refused_before_any_write(small_service, tmp_path):
    """Finite per-bag gradients whose sum for one row overflows: refused by the client, before
    it sends anything or writes a resident row."""
    with small_service.connect() as conn:
        conn.create_table(_spec())
        far = [17_000, 19_000]  # never read before the update: not resident
        ids = torch.tensor([far[0], far[0], far[1], far[1], 3])
        before = conn.lookup("t", torch.arange(1000)).clone()  # row 3 resident
        grad = torch.full((5, DIM), 3e38)
        with pytest.raises(ts.InvalidInput, match="summed gradients contain NaN or infinity"):
            conn.apply_pooled_gradients("t", ids, torch.arange(5), grad)
        assert conn._pending is None
        torch.testing.assert_close(conn.lookup("t", torch.arange(1000)), before, rtol=0,
                                   atol=0)
        got_far = conn.lookup("t", torch.tensor(far)).clone()
    with ts.Store(tmp_path / "ref") as ref:  # rows never updated hold their initial values
        ref.create_table(_spec())
        torch.testing.assert_close(got_far, ref.lookup("t", torch.tensor(far)), rtol=0, atol=0)


def test_service_killed_with_an_update_in_flight(tmp_path):
    """The service dies with an apply unanswered: the client's next operation on another
    table raises ConnectionLost within a second instead of waiting for the reply."""
    def send(conn):
        conn.apply_pooled_gradients("t", *_batch(4))
        assert conn._pending is not None
    kill_with_request_in_flight(tmp_path / "svc", send)
