"""tierstored end to end: a real service process, real clients, real shared memory.

Reference results come from the embedded Store doing the same operations: placement in tiers
must never change a value.
"""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore.client import connect
from conftest import Service, full_table


def _spec(name="t", rows=20_000, dim=16, opt=None, **kw):
    return ts.TableSpec(name, num_rows=rows, dim=dim,
                        optimizer=opt or ts.RowWiseAdagrad(lr=0.05), **kw)


def _batches(rng, rows, n_batches, batch=64, pooling=8, alpha=1.1):
    out = []
    for _ in range(n_batches):
        ids = np.minimum(rng.zipf(alpha, batch * pooling) - 1, rows - 1)
        lengths = rng.integers(0, 2 * pooling, batch)
        lengths = (lengths * (len(ids) / max(lengths.sum(), 1))).astype(np.int64)
        lengths[-1] += len(ids) - lengths.sum()
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out.append((torch.from_numpy(ids), torch.from_numpy(offsets),
                    torch.randn(batch, 16)))
    return out


def _train(api, table, batches, mode="sum"):
    outs = []
    for ids, off, g in batches:
        outs.append(api.pooled(table, ids, off, mode=mode).clone())
        api.apply_pooled_gradients(table, ids, off, g, mode=mode)
    return outs


@pytest.mark.parametrize("policy_ddr", ["8MiB", "64KiB"])
def test_client_equals_embedded_store(tmp_path, rng, policy_ddr):
    """Pooled forward and fused backward through the service give exactly the embedded
    Store's values, with the table all in DRAM and with 64 KiB (eviction, bypass, SCM)."""
    batches = _batches(rng, 20_000, 12)
    svc = Service(tmp_path / "svc", ddr_bytes=policy_ddr).start()
    try:
        with svc.connect() as conn:
            conn.create_table(_spec())
            got = _train(conn, "t", batches) + _train(conn, "t", batches[:3], mode="mean")
            final = conn.lookup("t", torch.arange(20_000)).clone()
            st = conn.stats()["tables"]["t"]
    finally:
        assert svc.stop() == 0
    with ts.Store(tmp_path / "ref", ddr_bytes=1 << 30) as ref:
        ref.create_table(_spec())
        want = _train(ref, "t", batches) + _train(ref, "t", batches[:3], mode="mean")
        want_final = full_table(ref, "t")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(final, want_final, rtol=0, atol=1e-6)
    assert st["lookups"] > 0 and 0 < st["hits"] <= st["lookups"]
    if policy_ddr == "64KiB":
        assert st["evictions"] > 0


_TRAINER = textwrap.dedent("""
    import sys, numpy as np, torch
    from tierstore.client import connect
    run_dir, table, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    g = np.random.default_rng(seed)
    conn = connect(run_dir)
    for step in range(steps):
        ids = torch.from_numpy(g.integers(0, 5000, 400))
        off = torch.arange(0, 400, 8)
        conn.pooled(table, ids, off)
        conn.apply_pooled_gradients(table, ids, off, torch.from_numpy(
            g.standard_normal((50, 16)).astype(np.float32)))
        if step == 0:
            print("ready", flush=True)
    print("done", flush=True)
    conn.close()
""")


def _trainer(svc, table, seed, steps):
    return subprocess.Popen([sys.executable, "-c", _TRAINER, svc.run_dir, table, str(seed),
                             str(steps)], stdout=subprocess.PIPE, text=True)


def _replay(tmp_path, tables_seeds, steps):
    """What the trainers above write, computed by the embedded store."""
    out = {}
    with ts.Store(tmp_path / "replay", ddr_bytes=1 << 28) as ref:
        for table, seed in tables_seeds:
            ref.create_table(_spec(table, rows=5000))
            g = np.random.default_rng(seed)
            for _ in range(steps):
                ids = torch.from_numpy(g.integers(0, 5000, 400))
                off = torch.arange(0, 400, 8)
                ref.apply_pooled_gradients(table, ids, off, torch.from_numpy(
                    g.standard_normal((50, 16)).astype(np.float32)))
            out[table] = full_table(ref, table)
    return out


def test_two_trainers_sigterm_restart_reads_back(tmp_path):
    """Two client processes train their own tables; SIGTERM writes back; a restarted service
    serves exactly what was written (1 MiB of DRAM: rows travel to SCM and back)."""
    svc = Service(tmp_path / "svc", ddr_bytes="1MiB").start()
    with svc.connect() as conn:
        conn.create_table(_spec("a", rows=5000))
        conn.create_table(_spec("b", rows=5000))
    procs = [_trainer(svc, "a", 1, 15), _trainer(svc, "b", 2, 15)]
    for p in procs:
        assert p.communicate(timeout=120)[0].split() == ["ready", "done"]
        assert p.returncode == 0
    assert svc.stop() == 0
    assert "dirty rows written back" in svc.logs()
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("tierstore.")
                and str(svc.proc.pid) in f], "segments must be removed on clean shutdown"
    want = _replay(tmp_path, [("a", 1), ("b", 2)], 15)
    svc2 = Service(tmp_path / "svc", ddr_bytes="1MiB").start()
    try:
        with svc2.connect(mode="read") as conn:
            for table in ("a", "b"):
                got = conn.lookup(table, torch.arange(5000))
                torch.testing.assert_close(got, want[table], rtol=0, atol=1e-6)
    finally:
        svc2.stop()


def test_killed_client_loses_pins_and_ownership(service):
    """kill -9 a client in the middle of its steps: the service keeps serving, and the table's
    ownership is free for a new writer."""
    with service.connect() as conn:
        conn.create_table(_spec("a", rows=5000))
        p = _trainer(service, "a", 3, 100_000)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        with pytest.raises(ts.InvalidInput, match="already has a writer"):
            conn.attach("a", "write")
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while True:  # the service notices the hang-up at once; allow it a moment
            try:
                conn.attach("a", "write")
                break
            except ts.InvalidInput:
                assert time.monotonic() < deadline, "ownership was not released"
                time.sleep(0.05)
        ids = torch.arange(0, 5000, 7)
        before = conn.lookup("a", ids).clone()
        conn.apply_gradients("a", ids, torch.ones(len(ids), 16))
        assert (conn.lookup("a", ids) < before).all()
        assert conn.stats()["service"]["clients"] == 1


def test_killed_service_raises_connection_lost_then_restart(tmp_path):
    svc = Service(tmp_path / "svc").start()
    conn = svc.connect()
    conn.create_table(_spec("a", rows=1000))
    ids = torch.arange(100)
    conn.apply_gradients("a", ids, torch.ones(100, 16))
    conn.flush()
    flushed = conn.lookup("a", ids).clone()
    conn.apply_gradients("a", ids, torch.ones(100, 16))  # not flushed: lost with the service
    svc.proc.kill()
    svc.proc.wait()
    t0 = time.monotonic()
    with pytest.raises(ts.ConnectionLost):
        conn.lookup("a", ids)  # resident rows: no request would be needed
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ts.ConnectionLost):
        conn.tables()
    conn.close()
    svc2 = Service(tmp_path / "svc").start()  # cleans the dead service's segments
    try:
        assert "stale shared-memory segments" in svc2.logs()
        with svc2.connect() as c2:
            torch.testing.assert_close(c2.lookup("a", ids), flushed, rtol=0, atol=0)
    finally:
        svc2.stop()


def test_permissions_of_created_files(service):
    with service.connect() as conn:
        conn.create_table(_spec("a", rows=1000))
        conn.lookup("a", torch.arange(10))
        conn.flush()
        assert stat.S_IMODE(os.stat(service.run_dir).st_mode) == 0o700
        sock = os.path.join(service.run_dir, "tierstored.sock")
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        segs = [f for f in os.listdir("/dev/shm")
                if f.startswith("tierstore.") and f".{service.proc.pid}." in f]
        assert len(segs) >= 6  # slab, state, meta, ctrl, index, pins, mailbox
        for f in segs:
            assert stat.S_IMODE(os.stat(os.path.join("/dev/shm", f)).st_mode) == 0o600, f
        for root, dirs, files in os.walk(service.data_dir):
            for d in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) & 0o077 == 0, d
            for f in files:
                assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) & 0o077 == 0, f
        assert stat.S_IMODE(os.stat(service.data_dir).st_mode) & 0o077 == 0


def test_second_writer_refused_reader_cannot_write(service):
    with service.connect() as w, service.connect(mode="read") as r:
        w.create_table(_spec("a", rows=1000))
        w.attach("a")
        with service.connect() as w2:
            with pytest.raises(ts.InvalidInput, match="already has a writer"):
                w2.attach("a")
        ids = torch.arange(50)
        with pytest.raises(ts.InvalidInput, match="read-only"):
            r.apply_gradients("a", ids, torch.ones(50, 16))
        w.apply_gradients("a", ids, torch.ones(50, 16))
        torch.testing.assert_close(r.lookup("a", ids), w.lookup("a", ids), rtol=0, atol=0)


def test_create_table_while_attached_replans(service):
    """A new table shrinks the others' DRAM share: attached clients move to the new slab
    without losing a write."""
    with service.connect() as a, service.connect() as b:
        a.create_table(_spec("a", rows=60_000))
        ids = torch.arange(0, 60_000, 3)
        a.apply_gradients("a", ids, torch.ones(len(ids), 16))
        cap_before = a.stats()["tables"]["a"]["capacity_rows"]
        b.create_table(_spec("b", rows=60_000))
        assert a.stats()["tables"]["a"]["capacity_rows"] < cap_before
        a.apply_gradients("a", ids, torch.ones(len(ids), 16))
        got = a.lookup("a", ids)
    with ts.Store(service.root + "/ref", ddr_bytes=1 << 28) as ref:
        ref.create_table(_spec("a", rows=60_000))
        for _ in range(2):
            ref.apply_gradients("a", ids, torch.ones(len(ids), 16))
        torch.testing.assert_close(got, ref.lookup("a", ids), rtol=0, atol=1e-6)


def test_other_uid_refused():
    """SO_PEERCRED: a peer of another uid is refused even when file modes would let it in."""
    import shutil
    import tempfile
    if os.getuid() != 0:
        pytest.fail("this test needs root to run a client as another uid")  # CI runs as root
    root = tempfile.mkdtemp(prefix="ts-uid-", dir="/tmp")  # pytest's tmp is 0700 all the way
    os.chmod(root, 0o711)
    service = Service(root).start()
    try:
        _other_uid_refused(service)
    finally:
        service.stop()
        shutil.rmtree(root)


def _other_uid_refused(service):
    sock = os.path.join(service.run_dir, "tierstored.sock")
    os.chmod(service.run_dir, 0o711)
    os.chmod(sock, 0o666)
    try:
        code = textwrap.dedent(f"""
            import os, sys, json
            from tierstore.client import connect  # import first: root's Python is 0700
            os.setgid(65534); os.setuid(65534)
            try:
                connect({service.run_dir!r})
            except Exception as e:
                print(type(e).__name__, e)
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert "AccessDenied" in out.stdout and "uid 65534" in out.stdout, out
    finally:
        os.chmod(service.run_dir, 0o700)
        os.chmod(sock, 0o600)
    with service.connect() as conn:  # still serving its own user
        assert conn.tables() == []


def test_cli_help_stats_and_bad_config(service, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    h = subprocess.run([os.path.join(bin_dir, "tierstored"), "--help"], capture_output=True,
                       text=True)
    assert h.returncode == 0 and "ddr_bytes" in h.stdout and "SIGTERM" in h.stdout
    bad = subprocess.run([os.path.join(bin_dir, "tierstored"), "--run-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "data" in bad.stderr
    with service.connect() as conn:
        conn.create_table(_spec("a", rows=1000))
        conn.lookup("a", torch.arange(10))
    out = subprocess.run([os.path.join(bin_dir, "tierstore"), "stats", "--run-dir",
                          service.run_dir, "--json"], capture_output=True, text=True)
    import json
    st = json.loads(out.stdout)
    assert st["tables"]["a"]["lookups"] == 10 and st["service"]["pid"] == service.proc.pid
    text = subprocess.run([os.path.join(bin_dir, "tierstore"), "stats", "--run-dir",
                           service.run_dir], capture_output=True, text=True).stdout
    assert "# table a" in text and "hit_rate:" in text


def test_sigint_also_stops_cleanly(tmp_path):
    svc = Service(tmp_path / "svc").start()
    with svc.connect() as conn:
        conn.create_table(_spec("a", rows=1000))
        conn.apply_gradients("a", torch.arange(10), torch.ones(10, 16))
        want = conn.lookup("a", torch.arange(10)).clone()
    assert svc.stop(signal.SIGINT) == 0
    with ts.Store(svc.data_dir) as store:  # the service released the store
        torch.testing.assert_close(store.lookup("a", torch.arange(10)), want, rtol=0, atol=0)


def test_modules_through_service_equal_embedded(tmp_path, rng):
    """TierEmbeddingBagCollection trained through tierstored from a TorchRec
    KeyedJaggedTensor equals the plain keys/values/lengths path on the embedded Store."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    from tierstore.client import TierEmbeddingBagCollection
    keys = ["u", "i"]
    steps = []
    for _ in range(4):
        lengths = torch.from_numpy(rng.integers(0, 6, 2 * 32))
        values = torch.from_numpy(rng.integers(0, 3000, int(lengths.sum())))
        steps.append((values, lengths))

    def train(conn, use_kjt):
        ebc = TierEmbeddingBagCollection(conn, {"u": "user", "i": "item"})
        outs = []
        for values, lengths in steps:
            if use_kjt:
                out = ebc(KeyedJaggedTensor.from_lengths_sync(keys, values, lengths))
            else:
                out = ebc(keys, values, lengths)
            loss = (out["u"] * out["i"]).sum() + out["u"].pow(2).sum()
            loss.backward()
            outs.append(torch.cat([out["u"], out["i"]], 1).detach().clone())
        return outs, conn.lookup("user", torch.arange(3000)).clone()

    svc = Service(tmp_path / "svc", ddr_bytes="256KiB").start()
    try:
        with svc.connect() as conn:
            conn.create_table(_spec("user", rows=3000))
            conn.create_table(_spec("item", rows=3000, opt=ts.SGD(lr=0.1)))
            got, got_rows = train(conn, use_kjt=True)
    finally:
        svc.stop()
    with ts.Store(tmp_path / "ref") as ref:
        ref.create_table(_spec("user", rows=3000))
        ref.create_table(_spec("item", rows=3000, opt=ts.SGD(lr=0.1)))
        want, want_rows = train(ref, use_kjt=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_rows, want_rows, rtol=0, atol=1e-5)


def test_small_mailbox_requests_go_in_chunks(tmp_path):
    """A legal batch whose misses (and the rows sent back) exceed the mailbox is split into
    several requests, with the same result as the embedded store."""
    svc = Service(tmp_path / "svc", ddr_bytes="64KiB",
                  extra=["--max-batch", "4000", "--mailbox-bytes", "32000"]).start()
    ids = torch.from_numpy(np.random.default_rng(5).permutation(20_000)[:4000])
    try:
        with svc.connect() as conn:
            conn.create_table(_spec())
            conn.apply_gradients("t", ids, torch.ones(4000, 16))
            got = conn.lookup("t", ids).clone()
            assert conn.stats()["tables"]["t"]["bypassed"] > 0
    finally:
        svc.stop()
    with ts.Store(tmp_path / "ref") as ref:
        ref.create_table(_spec())
        ref.apply_gradients("t", ids, torch.ones(4000, 16))
        torch.testing.assert_close(got, ref.lookup("t", ids), rtol=0, atol=1e-6)


def test_row_range_writers(service):
    """Model-parallel ownership: two writers of disjoint row ranges of one table; an
    overlapping writer is refused, an update outside one's range too, nothing changes."""
    with service.connect() as a, service.connect() as b, service.connect() as c:
        a.create_table(_spec("t", rows=1000))
        a.attach("t", rows=(0, 500))
        b.attach("t", rows=(500, 1000))
        with pytest.raises(ts.InvalidInput, match=r"rows \[0, 500\)"):
            c.attach("t", rows=(400, 600))
        c.attach("t", mode="read")
        before = c.lookup("t", torch.arange(1000)).clone()
        with pytest.raises(ts.InvalidInput, match=r"writes rows \[0, 500\) only"):
            a.apply_gradients("t", [10, 700], torch.ones(2, 16))
        torch.testing.assert_close(c.lookup("t", torch.arange(1000)), before, rtol=0, atol=0)
        a.apply_gradients("t", torch.arange(0, 500), torch.ones(500, 16))
        b.apply_gradients("t", torch.arange(500, 1000), -torch.ones(500, 16))
        after = c.lookup("t", torch.arange(1000))
        assert (after[:500] < before[:500]).all() and (after[500:] > before[500:]).all()
        writers = c.stats()["tables"]["t"]["writers"]
        assert sorted(w["rows"] for w in writers) == [[0, 500], [500, 1000]]
        b.detach("t")
        c.attach("t", rows=(500, 600), mode="write")  # free now that b left [500, 1000)


def test_checkpoint_and_restore_through_the_service(tmp_path):
    """checkpoint/restore requests: rows and dense state come back exactly (fp32), attached
    clients keep working after the restore (their slabs were replaced)."""
    svc = Service(tmp_path / "svc", ddr_bytes="256KiB").start()
    root = tmp_path / "ckpts"
    ids = torch.arange(0, 20_000, 3)
    try:
        with svc.connect() as conn, svc.connect(mode="read") as reader:
            conn.create_table(_spec())
            conn.apply_gradients("t", ids, torch.ones(len(ids), 16))
            reader.lookup("t", ids[:10])  # attached elsewhere too
            dense = {"w": torch.arange(6.0).reshape(2, 3), "step": 7}
            path = conn.checkpoint(root, bits=32, extra_state=dense, step=7, wait=True)
            want = conn.lookup("t", torch.arange(20_000)).clone()
            conn.apply_gradients("t", ids, torch.ones(len(ids), 16))  # after the checkpoint
            assert not torch.equal(conn.lookup("t", torch.arange(20_000)), want)
            info = conn.restore(path)
            assert info["step"] == 7
            torch.testing.assert_close(info["extra_state"]["w"], dense["w"], rtol=0, atol=0)
            torch.testing.assert_close(conn.lookup("t", torch.arange(20_000)), want,
                                       rtol=0, atol=0)
            torch.testing.assert_close(reader.lookup("t", ids[:10]), want[ids[:10]],
                                       rtol=0, atol=0)
            conn.apply_gradients("t", ids, torch.ones(len(ids), 16))  # training goes on
            with pytest.raises(ts.TierstoreError, match="cannot restore|no checkpoint|not"):
                conn.restore(tmp_path / "nope")
    finally:
        assert svc.stop() == 0


def test_hits_served_from_the_slab_reach_the_policy(tmp_path):
    """LRU through the service: rows a client keeps reading from the shared slab (no request)
    are recent for the policy, so a later miss evicts the others, not them."""
    svc = Service(tmp_path / "svc", ddr_bytes="64KiB", extra=["--policy", "lru"]).start()
    try:
        with svc.connect() as conn:
            conn.create_table(_spec(rows=20_000))
            cap = conn.stats()["tables"]["t"]["capacity_rows"]
            conn.lookup("t", torch.arange(cap))           # fill DRAM with rows 0..cap-1
            hot = torch.arange(0, cap // 2)
            for _ in range(3):
                conn.lookup("t", hot)                      # all hits: served from the slab
            conn.lookup("t", torch.arange(cap, cap + cap // 4))  # misses: evict cap/4 rows
            before = conn.stats()["tables"]["t"]["misses"]
            conn.lookup("t", hot)
            assert conn.stats()["tables"]["t"]["misses"] == before, "hot rows were evicted"
    finally:
        svc.stop()


_EVICTER = textwrap.dedent("""
    import sys, numpy as np, torch
    from tierstore.client import connect
    conn = connect(sys.argv[1], mode="read")
    g = np.random.default_rng(0)
    print("ready", flush=True)
    for _ in range(400):  # misses: the service evicts and admits all the time
        conn.lookup("t", torch.from_numpy(g.integers(2000, 20_000, 300)))
    print("done", flush=True)
""")


def test_unpinned_reads_never_see_an_eviction(tmp_path):
    """Reads of all-resident batches take no pins (a seqlock read): while another client's
    misses evict and admit rows of the same table, every result is still exact."""
    svc = Service(tmp_path / "svc", ddr_bytes="128KiB", extra=["--policy", "lru"]).start()
    try:
        with svc.connect(mode="read") as conn:
            with svc.connect() as w:
                w.create_table(_spec(rows=20_000))
            want = conn.lookup("t", torch.arange(20_000)).clone()  # values never change
            hot = torch.arange(0, 300)
            p = subprocess.Popen([sys.executable, "-c", _EVICTER, svc.run_dir],
                                 stdout=subprocess.PIPE, text=True)
            assert p.stdout.readline().strip() == "ready"
            checked = 0
            while p.poll() is None:
                got = conn.lookup("t", hot)
                assert torch.equal(got, want[hot])
                checked += 1
            assert p.wait() == 0 and checked > 10
            assert conn.stats()["tables"]["t"]["evictions"] > 1000
    finally:
        svc.stop()
