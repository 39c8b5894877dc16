"""The row API checkpoints stand on: modified-row tracking, read/write/reset of rows."""

import numpy as np
import pytest
import torch

import tierstore as ts


@pytest.mark.parametrize("id_space", ["dense", "sparse"])
def test_modified_rows_read_write_reset(store_dir, id_space):
    with ts.Store(store_dir, ddr_bytes=20_000) as st:  # ~100 cached rows: churn to SCM
        st.create_table(ts.TableSpec("t", 5000, 8, id_space=id_space,
                                     optimizer=ts.RowWiseAdagrad(lr=0.1)))
        init = st.read_rows("t", np.arange(5000))
        st.apply_gradients("t", np.array([3, 7, 7, 4000, 4999, 100]), torch.ones(6, 8))
        st.lookup("t", torch.arange(1000, 1300))  # evicts the updated rows (write-back)
        assert st.take_modified("t").tolist() == [3, 7, 100, 4000, 4999]
        assert st.take_modified("t").tolist() == []  # each modification reported once
        st.apply_gradients("t", [5], torch.ones(1, 8))
        assert st.take_modified("t").tolist() == [5]
        assert st.written_rows("t").tolist() == [3, 5, 7, 100, 4000, 4999]
        cur = st.read_rows("t", np.arange(5000))
        assert not np.array_equal(cur[0][[3, 5]], init[0][[3, 5]])
        assert st.stats()["tables"]["t"]["lookups"] == 300  # read_rows counts nothing

        st.reset_table("t")
        back = st.read_rows("t", np.arange(5000))
        assert np.array_equal(back[0], init[0]) and np.array_equal(back[1], init[1])
        assert st.written_rows("t").tolist() == []

        rows = np.array([3, 5, 7, 100, 4000, 4999])
        st.lookup("t", torch.from_numpy(rows[:2]))  # some resident, some on SCM
        st.write_rows("t", rows, cur[0][rows], cur[1][rows])
        again = st.read_rows("t", np.arange(5000))
        assert np.array_equal(again[0], cur[0]) and np.array_equal(again[1], cur[1])
        assert st.take_modified("t").tolist() == []  # restoring is not a modification


def test_modified_survives_dram_replan(store_dir):
    """A new table re-plans DRAM; rows modified in the old slab stay recorded."""
    with ts.Store(store_dir, ddr_bytes=1 << 20) as st:
        st.create_table(ts.TableSpec("a", 5000, 8))
        st.apply_gradients("a", [1, 2], torch.ones(2, 8))
        st.create_table(ts.TableSpec("b", 5000, 8))
        assert st.take_modified("a").tolist() == [1, 2]


def test_write_rows_bad_input(store_dir):
    with ts.Store(store_dir) as st:
        st.create_table(ts.TableSpec("t", 100, 4))
        w, s = st.read_rows("t", [1, 2])
        before = st.read_rows("t", np.arange(100))
        with pytest.raises(ts.InvalidInput, match="distinct"):
            st.write_rows("t", [1, 1], w, s)
        with pytest.raises(ts.InvalidInput, match="weights"):
            st.write_rows("t", [1, 2, 3], w, s)
        with pytest.raises(ts.InvalidInput):
            st.write_rows("t", [1, 200], w, s)
        after = st.read_rows("t", np.arange(100))
        assert np.array_equal(before[0], after[0])
