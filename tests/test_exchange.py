"""The DRAM tier's one-call admission (tiers/exchange.py) against its numpy steps: two stores
fed the same batches, one with the kernel and one without, must hold the same bits after
every batch (slab, metadata, index, modified rows, counters) and the same row files."""

import numpy as np
import pytest
import torch

import tierstore as ts


def _cache(st: ts.Store, name: str):
    return st._open[name].cache


def _state(st: ts.Store, name: str) -> dict:
    c = _cache(st, name)
    return {"weights": c.weights.copy(), "state": c.state.copy(), "rows": c.row_of_pos.copy(),
            "dirty": c.dirty.copy(), "modified": c.modified.copy(),
            "index": c.index.array.copy(), "tracked": c.tracker.flags.copy(),
            "counters": dict(c.counters), "resident": c.resident}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exchange_kernel_matches_the_numpy_steps(tmp_path, dtype):
    rng = np.random.default_rng(7)
    spec = ts.TableSpec("t", 3000, 12, dtype=dtype, optimizer=ts.RowWiseAdagrad(lr=0.05))
    stores = [ts.Store(str(tmp_path / name), ddr_bytes=30_000, policy="adaptive")
              for name in ("kernel", "numpy")]
    try:
        for st in stores:
            st.create_table(spec)
        _cache(stores[1], "t").exchange_kernel = False
        assert _cache(stores[0], "t")._exchange_file is not None
        p = 1.0 / np.arange(1, 3001) ** 1.05
        for step in range(40):
            ids = torch.from_numpy(rng.choice(3000, size=300, p=p / p.sum()))
            offsets = torch.arange(0, 301, 3)
            grad = torch.from_numpy(rng.standard_normal((100, 12)).astype(np.float32))
            outs = []
            for st in stores:
                outs.append(st.pooled("t", ids, offsets, include_last_offset=True))
                st.apply_pooled_gradients("t", ids, offsets, grad, include_last_offset=True)
                if step % 10 == 9:
                    st.take_modified("t")  # clears the tracker in both, as a checkpoint does
            assert torch.equal(outs[0], outs[1])
            a, b = (_state(st, "t") for st in stores)
            for key in a:
                assert np.array_equal(a[key], b[key]) if key not in ("counters", "resident") \
                    else a[key] == b[key], (step, key)
        assert _cache(stores[0], "t").counters["evictions"] > 1000  # the kernel did the work
        for st in stores:
            st.flush()
        files = [np.fromfile(str(tmp_path / name / "tables" / "t.rows"), dtype=np.uint8)
                 for name in ("kernel", "numpy")]
        assert np.array_equal(files[0], files[1])
        reads = [st.read_rows("t", np.arange(3000)) for st in stores]
        assert np.array_equal(reads[0][0], reads[1][0]) and np.array_equal(reads[0][1], reads[1][1])
    finally:
        for st in stores:
            st.close()
