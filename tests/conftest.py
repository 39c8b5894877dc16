from tierstore.daemon.launch import ServiceProcess
import numpy as np
import pytest
import torch



@pytest.fixture
def store_dir(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test draws the same torch random numbers on every run."""
    torch.manual_seed(0)


def full_table(store, name):
    """Every row of a dense table, read through the store (weights only)."""
    spec = store.open_table(name).spec
    return store.lookup(name, torch.arange(spec.num_rows)).clone()


def dump(store, name):
    """(weights, state) of every row as numpy, read straight from the tiers (DRAM wins)."""
    e = store._entry(name)
    rows = np.arange(e.spec.num_rows)
    w, s = e.backing.read(rows)
    pos = e.cache.positions(rows)
    res = pos > 0
    w[res] = e.cache.weights[pos[res]]
    s[res] = e.cache.state[pos[res]]
    return w, s


@pytest.fixture
def deterministic_single_thread():
    """One thread and deterministic algorithms for the test, restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


class Service(ServiceProcess):
    """A real ``tierstored`` process for a test (``python -m tierstore.daemon``), logging at
    info level under ``root``."""

    def __init__(self, root, ddr_bytes="8MiB", extra=()):
        super().__init__(str(root), ddr_bytes, extra=extra, log_level="info")

    def stop(self, sig=None, timeout=30.0):
        """SIGTERM (default) and wait; returns the exit code."""
        import signal
        return super().stop(sig or signal.SIGTERM, timeout)


def _serving(root, **kw):
    """A started tierstored for the fixture's test; stopped with SIGTERM (killed if that
    fails) after it."""
    s = Service(root, **kw).start()
    yield s
    s.stop()
    if s.proc.returncode is None:
        s.proc.kill()


@pytest.fixture
def service(tmp_path):
    """A started tierstored (8 MiB of DRAM); stopped with SIGTERM after the test."""
    yield from _serving(tmp_path)


@pytest.fixture
def small_service(tmp_path):
    """A tierstored whose DRAM (64 KiB) holds a few percent of a test table: most rows live
    on SCM."""
    yield from _serving(tmp_path / "svc", ddr_bytes="64KiB")


def kill_with_request_in_flight(root, send):
    """Start a tierstored (64 KiB of DRAM) under ``root`` with tables "t" and "u" (20,000 x
    16); ``send(conn)`` leaves a request unanswered; SIGKILL the service. The connection's
    next operation must raise ConnectionLost within a second instead of waiting for the
    reply. Then the store's next service removes the dead one's shared memory (else it
    outlives the test: 64 MiB of mailbox and the slabs in /dev/shm)."""
    import glob
    import os
    import signal
    import time

    import tierstore as ts
    from tierstore.tiers import shm
    svc = Service(root, ddr_bytes="64KiB").start()
    try:
        conn = svc.connect()
        for name in ("t", "u"):
            conn.create_table(ts.TableSpec(name, num_rows=20_000, dim=16,
                                           optimizer=ts.RowWiseAdagrad(lr=0.05)))
        conn.pooled("u", torch.arange(10), torch.tensor([0]))
        send(conn)
        os.kill(svc.proc.pid, signal.SIGKILL)
        svc.proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(ts.ConnectionLost):
            conn.pooled("u", torch.arange(10), torch.tensor([0]))
        assert time.monotonic() - t0 < 1.0
        conn.close()
    finally:
        if svc.proc.returncode is None:
            svc.proc.kill()
            svc.proc.wait(10)
    dead = svc.proc.pid
    Service(root, ddr_bytes="64KiB").start().stop()
    assert not glob.glob(os.path.join(shm.SHM_DIR, f"tierstore.*.{dead}.*"))
