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
  so an adaptive row is never worse than the uniform one. The search scores both moves of a
  step in one pass over the row, 16 rows side by side (one per float32 lane of a vector), and
  ends a row's walk as soon as no later range can beat the best one seen (a bound from the
  clamped min and max; the chosen range is the full walk's): ~400 MB/s of float32 rows of dim
  64 at 2-4 bits, ~1.4 GB/s at 8 bits (where that bound ends most walks after a few steps),
  one core, search and encoding together.
- ``kmeans`` n-bit: 2**n float16 centroids per row (1-D Lloyd iterations started from the
  row's adaptive grid, so before the float16 rounding of the centroids it is never worse than
  adaptive); codes index the row's centroids. The quality upper bound: it runs the adaptive
  search first, then Lloyd, and encodes ~8x (2-4 bits) to ~60x (8 bits) slower than adaptive
  (45-55 MB/s of float32 rows of dim 64 at 2-4 bits, ~20 MB/s at 8 bits, one core).

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
    _pack_tail(cs, bits, out, i, 0, 0)


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


@numba.njit(inline="always")
def _pack_tail(cs, bits, out, i, j0, p0):
    """Bit-serial packing of the codes cs[j0:] from byte p0 of out[i] (j0 * bits == 8 * p0)."""
    acc = 0
    nb = 0
    p = p0
    for j in range(j0, cs.shape[0]):
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
def _pack_fast(cs, bits, out, i):
    """Same bytes as :func:`_pack_row`, a whole byte (or 3 for 3 bits) per iteration."""
    d = cs.shape[0]
    if bits == 8:
        for j in range(d):
            out[i, j] = cs[j]
    elif bits == 4:
        h = d >> 1
        for p in range(h):
            out[i, p] = np.uint8(cs[2 * p] | (cs[2 * p + 1] << 4))
        _pack_tail(cs, 4, out, i, 2 * h, h)
    elif bits == 2:
        h = d >> 2
        for p in range(h):
            out[i, p] = np.uint8(cs[4 * p] | (cs[4 * p + 1] << 2) | (cs[4 * p + 2] << 4)
                                 | (cs[4 * p + 3] << 6))
        _pack_tail(cs, 2, out, i, 4 * h, h)
    elif bits == 3:
        h = d >> 3
        for p in range(h):
            w = np.uint32(0)
            for t in range(8):
                w |= np.uint32(cs[8 * p + t]) << np.uint32(3 * t)
            out[i, 3 * p] = np.uint8(w & np.uint32(0xFF))
            out[i, 3 * p + 1] = np.uint8((w >> np.uint32(8)) & np.uint32(0xFF))
            out[i, 3 * p + 2] = np.uint8(w >> np.uint32(16))
        _pack_tail(cs, 3, out, i, 8 * h, 3 * h)
    else:
        _pack_tail(cs, bits, out, i, 0, 0)


@numba.njit(inline="always")
def _f16(v, mode):
    """The float16 nearest to (``mode`` 0, ties to even), below (-1) or above (1) the float64
    ``v`` (finite, |v| <= 65504): (its bit pattern, its value). Exact: the rounding happens on
    ``|v| * 2**(10 - e)``, an exact scaling that puts float16's last mantissa bit at 1."""
    neg = v < 0.0
    a = -v if neg else v
    e = (np.float64(a).view(np.int64) >> 52) - 1023        # float64 exponent (-1023 for 0)
    e = max(e, -14)                                        # float16 subnormals share 2**-14's
    p = np.int64((1033 - e) << 52).view(np.float64)       # 2**(10 - e)
    q = a * p
    if mode == 0:
        m = np.rint(q)
    elif (mode > 0) != neg:
        m = np.ceil(q)
    else:
        m = np.floor(q)
    h = ((e + 14) << 10) + np.int64(m)   # a carry out of the mantissa bumps the exponent
    val = m / p
    if neg:
        h |= 0x8000
        val = -val
    return h, val


@numba.njit(inline="always")
def _grid_params(lo, hi, top):
    """float16 grid of [lo, hi] (``top`` = 2**bits - 1 as float64): bias rounded down and scale
    up so that it covers the range (lo and hi clipped to +-65504); a flat range gets scale 0
    and its value rounded to nearest. Returns (scale bits, bias bits, scale, bias float32)."""
    lo64 = min(max(np.float64(lo), -FP16_MAX), FP16_MAX)
    hi64 = min(max(np.float64(hi), -FP16_MAX), FP16_MAX)
    if not hi64 > lo64:
        bb, bv = _f16(lo64, 0)
        return 0, bb, np.float32(0.0), np.float32(bv)
    bb, bv = _f16(lo64, -1)
    sb, sv = _f16((hi64 - bv) / top, 1)
    return sb, bb, np.float32(sv), np.float32(bv)


@numba.njit(inline="always")
def _grid_code(v, s, b, inv, top):
    """(code, decoded value) of v on the grid (s, b), decoded exactly as :func:`_dequantize`
    does (the callers use strict float math: nothing fused or reassociated)."""
    c = min(max(np.rint((v - b) * inv), np.float32(0.0)), top)
    return c, b + s * c


@numba.njit(inline="always")
def _grid_row(x, i, s, b, top, cs):
    """Codes of row i on the grid (s, b) into cs."""
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    for j in range(x.shape[1]):
        cs[j] = np.uint8(_grid_code(x[i, j], s, b, inv, top)[0])


@numba.njit(inline="always")
def _grid_rows2(x, i, s, b, s2, b2, top, cs, cs2, dsq):
    """Codes of row i on the grids (s, b) into cs and (s2, b2) into cs2, and for each value
    the difference of its squared errors (second grid's minus first's) into dsq."""
    inv = np.float32(1.0) / s if s > 0 else np.float32(0.0)
    inv2 = np.float32(1.0) / s2 if s2 > 0 else np.float32(0.0)
    for j in range(x.shape[1]):
        v = x[i, j]
        c, r = _grid_code(v, s, b, inv, top)
        c2, r2 = _grid_code(v, s2, b2, inv2, top)
        t = np.float64(v - r)
        t2 = np.float64(v - r2)
        dsq[j] = t2 * t2 - t * t
        cs[j] = np.uint8(c)
        cs2[j] = np.uint8(c2)


@numba.njit(inline="always")
def _sum(a):
    """Sum of a float64 array in 8 interleaved partial sums (one vector of them)."""
    n = a.shape[0]
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = 0.0
    m = n & ~7
    for j in range(0, m, 8):
        t0 += a[j]
        t1 += a[j + 1]
        t2 += a[j + 2]
        t3 += a[j + 3]
        t4 += a[j + 4]
        t5 += a[j + 5]
        t6 += a[j + 6]
        t7 += a[j + 7]
    for j in range(m, n):
        t0 += a[j]
    return ((t0 + t4) + (t1 + t5)) + ((t2 + t6) + (t3 + t7))


@numba.njit(nogil=True, cache=True)
def _encode_grid(x, lo, hi, alo, ahi, bits, codes, scale, bias):
    """Uniform n-bit encoding of each row i on the float16 grid of [alo[i], ahi[i]] where that
    range differs from the row's [lo[i], hi[i]] and its actual squared error (float16 grid,
    computed as decoded) is lower than the full range's; on the full range's grid otherwise.
    Writes the packed codes and the float16 bit patterns of scale and bias (uint16)."""
    n, d = x.shape
    top = np.float32((1 << bits) - 1)
    top64 = np.float64((1 << bits) - 1)
    cs = np.empty(d, np.uint8)
    ca = np.empty(d, np.uint8)
    dsq = np.empty(d, np.float64)
    for i in range(n):
        sb, bb, s, b = _grid_params(lo[i], hi[i], top64)
        if alo[i] != lo[i] or ahi[i] != hi[i]:
            asb, abb, as_, ab = _grid_params(alo[i], ahi[i], top64)
            _grid_rows2(x, i, s, b, as_, ab, top, cs, ca, dsq)
            if _sum(dsq) < 0.0:
                sb = asb
                bb = abb
                cs[:] = ca
        else:
            _grid_row(x, i, s, b, top, cs)
        _pack_fast(cs, bits, codes, i)
        scale[i] = sb
        bias[i] = bb


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


# The search scores 16 rows at once, one per float32 lane of a 512-bit vector: each row is
# transposed into a column of ``xt`` (element j of lane r at xt[16 * j + r]) and the per-lane
# state sits in one array ``st`` (grid slope, grid offset, error of each move), so the inner loop
# over the row's elements is a plain vector loop without horizontal sums or per-row branches.
# (Row at a time, the walk waited on each step's sum and comparison: half the speed.) LLVM
# vectorizes the lane loops as they are written, in their own functions over the scratch arrays
# ``_adaptive_search`` allocates; written inline, or with the clamps dropped, it did not (1.5x
# slower search): time ``benchmarks/bench_quant.py --kinds adaptive`` after editing them.
# Reassociation and contraction only change float32 rounding of the search's error estimates;
# no "nnan"/"ninf": odd rows (flat, huge ranges) must compare as IEEE says.
_SEARCH_MATH = {"reassoc", "nsz", "contract", "arcp"}


@numba.njit(nogil=True, cache=True, fastmath=_SEARCH_MATH, error_model="numpy")
def _lanes_error(xt, st, d):
    """st[32 + r] += sum_j (u - round(u))^2, u = xt[16 j + r] * st[r] + st[16 + r]: the
    untrimmed grid's error (in grid steps) of each lane."""
    for j in range(d):
        for r in range(16):
            u = xt[j * 16 + r] * st[r] + st[16 + r]
            t = u - np.rint(u)
            st[32 + r] += t * t


@numba.njit(nogil=True, cache=True, fastmath=_SEARCH_MATH, error_model="numpy")
def _lanes_moves(xt, st, sh, top, d):
    """Both moves of a step for each lane, in one pass: with u = xt * st[r] + st[16 + r] the
    value on the grid of [a, b - step] (upper end moved down), u - sh is the value on the grid
    of [a + step, b] (lower end moved up); st[32 + r] and st[48 + r] accumulate the squared
    distance (in grid steps) to the clamped, rounded value on each grid."""
    zero = np.float32(0.0)
    for j in range(d):
        for r in range(16):
            u_hi = xt[j * 16 + r] * st[r] + st[16 + r]
            u_lo = u_hi - sh
            t_lo = u_lo - np.rint(min(max(u_lo, zero), top))
            t_hi = u_hi - np.rint(min(max(u_hi, zero), top))
            st[32 + r] += t_lo * t_lo
            st[48 + r] += t_hi * t_hi


@numba.njit(nogil=True, cache=True, fastmath=_SEARCH_MATH, error_model="numpy")
def _adaptive_search(x, lo, hi, bits, bins, budget, out_lo, out_hi):
    """Check-N-Run's greedy range search per row (see the module docstring), in float32 with
    exact (not float16) grid parameters. The squared error of a range [a, b] is
    s^2 * sum_j (u_j - clamp(round(u_j), 0, top))^2 with u_j = (x_j - a) / s, s = (b - a) / top
    (clamping x to [a, b] before rounding is the same as clamping the rounded u). Both moves of
    a step leave a range of bins - k bins, so they share s and their grids differ by one bin:
    one pass over the row scores both. 16 rows go side by side (see the comment above).

    A row stops early when no later range can beat the best one seen: every later range has
    its lower end at least ``cut_lo`` bins above the row's min and its upper end ``cut_hi`` bins
    below its max, and the min and max then clamp to those ends, so every later error is at
    least (cut_lo^2 + cut_hi^2) * step^2. (At 8 bits the rounding error is small and this ends
    the walk after a few steps; at 2-4 bits it rarely triggers.) The chosen range is the same
    as the full walk's."""
    n, d = x.shape
    top = np.float32((1 << bits) - 1)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    nbins = np.float32(bins)
    xt = np.empty(d * 16, np.float32)
    st = np.empty(64, np.float32)      # per lane: slope, offset, error of each move
    a0 = np.empty(16, np.float32)
    step = np.empty(16, np.float32)
    cut_lo = np.empty(16, np.float32)
    cut_hi = np.empty(16, np.float32)
    best_lo = np.empty(16, np.float32)
    best_hi = np.empty(16, np.float32)
    best = np.empty(16, np.float32)
    for i0 in range(0, n, 16):
        m = min(16, n - i0)
        for r in range(16):
            i = i0 + r if r < m else i0     # a short last block repeats its first row
            a = lo[i]
            w = hi[i] - a
            if w > np.float32(1e-30) and w < np.float32(np.inf):
                for j in range(d):
                    xt[j * 16 + r] = x[i, j]
            else:                  # flat (or below float16's resolution anyway): not searched
                a = zero
                w = one
                for j in range(d):
                    xt[j * 16 + r] = zero
            a0[r] = a
            step[r] = w / nbins
            inv = top / w
            st[r] = inv
            st[16 + r] = -a * inv
            st[32 + r] = zero
        _lanes_error(xt, st, d)
        for r in range(16):
            s = step[r] * nbins / top
            best[r] = st[32 + r] * s * s
            cut_lo[r] = zero
            cut_hi[r] = zero
            best_lo[r] = zero
            best_hi[r] = zero
        for k in range(1, budget + 1):
            nb = np.float32(bins - k)
            sh = top / nb
            for r in range(16):
                inv = top / (step[r] * nb)
                st[r] = inv
                st[16 + r] = -(a0[r] + cut_lo[r] * step[r]) * inv
                st[32 + r] = zero
                st[48 + r] = zero
            _lanes_moves(xt, st, sh, top, d)
            done = 0
            for r in range(16):
                s = step[r] * nb / top
                mv = st[32 + r] <= st[48 + r]
                e = (st[32 + r] if mv else st[48 + r]) * s * s
                cut_lo[r] += one if mv else zero
                cut_hi[r] += zero if mv else one
                if e < best[r]:
                    best[r] = e
                    best_lo[r] = cut_lo[r]
                    best_hi[r] = cut_hi[r]
                # the bound of the docstring, with 1% to spare for float32 rounding
                bound = (cut_lo[r] * cut_lo[r] + cut_hi[r] * cut_hi[r]) * step[r] * step[r]
                done += np.int64(np.float32(0.99) * bound > best[r])
            if done == 16:
                break
        for r in range(m):
            i = i0 + r
            a = lo[i]
            b = hi[i]
            w = b - a
            if w > np.float32(1e-30) and w < np.float32(np.inf):
                out_lo[i] = a + best_lo[r] * step[r] if best_lo[r] > zero else a
                out_hi[i] = b - best_hi[r] * step[r] if best_hi[r] > zero else b
            else:
                out_lo[i] = a
                out_hi[i] = b


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


def _encode_uniform(x, lo, hi, bits, alo=None, ahi=None):
    """(codes, scale16, bias16) of rows on their [lo, hi], or on [alo, ahi] where that range
    gives a lower actual error (see :func:`_encode_grid`)."""
    n, d = x.shape
    codes = np.empty((n, (d * bits + 7) // 8), np.uint8)
    scale = np.empty(n, np.uint16)
    bias = np.empty(n, np.uint16)
    _encode_grid(x, lo, hi, lo if alo is None else alo, hi if ahi is None else ahi, bits,
                 codes, scale, bias)
    return codes, scale.view(np.float16), bias.view(np.float16)


def _encode_adaptive(x, lo, hi, bits):
    """Adaptive encoding: the searched range where it beats the full range's actual (float16
    parameters) error, the full range elsewhere."""
    alo = np.empty_like(lo)
    ahi = np.empty_like(hi)
    _adaptive_search(x, lo, hi, bits, BINS, round(MAX_TRIM * BINS), alo, ahi)
    return _encode_uniform(x, lo, hi, bits, alo, ahi)


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
        codes, scale, bias = _encode_uniform(x, lo, hi, bits)
    else:
        codes, scale, bias = _encode_adaptive(x, lo, hi, bits)
    if scheme.kind != "kmeans":
        return EncodedRows(scheme, n, d, codes=codes, scale=scale, bias=bias)
    cent = np.empty((n, 1 << bits), np.float64)
    _kmeans(x, scale.astype(np.float32), bias.astype(np.float32), bits, KMEANS_ITERS, cent)
    cent16 = _to_fp16(cent)
    kcodes = np.empty_like(codes)
    _assign(x, cent16.astype(np.float32), bits, kcodes, np.empty(n, np.float64))
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
