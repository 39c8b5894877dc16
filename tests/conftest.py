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
