"""Per-row quantization of embedding rows for checkpoints (Check-N-Run, Eisenman et al., NSDI 2022).

Schemes (:class:`Scheme`, ``Scheme.parse(bits, quant)``):

- ``fp32``: the rows as they are. ``fp16``: rounded to float16, clamped to +-65504 (never inf).
- ``uniform`` n-bit, n in 2, 3, 4, 8: asymmetric, per row. For the row's range [lo, hi]:
  ``bias = lo`` and ``scale = (hi - lo) / (2**n - 1)``, both stored as float16, then
  ``code = round((x - bias) / scale)`` clamped to [0, 2**n - 1], and ``x' = bias + scale * code``.
  The codes are computed with the float16-rounded scale and bias, so decode is consistent; the
  bias is rounded down and the scale up to float16, so the grid still covers [lo, hi] and every
  element is within ``scale / 2`` (plus float32 arithmetic) of its value. A constant row gets
  scale 0 and all codes 0 (and its value rounded to the nearest float16). Values beyond the
  float16 range (+-65504, far beyond any embedding) saturate.
- ``adaptive`` n-bit: the same uniform grid on a trimmed range. Check-N-Run's greedy search: the
  row's [min, max] is cut into 200 bins; starting from [min, max], each step moves either the
  lower end up or the upper end down by one bin, whichever gives the lower L2 reconstruction
  error of the row, for at most 32 steps (16% of the range trimmed in total); the range with the
  lowest error seen (the untrimmed one included) is kept. Values outside it clamp to it. The
  search runs in float32 with exact scales; the result is then encoded with its float16 scale
  and bias and, per row, kept only when its actual error is below the plain uniform encoding's,
  so an adaptive row is never worse than the uniform one.
- ``kmeans`` n-bit: 2**n float16 centroids per row (1-D Lloyd iterations started from the
  row's adaptive grid, so before the float16 rounding of the centroids it is never worse than
  adaptive); codes index the row's centroids. The quality upper bound: it runs the adaptive
  search first, then Lloyd, and encodes ~4x (2-4 bits) to ~10x (8 bits) slower than adaptive
  (40-50 MB/s of float32 rows of dim 64 at 2-4 bits, ~20 MB/s at 8 bits, one core).

float16 scale and bias limit rows whose values or range are tiny: below ~6e-5 float16 is
subnormal (steps of 6e-8), so a row of range ~1e-5 at 8 bits gets a coarser grid than it asked
for (still within scale / 2 of every value), and values below 3e-8 decode as 0.

Codes are bit-packed per row, little-endian: value j of a row occupies bits [j*n, (j+1)*n) of
the row's bit stream, byte k holding bits [8k, 8k+8). So 8-bit is one value per byte, 4-bit two,
2-bit four, and 3-bit packs 8 values in 3 bytes (values straddle bytes). Each row takes
``ceil(dim * n / 8)`` bytes, so rows stay independently addressable.

Optimizer state (:func:`encode_state`) is kept at fp32 or fp16, never lower: fp16 clamps to
the float16 range (Adagrad's non-negative sums can exceed 65504 on long runs: keep fp32 there
when an exact optimizer trajectory matters).

Bit-width policy (:func:`choose_bits`, :func:`raise_bits`): every restore adds the
quantization error of one checkpoint to the model, so the fewer restores a job expects the fewer
bits it can afford; see :func:`choose_bits` for the thresholds.

All work is vectorized over whole batches: numba kernels loop over rows (no Python loop per row)
and release the GIL, so a background writer thread does not stall training.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numba
import numpy as np

FP16_MAX = 65504.0
KINDS = ("fp32", "fp16", "uniform", "adaptive", "kmeans")
QUANTS = ("uniform", "adaptive", "kmeans")
QUANT_BITS = (2, 3, 4, 8)
BINS = 200            # the adaptive search cuts the row's range into this many bins
MAX_TRIM = 0.16       # ... and trims at most this fraction of it (32 bins)
KMEANS_ITERS = 30     # Lloyd iterations at most (it stops earlier when nothing moves)

_KIND_ID = {k: i for i, k in enumerate(KINDS)}
_MAGIC = b"TSQR"
_VERSION = 1
_HEADER = struct.Struct("<4sBBBxQQ")  # magic, version, kind, bits, pad, n, dim: 24 bytes
_F16 = np.dtype("<f2")
_F32 = np.dtype("<f4")


# --------------------------------------------------------------------------------------------
# Schemes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    """How rows are stored: ``kind`` in fp32 | fp16 | uniform | adaptive | kmeans and ``bits``
    (32 for fp32, 16 for fp16, 2/3/4/8 for the quantized kinds)."""

    kind: str
    bits: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown quantization kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        want = {"fp32": (32,), "fp16": (16,)}.get(self.kind, QUANT_BITS)
        if self.bits not in want:
            raise ValueError(f"{self.kind} takes bits in {want}, got {self.bits}")

    @classmethod
    def parse(cls, bits: int, quant: str = "adaptive") -> Scheme:
        """``bits`` 32 -> fp32, 16 -> fp16 (``quant`` ignored, but must be a known name or
        "none"), else ``quant`` in uniform | adaptive | kmeans with bits in 2, 3, 4, 8."""
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
            raise ValueError(f"bits must be an int, got {bits!r}")
        if quant not in QUANTS + ("none",):
            raise ValueError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
        if bits == 32:
            return cls("fp32", 32)
        if bits == 16:
            return cls("fp16", 16)
        if bits not in QUANT_BITS:
            raise ValueError(f"bits must be 32, 16, 8, 4, 3 or 2, got {bits}")
        if quant == "none":
            raise ValueError(f"quant 'none' needs bits 32 or 16, got {bits}")
        return cls(quant, int(bits))

    @property
    def quantized(self) -> bool:
        return self.kind in QUANTS

    @property
    def name(self) -> str:
        """fp32, fp16, uniform4, adaptive3, kmeans2, ..."""
        return self.kind if not self.quantized else f"{self.kind}{self.bits}"

    def row_bytes(self, dim: int) -> int:
        """Stored bytes of one row of ``dim`` values (codes plus per-row parameters)."""
        if self.kind == "fp32":
            return 4 * dim
        if self.kind == "fp16":
            return 2 * dim
        packed = (dim * self.bits + 7) // 8
        if self.kind == "kmeans":
            return packed + 2 * (1 << self.bits)
        return packed + 4  # fp16 scale and bias

    def to_json(self) -> dict:
        return {"kind": self.kind, "bits": int(self.bits)}

    @classmethod
    def from_json(cls, obj: dict | str) -> Scheme:
        if isinstance(obj, (str, bytes)):
            obj = json.loads(obj)
        if not isinstance(obj, dict) or set(obj) != {"kind", "bits"}:
            raise ValueError(f"a scheme is {{'kind': ..., 'bits': ...}}, got {obj!r}")
        return cls(obj["kind"], obj["bits"])


# --------------------------------------------------------------------------------------------
# Encoded rows
# --------------------------------------------------------------------------------------------

@dataclass
class EncodedRows:
    """``n`` rows of ``dim`` values under ``scheme``. Arrays, by kind:

    - fp32/fp16: ``values`` [n, dim] float32/float16;
    - uniform/adaptive: ``codes`` uint8 [n, ceil(dim*bits/8)], ``scale`` and ``bias`` float16 [n];
    - kmeans: ``codes`` as above and ``centroids`` float16 [n, 2**bits] (ascending per row).
    """

    scheme: Scheme
    n: int
    dim: int
    codes: np.ndarray | None = None
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    centroids: np.ndarray | None = None
    values: np.ndarray | None = None

    def _arrays(self) -> list[tuple[str, np.dtype, tuple]]:
        """(field, dtype, shape) of the stored arrays, in their order in :meth:`to_bytes`."""
        s, n, d = self.scheme, self.n, self.dim
        if s.kind == "fp32":
            return [("values", _F32, (n, d))]
        if s.kind == "fp16":
            return [("values", _F16, (n, d))]
        codes = ("codes", np.dtype(np.uint8), (n, (d * s.bits + 7) // 8))
        if s.kind == "kmeans":
            return [("centroids", _F16, (n, 1 << s.bits)), codes]
        return [("scale", _F16, (n,)), ("bias", _F16, (n,)), codes]

    @property
    def nbytes(self) -> int:
        """Payload bytes (without the 24-byte header of :meth:`to_bytes`)."""
        return sum(int(np.prod(shape)) * dt.itemsize for _, dt, shape in self._arrays())

    def to_bytes(self) -> bytes:
        """A 24-byte header (magic, version, kind, bits, n, dim) then the arrays, little-endian."""
        parts = [_HEADER.pack(_MAGIC, _VERSION, _KIND_ID[self.scheme.kind], self.scheme.bits,
                              self.n, self.dim)]
        for field, dt, shape in self._arrays():
            a = getattr(self, field)
            if a is None or a.shape != shape:
                raise ValueError(f"EncodedRows.{field} should have shape {shape}, "
                                 f"got {None if a is None else a.shape}")
            parts.append(np.ascontiguousarray(a, dtype=dt).tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, buf) -> EncodedRows:
        """Inverse of :meth:`to_bytes`. The arrays are read-only views of ``buf`` (no copy)."""
        mv = memoryview(buf).cast("B")
        if len(mv) < _HEADER.size:
            raise ValueError(f"encoded rows truncated: {len(mv)} bytes, header needs {_HEADER.size}")
        magic, version, kind, bits, n, dim = _HEADER.unpack_from(mv, 0)
        if magic != _MAGIC:
            raise ValueError(f"not encoded rows (magic {bytes(magic)!r})")
        if version != _VERSION:
            raise ValueError(f"encoded rows of version {version}; this reader knows {_VERSION}")
        if kind >= len(KINDS):
            raise ValueError(f"encoded rows of unknown kind id {kind}")
        out = cls(Scheme(KINDS[kind], bits), int(n), int(dim))
        off = _HEADER.size
        specs = out._arrays()
        need = off + sum(int(np.prod(shape)) * dt.itemsize for _, dt, shape in specs)
        if len(mv) != need:
            raise ValueError(f"encoded rows of {n} x {dim} {out.scheme.name} take {need} bytes, "
                             f"got {len(mv)}")
        for field, dt, shape in specs:
            count = int(np.prod(shape))
            a = np.frombuffer(mv, dtype=dt, count=count, offset=off).reshape(shape)
            off += count * dt.itemsize
            setattr(out, field, a)
        return out


# --------------------------------------------------------------------------------------------
# numba kernels (one loop over rows each; nogil so a writer thread runs beside training)
# --------------------------------------------------------------------------------------------

@numba.njit(nogil=True, cache=True)
def _minmax(x, lo, hi):
    """Row min/max into lo/hi; returns the number of rows holding a NaN or an inf."""
    n, d = x.shape
    bad = 0
    for i in range(n):
        a = x[i, 0]
        b = x[i, 0]
        z = np.float32(0.0)
        for j in range(d):
            v = x[i, j]
            z += v * np.float32(0.0)   # NaN iff some v is NaN or inf
            a = min(a, v)
            b = max(b, v)
        lo[i] = a
        hi[i] = b
        if np.isnan(z):
            bad += 1
    return bad


@numba.njit(inline="always")
def _pack_row(cs, bits, out, i):
    """Little-endian bit stream of the codes cs (each < 2**bits <= 256) into out[i]."""
    acc = 0
    nb = 0
    p = 0
    for j in range(cs.shape[0]):
        acc |= np.int64(cs[j]) << nb
        nb += bits
        if nb >= 8:
            out[i, p] = acc & 0xFF
            acc >>= 8
            nb -= 8
            p += 1
    if nb > 0:
        out[i, p] = acc & 0xFF


@numba.njit(inline="always")
def _unpack_row(codes, i, bits, cs):
    mask = (1 << bits) - 1
    acc = 0
    nb = 0
    p = 0
    for j in range(cs.shape[0]):
        if nb < bits:
            acc |= np.int64(codes[i, p]) << nb
            p += 1
            nb += 8
        cs[j] = acc & mask
        acc >>= bits
        nb -= bits


@numba.njit(nogil=True, cache=True)
def _quantize(x, scale, bias, bits, codes, err, pack):
    """codes[i] = packed clamp(round((x[i] - bias[i]) / scale[i])) with the (float16-exact)
    scale and bias given as float32 (only if ``pack``); err[i] = ||x[i] - decoded||^2 computed
    exactly as :func:`_dequantize` decodes."""
    n, d = x.shape
    top = np.float32((1 << bits) - 1)
    cs = np.empty(d, np.uint8)
    for i in range(n):
        s = scale[i]
        b = bias[i]
        inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
        e = 0.0
        for j in range(d):
            v = x[i, j]
            c = np.rint((v - b) * inv)
            c = min(max(c, np.float32(0.0)), top)
            r = b + s * c
            t = np.float64(v - r)
            e += t * t
            cs[j] = np.uint8(c)
        err[i] = e
        if pack:
            _pack_row(cs, bits, codes, i)


@numba.njit(nogil=True, cache=True)
def _dequantize(codes, scale, bias, bits, out):
    n, d = out.shape
    cs = np.empty(d, np.uint8)
    for i in range(n):
        _unpack_row(codes, i, bits, cs)
        s = scale[i]
        b = bias[i]
        for j in range(d):
            out[i, j] = b + s * np.float32(cs[j])


@numba.njit(nogil=True, cache=True, fastmath=True, error_model="numpy")
def _adaptive_search(x, lo, hi, bits, bins, budget, out_lo, out_hi):
    """Check-N-Run's greedy range search per row (see the module docstring), in float32 with
    exact (not float16) grid parameters. The squared error of a range [a, b] is
    s^2 * sum_j (u_j - clamp(round(u_j), 0, top))^2 with u_j = (x_j - a) / s, s = (b - a) / top
    (clamping x to [a, b] before rounding is the same as clamping the rounded u). Both moves of
    a step leave a range of bins - k bins, so they share s and their grids differ by one bin:
    one pass over the row scores both."""
    n, d = x.shape
    top = np.float32((1 << bits) - 1)
    zero = np.float32(0.0)
    for i in range(n):
        a0 = lo[i]
        b0 = hi[i]
        out_lo[i] = a0
        out_hi[i] = b0
        if not b0 - a0 > np.float32(1e-30):  # flat (or below float16's resolution anyway)
            continue
        step = (b0 - a0) / np.float32(bins)
        s = (b0 - a0) / top
        inv = np.float32(1.0) / s
        best = zero
        for j in range(d):
            u = (x[i, j] - a0) * inv
            t = u - np.rint(u)
            best += t * t
        best *= s * s
        cut_lo = 0
        cut_hi = 0
        for k in range(1, budget + 1):
            s = step * np.float32(bins - k) / top
            inv = np.float32(1.0) / s
            off = -(a0 + np.float32(cut_lo) * step) * inv   # grid of [a, b - step]
            sh = step * inv                                   # grid of [a + step, b]: one bin up
            e_lo = zero
            e_hi = zero
            for j in range(d):
                u_hi = x[i, j] * inv + off
                u_lo = u_hi - sh
                t_lo = u_lo - np.rint(min(max(u_lo, zero), top))
                t_hi = u_hi - np.rint(min(max(u_hi, zero), top))
                e_lo += t_lo * t_lo
                e_hi += t_hi * t_hi
            if e_lo <= e_hi:    # move the lower end up
                cut_lo += 1
                e = e_lo * s * s
            else:               # move the upper end down
                cut_hi += 1
                e = e_hi * s * s
            if e < best:
                best = e
                out_lo[i] = a0 + np.float32(cut_lo) * step
                out_hi[i] = b0 - np.float32(cut_hi) * step


@numba.njit(nogil=True, cache=True)
def _kmeans(x, scale, bias, bits, iters, cent):
    """1-D Lloyd per row with 2**bits centroids, started from the row's uniform grid
    bias + scale * k (the adaptive encoding), on the sorted row. cent[i] ascending on return."""
    n, d = x.shape
    k = 1 << bits
    sums = np.empty(k, np.float64)
    cnts = np.empty(k, np.int64)
    c = np.empty(k, np.float64)
    for i in range(n):
        for m in range(k):
            c[m] = np.float64(bias[i] + scale[i] * np.float32(m))
        if scale[i] > 0:
            v = np.sort(x[i])
            for _ in range(iters):
                sums[:] = 0.0
                cnts[:] = 0
                m = 0
                for t in range(d):  # sorted values, sorted centroids: nearest by a merge
                    vt = np.float64(v[t])
                    while m + 1 < k and vt > 0.5 * (c[m] + c[m + 1]):
                        m += 1
                    sums[m] += vt
                    cnts[m] += 1
                moved = False
                for m in range(k):
                    if cnts[m] > 0:
                        nc = sums[m] / cnts[m]
                        if nc != c[m]:
                            c[m] = nc
                            moved = True
                for m in range(1, k):  # empty clusters keep their place: restore the order
                    t2 = c[m]
                    p = m - 1
                    while p >= 0 and c[p] > t2:
                        c[p + 1] = c[p]
                        p -= 1
                    c[p + 1] = t2
                if not moved:
                    break
        for m in range(k):
            cent[i, m] = c[m]


@numba.njit(nogil=True, cache=True)
def _assign(x, cent, bits, codes, err):
    """codes[i] = packed index of the nearest of the ascending centroids cent[i] (float32 of
    float16), err[i] = squared L2 error of the row."""
    n, d = x.shape
    k = 1 << bits
    cs = np.empty(d, np.uint8)
    for i in range(n):
        e = 0.0
        for j in range(d):
            v = x[i, j]
            lo = 0
            hi = k - 1
            while lo < hi:           # first centroid >= v (or the last one)
                mid = (lo + hi) >> 1
                if cent[i, mid] < v:
                    lo = mid + 1
                else:
                    hi = mid
            m = lo
            if m > 0 and (v - cent[i, m - 1]) <= (cent[i, m] - v):
                m -= 1
            t = np.float64(v - cent[i, m])
            e += t * t
            cs[j] = m
        err[i] = e
        _pack_row(cs, bits, codes, i)


@numba.njit(nogil=True, cache=True)
def _degather(codes, cent, bits, out):
    n, d = out.shape
    cs = np.empty(d, np.uint8)
    for i in range(n):
        _unpack_row(codes, i, bits, cs)
        for j in range(d):
            out[i, j] = cent[i, cs[j]]


# --------------------------------------------------------------------------------------------
# Encode / decode
# --------------------------------------------------------------------------------------------

def _as_rows(rows, what: str = "rows") -> np.ndarray:
    a = np.asarray(rows)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n, dim], got shape {a.shape}")
    if a.dtype.kind != "f":
        raise ValueError(f"{what} must be floating point, got {a.dtype}")
    if a.shape[1] < 1:
        raise ValueError(f"{what} must have dim >= 1, got shape {a.shape}")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(a, dtype=np.float32)


def _range(x: np.ndarray, what: str = "rows") -> tuple[np.ndarray, np.ndarray]:
    lo = np.empty(x.shape[0], np.float32)
    hi = np.empty(x.shape[0], np.float32)
    bad = _minmax(x, lo, hi)
    if bad:
        raise ValueError(f"{what} hold NaN or inf in {bad} of {x.shape[0]} rows")
    return lo, hi


def _fp16_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """float16 (scale, bias) of ranges [lo, hi]: bias rounded down and scale up so that the
    grid covers the range; constant rows get scale 0 and their value rounded to nearest."""
    lo = np.clip(lo, -FP16_MAX, FP16_MAX).astype(np.float64)
    hi = np.clip(hi, -FP16_MAX, FP16_MAX).astype(np.float64)
    flat = ~(hi > lo)
    bias = lo.astype(np.float16)
    down = (bias.astype(np.float64) > lo) & ~flat
    bias[down] = np.nextafter(bias[down], np.float16(-np.inf))
    s = np.where(flat, 0.0, (hi - bias.astype(np.float64)) / ((1 << bits) - 1))
    scale = s.astype(np.float16)
    up = scale.astype(np.float64) < s
    scale[up] = np.nextafter(scale[up], np.float16(np.inf))
    return scale, bias


def _encode_range(x, lo, hi, bits, pack=True):
    """Uniform encoding of each row on its [lo, hi]: (codes, scale16, bias16, sq_err); codes
    are left unwritten unless ``pack``."""
    scale, bias = _fp16_params(lo, hi, bits)
    codes = np.empty((x.shape[0], (x.shape[1] * bits + 7) // 8) if pack else (0, 0), np.uint8)
    err = np.empty(x.shape[0], np.float64)
    _quantize(x, scale.astype(np.float32), bias.astype(np.float32), bits, codes, err, pack)
    return codes, scale, bias, err


def _encode_adaptive(x, lo, hi, bits):
    """Adaptive encoding: the searched range where it beats the full range's actual (float16
    parameters) error, the full range elsewhere."""
    alo = np.empty_like(lo)
    ahi = np.empty_like(hi)
    _adaptive_search(x, lo, hi, bits, BINS, round(MAX_TRIM * BINS), alo, ahi)
    trimmed = (alo != lo) | (ahi != hi)
    codes, scale, bias, err = _encode_range(x, alo, ahi, bits)
    if trimmed.any():
        eu = _encode_range(x, lo, hi, bits, pack=False)[3]
        worse = np.flatnonzero(trimmed & ~(err < eu))
        if len(worse):
            c, scale[worse], bias[worse], err[worse] = _encode_range(x[worse], lo[worse],
                                                                     hi[worse], bits)
            codes[worse] = c
    return codes, scale, bias, err


def _to_fp16(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(np.float16)


def encode(rows, scheme: Scheme) -> EncodedRows:
    """Encode float rows [n, dim] (float32; other float dtypes are converted) under ``scheme``.
    Raises ValueError on non-2-D, non-float, dim 0 or non-finite input."""
    if not isinstance(scheme, Scheme):
        raise ValueError(f"scheme must be a Scheme, got {scheme!r}")
    x = _as_rows(rows)
    n, d = x.shape
    lo, hi = _range(x)
    if scheme.kind == "fp32":
        return EncodedRows(scheme, n, d, values=x.copy())
    if scheme.kind == "fp16":
        return EncodedRows(scheme, n, d, values=_to_fp16(x))
    bits = scheme.bits
    if scheme.kind == "uniform":
        codes, scale, bias, err = _encode_range(x, lo, hi, bits)
    else:
        codes, scale, bias, err = _encode_adaptive(x, lo, hi, bits)
    if scheme.kind != "kmeans":
        return EncodedRows(scheme, n, d, codes=codes, scale=scale, bias=bias)
    cent = np.empty((n, 1 << bits), np.float64)
    _kmeans(x, scale.astype(np.float32), bias.astype(np.float32), bits, KMEANS_ITERS, cent)
    cent16 = _to_fp16(cent)
    kcodes = np.empty_like(codes)
    _assign(x, cent16.astype(np.float32), bits, kcodes, err)
    return EncodedRows(scheme, n, d, codes=kcodes, centroids=cent16)


def decode(enc: EncodedRows) -> np.ndarray:
    """float32 [n, dim] rows of an :class:`EncodedRows`."""
    s = enc.scheme
    if s.kind in ("fp32", "fp16"):
        return np.array(enc.values, dtype=np.float32, copy=True).reshape(enc.n, enc.dim)
    out = np.empty((enc.n, enc.dim), np.float32)
    codes = np.ascontiguousarray(enc.codes, dtype=np.uint8)
    if codes.shape != (enc.n, (enc.dim * s.bits + 7) // 8):
        raise ValueError(f"codes of shape {codes.shape} do not fit {enc.n} x {enc.dim} "
                         f"at {s.bits} bits")
    if s.kind == "kmeans":
        _degather(codes, np.ascontiguousarray(enc.centroids, dtype=np.float32), s.bits, out)
    else:
        _dequantize(codes, np.asarray(enc.scale, dtype=np.float32),
                    np.asarray(enc.bias, dtype=np.float32), s.bits, out)
    return out


def row_errors(rows, decoded) -> np.ndarray:
    """Per row ||row - decoded||_2 / ||row||_2 (float64 [n]); a zero row counts its absolute
    error ||decoded||_2 instead."""
    r = np.asarray(rows, dtype=np.float32)
    diff = (r - np.asarray(decoded, dtype=np.float32)).astype(np.float64)
    num = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    r64 = r.astype(np.float64)
    den = np.sqrt(np.einsum("ij,ij->i", r64, r64))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), num)


def reconstruction_error(rows, scheme: Scheme) -> float:
    """Mean over rows of the relative L2 error ||row - decode(encode(row))||_2 / ||row||_2
    (a zero row counts its absolute error; see :func:`row_errors`). 0.0 for no rows."""
    x = _as_rows(rows)
    if x.shape[0] == 0:
        return 0.0
    return float(row_errors(x, decode(encode(x, scheme))).mean())


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------

_STATE_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}


def encode_state(state, dtype: str = "fp32") -> EncodedRows:
    """Optimizer state [n, k] (or [n], taken as [n, 1]) kept at ``dtype`` fp32 or fp16, never
    lower. fp16 clamps to +-65504, so finite input never becomes inf or NaN."""
    if dtype not in _STATE_DTYPES:
        raise ValueError(f"optimizer state is kept at fp32 or fp16 (never below), got {dtype!r}")
    a = np.asarray(state)
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    x = _as_rows(a, "optimizer state")
    _range(x, "optimizer state")
    scheme = Scheme.parse(32 if _STATE_DTYPES[dtype] == "fp32" else 16, "none")
    return encode(x, scheme)


def decode_state(enc: EncodedRows) -> np.ndarray:
    """float32 [n, k] optimizer state of an :func:`encode_state` result."""
    if enc.scheme.kind not in ("fp32", "fp16"):
        raise ValueError(f"optimizer state is stored as fp32 or fp16, not {enc.scheme.name}")
    return decode(enc)


# --------------------------------------------------------------------------------------------
# Bit-width policy
# --------------------------------------------------------------------------------------------

#: (most expected restores, bits): the first row whose bound holds gives the bit-width.
BITS_BY_RESTORES = ((1, 2), (3, 3), (20, 4))
_LADDER = (2, 3, 4, 8)


def choose_bits(expected_restores: int) -> int:
    """Bits for a job expecting ``expected_restores`` restores from its checkpoints.

    Each restore puts one checkpoint's quantization error into the model and training then has
    to absorb it, so the error budget shrinks with the number of restores. Check-N-Run found
    2-bit (adaptive) quantization costs no measurable accuracy when a job restores once, 3-bit
    when it restores a few times, and needed 4 bits and more as restores pile up. Thresholds:
    0-1 restores -> 2 bits, 2-3 -> 3, 4-20 -> 4, more than 20 -> 8 (the 20 is conservative:
    8-bit's error, ~16x below 4-bit's, is negligible after any number of restores).
    """
    if isinstance(expected_restores, bool) or not isinstance(expected_restores, (int, np.integer)):
        raise ValueError(f"expected_restores must be an int, got {expected_restores!r}")
    if expected_restores < 0:
        raise ValueError(f"expected_restores must be >= 0, got {expected_restores}")
    for most, bits in BITS_BY_RESTORES:
        if expected_restores <= most:
            return bits
    return 8


def raise_bits(bits: int, restores_so_far: int) -> int:
    """Bit-width for the checkpoints after a restore: one step up the ladder 2 -> 3 -> 4 -> 8
    from ``bits``, and at least :func:`choose_bits` (``restores_so_far``), never above 8.
    ``restores_so_far`` counts the restore just done. fp16/fp32 (16, 32) stay as they are."""
    if bits in (16, 32):
        return bits
    if bits not in _LADDER:
        raise ValueError(f"bits must be 2, 3, 4, 8, 16 or 32, got {bits!r}")
    if isinstance(restores_so_far, bool) or not isinstance(restores_so_far, (int, np.integer)):
        raise ValueError(f"restores_so_far must be an int, got {restores_so_far!r}")
    if restores_so_far < 0:
        raise ValueError(f"restores_so_far must be >= 0, got {restores_so_far}")
    up = _LADDER[min(_LADDER.index(bits) + 1, len(_LADDER) - 1)]
    return min(8, max(up, choose_bits(int(restores_so_far))))
