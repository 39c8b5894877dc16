"""tierstore.quant: per-row checkpoint quantization (schemes, packing, search, state, bit policy)."""

import json

import numpy as np
import pytest

from tierstore import quant as q
from tierstore.quant import EncodedRows, Scheme

QUANT_SCHEMES = [Scheme(k, b) for k in q.QUANTS for b in q.QUANT_BITS]
ALL_SCHEMES = [Scheme("fp32", 32), Scheme("fp16", 16)] + QUANT_SCHEMES
EPS32 = 2.0 ** -23


def _ids(schemes):
    return [s.name for s in schemes]


def mixed_rows(rng, n=300, dim=37):
    """Gaussian rows of varied scale and offset, plus the awkward ones: constant, zero, a wide
    range, one outlier, values that are not float16-representable."""
    x = rng.standard_normal((n, dim)) * rng.uniform(0.01, 3, (n, 1)) + rng.uniform(-1, 1, (n, 1))
    x[0] = 0.0
    x[1] = 0.3                      # constant, not a float16 value
    x[2] = -1234.5678
    x[3] = np.linspace(-300, 500, dim)
    x[4, 5] = 40.0                  # an outlier
    x[5] = rng.uniform(1.0, 1.001, dim)  # narrow range far from zero
    x[6] = rng.standard_normal(dim) * 1e-40  # float32 subnormals: a range of 1e-40 bins
    return x.astype(np.float32)


# --- schemes --------------------------------------------------------------------------------

def test_scheme_parse_and_json():
    assert Scheme.parse(32, "adaptive") == Scheme("fp32", 32)
    assert Scheme.parse(16, "uniform") == Scheme("fp16", 16)
    assert Scheme.parse(32, "none") == Scheme("fp32", 32)
    for quant in q.QUANTS:
        for bits in q.QUANT_BITS:
            s = Scheme.parse(bits, quant)
            assert (s.kind, s.bits) == (quant, bits) and s.quantized
            assert s.name == f"{quant}{bits}"
    for s in ALL_SCHEMES:
        assert Scheme.from_json(s.to_json()) == s
        assert Scheme.from_json(json.dumps(s.to_json())) == s


@pytest.mark.parametrize("bits,quant", [(5, "uniform"), (1, "adaptive"), (0, "kmeans"),
                                        (64, "uniform"), (4, "gptq"), (4, "none"), (32, "adaptiv"),
                                        (4.0, "uniform"), (True, "uniform"), ("4", "uniform")])
def test_scheme_parse_rejects(bits, quant):
    with pytest.raises(ValueError):
        Scheme.parse(bits, quant)


def test_scheme_constructor_and_json_reject():
    for kind, bits in [("uniform", 16), ("fp16", 32), ("fp32", 8), ("int4", 4), ("kmeans", 5)]:
        with pytest.raises(ValueError):
            Scheme(kind, bits)
    for bad in ['{"kind": "uniform"}', {"kind": "uniform", "bits": 4, "x": 1}, "[1]"]:
        with pytest.raises(ValueError):
            Scheme.from_json(bad)


# --- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_ids(ALL_SCHEMES))
def test_round_trip(scheme, rng):
    x = mixed_rows(rng)
    enc = q.encode(x, scheme)
    assert (enc.n, enc.dim, enc.scheme) == (x.shape[0], x.shape[1], scheme)
    dec = q.decode(enc)
    assert dec.shape == x.shape and dec.dtype == np.float32 and np.isfinite(dec).all()
    assert enc.nbytes == scheme.row_bytes(x.shape[1]) * x.shape[0]
    if scheme.kind == "fp32":
        np.testing.assert_array_equal(dec, x)
        return
    if scheme.kind == "fp16":
        np.testing.assert_array_equal(dec, x.astype(np.float16).astype(np.float32))
        return
    top = (1 << scheme.bits) - 1
    assert enc.codes.dtype == np.uint8 and enc.codes.shape == (x.shape[0], -(-x.shape[1] * scheme.bits // 8))
    if scheme.kind == "kmeans":
        assert enc.centroids.dtype == np.float16 and enc.centroids.shape == (x.shape[0], top + 1)
        assert (np.diff(enc.centroids.astype(np.float32), axis=1) >= 0).all()
        for i in range(x.shape[0]):    # every value decodes to its nearest centroid
            c = enc.centroids[i].astype(np.float32)
            nearest = np.abs(x[i][:, None] - c[None, :]).min(axis=1)
            np.testing.assert_allclose(np.abs(x[i] - dec[i]), nearest, rtol=0, atol=1e-6)
        return
    assert enc.scale.dtype == np.float16 and enc.bias.dtype == np.float16
    s = enc.scale.astype(np.float32)[:, None]
    b = enc.bias.astype(np.float32)[:, None]
    # constant rows: scale 0, all codes 0, the value rounded to the nearest float16
    for i in (0, 1, 2):
        assert enc.scale[i] == 0 and not enc.codes[i].any()
        np.testing.assert_array_equal(dec[i], x[i].astype(np.float16).astype(np.float32))
    if scheme.kind == "uniform":
        slack = 4 * EPS32 * (np.abs(x) + np.abs(b) + top * s)
        assert (np.abs(x - dec) <= s / 2 + slack)[3:].all()     # rows 0-2 are constant
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        assert (b <= lo)[3:].all() and (b + top * s >= hi * (1 - 1e-6) - 1e-6)[3:].all()
    else:  # adaptive: on the trimmed range; values outside it clamp to its ends
        assert (dec >= b - 1e-6).all() and (dec <= b + top * s + 1e-4 * (1 + np.abs(b))).all()
        width = (x.max(axis=1) - x.min(axis=1))[:, None]
        assert (top * s >= (1 - q.MAX_TRIM) * width * (1 - 2e-3)).all()   # at most 16% trimmed


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_ids(ALL_SCHEMES))
def test_empty_and_other_dtypes(scheme, rng):
    enc = q.encode(np.zeros((0, 9), np.float32), scheme)
    assert enc.n == 0 and q.decode(enc).shape == (0, 9)
    x = rng.standard_normal((20, 9))
    np.testing.assert_array_equal(q.decode(q.encode(x, scheme)),
                                  q.decode(q.encode(x.astype(np.float32), scheme)))
    one = q.decode(q.encode(x[:1, :1], scheme))     # dim 1
    assert one.shape == (1, 1) and np.isfinite(one).all()


def test_large_values_saturate_never_inf():
    x = np.array([[1e5, -2e5, 3.0, 0.0], [7e4, 7e4, 7e4, 7e4]], np.float32)
    for scheme in ALL_SCHEMES[1:]:
        dec = q.decode(q.encode(x, scheme))
        assert np.isfinite(dec).all() and (np.abs(dec) <= 1.001 * q.FP16_MAX).all()


@pytest.mark.parametrize("bits", q.QUANT_BITS)
@pytest.mark.parametrize("dim", [1, 3, 5, 8, 11, 16, 21, 64, 67])
def test_packing_layout(bits, dim, rng):
    """Value j of a row sits at bits [j*bits, (j+1)*bits) of the row's little-endian stream."""
    top = (1 << bits) - 1
    c = rng.integers(0, top + 1, (4, dim))
    c[:, 0], c[:, -1] = 0, top                   # range [0, top]: scale 1, bias 0, codes = values
    if dim == 1:
        c[:, 0] = 0                              # a constant row: code 0
    enc = q.encode(c.astype(np.float32), Scheme("uniform", bits))
    assert enc.codes.shape == (4, (dim * bits + 7) // 8)
    for i in range(4):
        stream = sum(int(v) << (j * bits) for j, v in enumerate(c[i]))
        want = stream.to_bytes(enc.codes.shape[1], "little")
        assert bytes(enc.codes[i]) == want
    if dim > 1:
        np.testing.assert_array_equal(q.decode(enc), c.astype(np.float32))
    if bits == 3 and dim == 8:
        assert enc.codes.shape[1] == 3          # 8 values in 3 bytes


# --- adaptive and k-means quality -----------------------------------------------------------

def _errs(x, scheme):
    return q.row_errors(x, q.decode(q.encode(x, scheme)))


@pytest.mark.parametrize("bits", q.QUANT_BITS)
def test_adaptive_never_worse_than_uniform(bits, rng):
    gauss = rng.standard_normal((2000, 64)).astype(np.float32)
    flat = rng.uniform(-1, 1, (500, 64)).astype(np.float32)
    spiky = gauss[:500].copy()
    spiky[np.arange(500), rng.integers(0, 64, 500)] *= 8.0
    for x in (gauss, flat, spiky, mixed_rows(rng)):
        u, a = _errs(x, Scheme("uniform", bits)), _errs(x, Scheme("adaptive", bits))
        assert (a <= u * (1 + 1e-9) + 1e-12).all(), np.max(a - u)
    if bits < 8:  # rows with tails (Gaussian, outliers): strictly lower on average
        for x in (gauss, spiky):
            u, a = _errs(x, Scheme("uniform", bits)), _errs(x, Scheme("adaptive", bits))
            assert a.mean() < 0.97 * u.mean()


def test_adaptive_search_trims_an_outlier():
    x = np.zeros((1, 64), np.float32)
    x[0, :63] = np.linspace(-1, 1, 63)
    x[0, 63] = 1.3                              # the max sits alone above the rest
    enc = q.encode(x, Scheme("adaptive", 2))
    hi = float(enc.bias[0]) + 3 * float(enc.scale[0])
    assert hi < 1.3 - 0.1 and hi >= 1.3 - 0.16 * 2.3 - 1e-2
    assert _errs(x, Scheme("adaptive", 2))[0] < _errs(x, Scheme("uniform", 2))[0]


def _grid_error(x64, a, b, bits):
    """Exact (float64) squared L2 error per row of the uniform grid on [a, b] (float64 [n])."""
    top = (1 << bits) - 1
    s = ((b - a) / top)[:, None]
    u = (x64 - a[:, None]) / s
    return (((u - np.clip(np.rint(u), 0, top)) * s) ** 2).sum(axis=1)


def _greedy_reference(x, bits, bins=q.BINS, budget=None):
    """Check-N-Run's greedy walk written plainly (float64, every row walks all the steps):
    the range with the lowest error among the ones visited, as (lo, hi, its error)."""
    budget = round(q.MAX_TRIM * bins) if budget is None else budget
    x64 = x.astype(np.float64)
    lo, hi = x64.min(axis=1), x64.max(axis=1)
    step = (hi - lo) / bins
    best = _grid_error(x64, lo, hi, bits)
    cut_lo = np.zeros(len(x))
    cut_hi = np.zeros(len(x))
    best_lo, best_hi = lo.copy(), hi.copy()
    for _ in range(budget):
        e_lo = _grid_error(x64, lo + (cut_lo + 1) * step, hi - cut_hi * step, bits)
        e_hi = _grid_error(x64, lo + cut_lo * step, hi - (cut_hi + 1) * step, bits)
        up = e_lo <= e_hi
        cut_lo += up
        cut_hi += ~up
        e = np.where(up, e_lo, e_hi)
        better = e < best
        best = np.where(better, e, best)
        best_lo = np.where(better, lo + cut_lo * step, best_lo)
        best_hi = np.where(better, hi - cut_hi * step, best_hi)
    return best_lo, best_hi, best


@pytest.mark.parametrize("bits", q.QUANT_BITS)
def test_adaptive_search_matches_the_greedy_walk(bits, rng):
    """The vectorized search (16 rows side by side, early stop) picks the range the plain walk
    picks: the same one but for float32 near-ties, and then one as good."""
    gauss = rng.standard_normal((333, 64)).astype(np.float32)     # 333: a short last block
    heavy = rng.standard_t(3, (200, 64)).astype(np.float32)
    spiky = rng.standard_normal((100, 48)).astype(np.float32)
    spiky[np.arange(100), rng.integers(0, 48, 100)] *= 6.0
    for x in (gauss, heavy, spiky):
        lo, hi = x.min(axis=1), x.max(axis=1)
        alo, ahi = np.empty_like(lo), np.empty_like(hi)
        q._adaptive_search(x, lo, hi, bits, q.BINS, round(q.MAX_TRIM * q.BINS), alo, ahi)
        rlo, rhi, rerr = _greedy_reference(x, bits)
        err = _grid_error(x.astype(np.float64), alo.astype(np.float64), ahi.astype(np.float64),
                          bits)
        width = (hi - lo).astype(np.float64)
        same = (np.abs(alo - rlo) < 1e-4 * width) & (np.abs(ahi - rhi) < 1e-4 * width)
        assert same.mean() >= 0.98, same.mean()
        assert err.mean() <= rerr.mean() * (1 + 1e-4)


def test_adaptive_search_odd_rows():
    """Flat rows, rows below float16's resolution and rows whose width overflows float32 are
    not searched (their range is kept); they sit among searched rows in a block."""
    x = np.random.default_rng(5).standard_normal((20, 8)).astype(np.float32)
    x[1] = 2.5
    x[2] = np.linspace(0, 1e-35, 8)
    x[3, :4], x[3, 4:] = -3e38, 3e38
    x[3, 0] = 1.0
    lo, hi = x.min(axis=1), x.max(axis=1)
    for bits in q.QUANT_BITS:
        alo, ahi = np.empty_like(lo), np.empty_like(hi)
        q._adaptive_search(x, lo, hi, bits, q.BINS, round(q.MAX_TRIM * q.BINS), alo, ahi)
        np.testing.assert_array_equal(alo[1:4], lo[1:4])
        np.testing.assert_array_equal(ahi[1:4], hi[1:4])
        assert ((alo >= lo) & (ahi <= hi) & (alo < ahi))[[0] + list(range(4, 20))].all()
        dec = q.decode(q.encode(x, Scheme("adaptive", bits)))
        assert np.isfinite(dec).all()


def _fp16_params_reference(lo, hi, bits):
    """float16 (scale, bias) of ranges [lo, hi] with numpy's float16: bias rounded down and
    scale up; a flat range gets scale 0 and its value rounded to nearest."""
    lo = np.clip(lo, -q.FP16_MAX, q.FP16_MAX).astype(np.float64)
    hi = np.clip(hi, -q.FP16_MAX, q.FP16_MAX).astype(np.float64)
    flat = ~(hi > lo)
    bias = lo.astype(np.float16)
    down = (bias.astype(np.float64) > lo) & ~flat
    bias[down] = np.nextafter(bias[down], np.float16(-np.inf))
    s = np.where(flat, 0.0, (hi - bias.astype(np.float64)) / ((1 << bits) - 1))
    scale = s.astype(np.float16)
    up = scale.astype(np.float64) < s
    scale[up] = np.nextafter(scale[up], np.float16(np.inf))
    return scale, bias


@pytest.mark.parametrize("bits", q.QUANT_BITS)
def test_float16_grid_parameters(bits, rng):
    """The kernels' own float16 rounding (down for the bias, up for the scale, nearest for flat
    rows) gives numpy's float16 values, subnormals, ties and the clip at 65504 included."""
    f16 = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    pts = np.concatenate([
        rng.standard_normal(3000) * 10.0 ** rng.integers(-9, 5, 3000),
        rng.choice(f16, 500) * rng.choice([-1, 1], 500),                 # exact float16 values
        (f16[1:] + f16[:-1])[rng.integers(0, len(f16) - 1, 500)] / 2,     # float16 ties
        [0.0, -0.0, 6e-8, -6e-8, 3e-8, 6.1e-5, 65504.0, -65504.0, 7e4, -1e6, 65519.0]]).astype(
        np.float32)
    lo = rng.choice(pts, 4000)
    hi = np.maximum(lo, rng.choice(pts, 4000))
    hi[:500] = lo[:500]                                                   # flat rows
    hi[500:1000] = lo[500:1000] + np.abs(lo[500:1000]) * 1e-3
    x = np.stack([lo, hi], axis=1)
    enc = q.encode(x, Scheme("uniform", bits))
    scale, bias = _fp16_params_reference(lo, hi, bits)
    np.testing.assert_array_equal(enc.scale.view(np.uint16), scale.view(np.uint16))
    np.testing.assert_array_equal(enc.bias.astype(np.float64), bias.astype(np.float64))


@pytest.mark.parametrize("bits", q.QUANT_BITS)
def test_kmeans_not_worse_than_adaptive_on_average(bits, rng):
    x = rng.standard_normal((400, 64)).astype(np.float32)
    a, k = _errs(x, Scheme("adaptive", bits)), _errs(x, Scheme("kmeans", bits))
    assert k.mean() <= a.mean()


def test_error_ordering_by_bits(rng):
    x = rng.standard_normal((500, 64)).astype(np.float32)
    for kind in q.QUANTS:
        errs = [q.reconstruction_error(x, Scheme(kind, b)) for b in q.QUANT_BITS]
        assert errs == sorted(errs, reverse=True)
    assert q.reconstruction_error(x, Scheme("fp32", 32)) == 0.0
    assert 0 < q.reconstruction_error(x, Scheme("fp16", 16)) < 1e-3
    assert q.reconstruction_error(x, Scheme("uniform", 8)) < 0.01


def test_reconstruction_error_definition(rng):
    x = rng.standard_normal((50, 16)).astype(np.float32)
    x[3] = 0.0
    s = Scheme("uniform", 3)
    dec = q.decode(q.encode(x, s))
    want = np.linalg.norm((x - dec).astype(np.float64), axis=1) / np.maximum(
        np.linalg.norm(x.astype(np.float64), axis=1), 1e-300)
    want[3] = np.linalg.norm(dec[3])
    assert q.reconstruction_error(x, s) == pytest.approx(want.mean(), rel=1e-9)
    assert q.reconstruction_error(np.zeros((0, 4), np.float32), s) == 0.0


# --- serialization --------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_ids(ALL_SCHEMES))
def test_bytes_round_trip(scheme, rng):
    for x in (mixed_rows(rng, n=40, dim=13), np.zeros((0, 5), np.float32)):
        enc = q.encode(x, scheme)
        buf = enc.to_bytes()
        assert len(buf) == 24 + enc.nbytes
        back = EncodedRows.from_bytes(buf)
        assert (back.scheme, back.n, back.dim) == (scheme, enc.n, enc.dim)
        np.testing.assert_array_equal(q.decode(back), q.decode(enc))
        np.testing.assert_array_equal(q.decode(EncodedRows.from_bytes(bytearray(buf))),
                                      q.decode(enc))


def test_from_bytes_rejects_bad_buffers(rng):
    buf = q.encode(rng.standard_normal((10, 8)).astype(np.float32), Scheme("adaptive", 3)).to_bytes()
    bad = [buf[:-1], buf + b"\0", buf[:10], b"", b"XXXX" + buf[4:],
           buf[:4] + bytes([9]) + buf[5:],            # version
           buf[:5] + bytes([77]) + buf[6:],           # kind
           buf[:6] + bytes([5]) + buf[7:]]            # bits
    for b in bad:
        with pytest.raises(ValueError):
            EncodedRows.from_bytes(b)
    enc = q.encode(rng.standard_normal((10, 8)).astype(np.float32), Scheme("uniform", 4))
    enc.scale = enc.scale[:5]
    with pytest.raises(ValueError):
        enc.to_bytes()


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=_ids(ALL_SCHEMES))
def test_bad_input(scheme):
    x = np.ones((4, 8), np.float32)
    for v in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 3] = v
        with pytest.raises(ValueError, match="NaN or inf"):
            q.encode(y, scheme)
    for bad in (np.ones(8, np.float32), np.ones((2, 2, 2), np.float32), np.ones((4, 8), np.int32),
                np.ones((4, 0), np.float32), [[1.0, float("nan")]]):
        with pytest.raises(ValueError):
            q.encode(bad, scheme)
    with pytest.raises(ValueError):
        q.encode(x, "uniform4")
    with pytest.raises(ValueError):    # float64 beyond float32's range is not finite either
        q.encode(np.full((1, 2), 1e300), scheme)


# --- optimizer state ------------------------------------------------------------------------

def test_state_encoding(rng):
    st = (rng.standard_normal((100, 3)) ** 2 * 10).astype(np.float32)
    st[0, 0] = 1e6                              # Adagrad sums grow large
    st[1, 1] = 1e-9                             # ... and start tiny
    st[2, 2] = 0.0
    e32 = q.encode_state(st, "fp32")
    assert e32.scheme == Scheme("fp32", 32)
    np.testing.assert_array_equal(q.decode_state(e32), st)
    e16 = q.encode_state(st, "fp16")
    assert e16.scheme == Scheme("fp16", 16) and e16.values.dtype == np.float16
    d16 = q.decode_state(e16)
    assert d16.dtype == np.float32 and np.isfinite(d16).all() and (d16 >= 0).all()
    assert d16[0, 0] == q.FP16_MAX
    mask = st < q.FP16_MAX
    np.testing.assert_allclose(d16[mask], st[mask], rtol=2 ** -11, atol=2 ** -24)
    back = q.decode_state(EncodedRows.from_bytes(e16.to_bytes()))
    np.testing.assert_array_equal(back, d16)
    assert q.encode_state(np.float32([1e9, -1e9]), "float16").values.tolist() == [[65504], [-65504]]
    flat = q.decode_state(q.encode_state(st[:, 0], "fp32"))   # row-wise Adagrad: one per row
    assert flat.shape == (100, 1)


def test_state_never_below_fp16(rng):
    st = np.ones((4, 2), np.float32)
    for dtype in ("int8", "fp8", "uniform", "adaptive", 8, 4, None):
        with pytest.raises(ValueError, match="never below"):
            q.encode_state(st, dtype)
    with pytest.raises(ValueError):
        q.encode_state(np.float32([[1.0, np.nan]]), "fp16")
    with pytest.raises(ValueError):
        q.decode_state(q.encode(st, Scheme("uniform", 8)))


# --- bit-width policy -----------------------------------------------------------------------

def test_choose_bits():
    got = [q.choose_bits(r) for r in range(200)]
    assert got == sorted(got) and set(got) <= set(q.QUANT_BITS)
    assert q.choose_bits(0) == q.choose_bits(1) == 2
    assert q.choose_bits(2) == q.choose_bits(3) == 3
    assert q.choose_bits(4) == q.choose_bits(20) == 4
    assert q.choose_bits(21) == q.choose_bits(10 ** 9) == 8
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError):
            q.choose_bits(bad)


def test_raise_bits():
    for bits in q.QUANT_BITS:
        prev = bits
        for r in range(50):
            nb = q.raise_bits(bits, r)
            assert nb in q.QUANT_BITS and nb >= prev and nb <= 8
            assert nb > bits or bits == 8
            assert nb >= q.choose_bits(r)
            prev = nb
    assert q.raise_bits(2, 1) == 3 and q.raise_bits(3, 2) == 4 and q.raise_bits(4, 3) == 8
    assert q.raise_bits(8, 100) == 8
    b, seen = q.choose_bits(1), []
    for r in range(1, 6):                       # one restore after another walks up the ladder
        b = q.raise_bits(b, r)
        seen.append(b)
    assert seen == [3, 4, 8, 8, 8]
    assert q.raise_bits(16, 5) == 16 and q.raise_bits(32, 5) == 32
    for bad in ((5, 1), (4, -1), (4, 1.0)):
        with pytest.raises(ValueError):
            q.raise_bits(*bad)
