"""The fused initial-row kernel equals the numpy reference bit for bit."""

import numpy as np
import pytest

from tierstore import rowinit


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("dim", [1, 7, 64])
def test_uniform_kernel_equals_numpy_reference(dtype, dim):
    rows = np.random.default_rng(dim).integers(0, 2**40, 3000)
    ref = ((2.0 * rowinit._uniform01(123, rows, dim, 0) - 1.0) * (1.0 / np.sqrt(dim))).astype(dtype)
    got = rowinit.initial_rows("uniform", 123, rows, dim, dtype)
    assert got.dtype == dtype and got.shape == (3000, dim)
    assert np.array_equal(ref.view(np.uint8), got.view(np.uint8))
    assert np.abs(got).max() <= 1.0 / np.sqrt(dim) and len(np.unique(got)) > 1000 * min(dim, 3)


def test_rows_do_not_depend_on_batch_or_order():
    rows = np.array([5, 9, 2**33, 0])
    whole = rowinit.initial_rows("uniform", 7, rows, 16, np.float32)
    for k in range(4):
        one = rowinit.initial_rows("uniform", 7, rows[k:k + 1], 16, np.float32)
        assert np.array_equal(one[0], whole[k])
    assert not np.array_equal(whole, rowinit.initial_rows("uniform", 8, rows, 16, np.float32))
