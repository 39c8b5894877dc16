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


class Service:
    """A real ``tierstored`` process for a test (``python -m tierstore.daemon``)."""

    def __init__(self, root, ddr_bytes="8MiB", extra=()):
        import os
        self.root = str(root)
        self.run_dir = os.path.join(self.root, "run")
        self.data_dir = os.path.join(self.root, "data")
        self.ddr_bytes = ddr_bytes
        self.extra = list(extra)
        self.proc = None
        self.log_path = os.path.join(self.root, "tierstored.log")

    def start(self, timeout=30.0):
        import os
        import subprocess
        import sys
        import time
        from tierstore.client import connect
        cmd = [sys.executable, "-m", "tierstore.daemon", "--run-dir", self.run_dir,
               "--data-dir", self.data_dir, "--ddr-bytes", str(self.ddr_bytes), *self.extra]
        os.makedirs(self.root, exist_ok=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stderr=self.log, stdout=self.log,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tierstored exited {self.proc.returncode}: {self.logs()}")
            try:
                connect(self.run_dir).close()
                return self
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"tierstored did not start: {self.logs()}")

    def connect(self, mode="write"):
        from tierstore.client import connect
        return connect(self.run_dir, mode=mode)

    def logs(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=None, timeout=30.0):
        """SIGTERM (default) and wait; returns the exit code."""
        import signal
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig or signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc


@pytest.fixture
def service(tmp_path):
    """A started tierstored (8 MiB of DRAM); stopped with SIGTERM after the test."""
    s = Service(tmp_path).start()
    yield s
    s.stop()
    if s.proc.returncode is None:
        s.proc.kill()
