"""Per-row checkpoint quantization (tierstore.quant): quality, speed and size of every scheme.

    OMP_NUM_THREADS=1 python benchmarks/bench_quant.py [--json] [--rows 100000] [--dim 64]
        [--kinds adaptive,uniform] [--bits 2,4] [--repeats 5]

Rows: N(0, 1) rows of ``dim`` values (and, for the error only, Student-t rows with 3 degrees of
freedom: heavy tails, where trimming the range pays most). Per scheme: stored bytes per row
(codes + float16 scale/bias or centroids), the mean relative L2 reconstruction error per row
(``quant.reconstruction_error``), and encode/decode throughput in MB/s of float32 rows (median
of ``--repeats`` runs, one thread; the kernels are single-threaded numba loops; "best" is the
fastest run, the steadier number on a shared machine). k-means, the quality upper bound, is
timed and measured on the first ``--kmeans-rows`` rows only (it is the slow one). ``--kinds``
and ``--bits`` pick schemes (fp32 and fp16 count as kinds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from tierstore import quant
from tierstore.bench.common import environment


def schemes(kinds=None, bits=None) -> list[quant.Scheme]:
    out = [quant.Scheme.parse(32, "none"), quant.Scheme.parse(16, "none")]
    for kind in quant.QUANTS:
        out += [quant.Scheme.parse(b, kind) for b in quant.QUANT_BITS]
    return [s for s in out if (kinds is None or s.kind in kinds)
            and (bits is None or not s.quantized or s.bits in bits)]


def times(fn, repeats: int) -> tuple[float, float]:
    """(median, fastest) seconds of ``fn()`` over ``repeats`` calls."""
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts)


def measure(rows: np.ndarray, heavy: np.ndarray, scheme: quant.Scheme, repeats: int) -> dict:
    enc = quant.encode(rows, scheme)
    dec = quant.decode(enc)
    t_enc, t_enc_best = times(lambda: quant.encode(rows, scheme), repeats)
    t_dec, _ = times(lambda: quant.decode(enc), repeats)
    n, dim = rows.shape
    return {
        "scheme": scheme.name, "kind": scheme.kind, "bits": scheme.bits, "rows": n, "dim": dim,
        "bytes_per_row": enc.nbytes / n,
        "compression": (4 * dim) / (enc.nbytes / n),
        "rel_l2_error": float(quant.row_errors(rows, dec).mean()),
        "rel_l2_error_heavy_tails": quant.reconstruction_error(heavy, scheme),
        "encode_mb_s": rows.nbytes / t_enc / 1e6,
        "encode_mb_s_best": rows.nbytes / t_enc_best / 1e6,
        "encode_krows_s": n / t_enc / 1e3,
        "decode_mb_s": rows.nbytes / t_dec / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kmeans-rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", default=None, help="comma-separated kinds to run (fp32, fp16, "
                   "uniform, adaptive, kmeans); all by default")
    p.add_argument("--bits", default=None, help="comma-separated bit-widths of the quantized kinds")
    a = p.parse_args()
    kinds = None if a.kinds is None else set(a.kinds.split(","))
    bad = sorted((kinds or set()) - set(quant.KINDS))
    if bad:
        p.error(f"unknown kinds {bad}; valid: {', '.join(quant.KINDS)}")
    bits = None if a.bits is None else {int(b) for b in a.bits.split(",")}
    if bits is not None and not bits <= set(quant.QUANT_BITS):
        p.error(f"bits must be among {quant.QUANT_BITS}")
    todo = schemes(kinds, bits)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((a.rows, a.dim), dtype=np.float32)
    heavy = rng.standard_t(3, (min(a.rows, 20_000), a.dim)).astype(np.float32)
    for s in todo:  # compile / load the numba kernels outside the timings
        quant.decode(quant.encode(rows[:64], s))
    results = []
    for s in todo:
        r = rows[:a.kmeans_rows] if s.kind == "kmeans" else rows
        h = heavy[:a.kmeans_rows] if s.kind == "kmeans" else heavy
        results.append(measure(r, h, s, a.repeats))
    out = {"rows": a.rows, "dim": a.dim, "kmeans_rows": min(a.rows, a.kmeans_rows),
           "environment": environment(), "schemes": results}
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(table(out))


def table(out: dict) -> str:
    """The markdown table of a result (also rendered into BENCHMARKS.md by run_all.py)."""
    lines = [f"{out['rows']:,} N(0,1) rows x dim {out['dim']} (k-means: first "
             f"{out['kmeans_rows']:,}); error = mean relative L2 error per row; MB/s of float32 "
             "rows, one thread", "",
             "| scheme | bytes/row | vs fp32 | error N(0,1) | error t(3) | encode MB/s | "
             "encode MB/s best | encode k rows/s | decode MB/s |", "|---" * 9 + "|"]
    for r in out["schemes"]:
        lines.append(f"| {r['scheme']} | {r['bytes_per_row']:.1f} | {r['compression']:.1f}x | "
                     f"{r['rel_l2_error']:.5f} | {r['rel_l2_error_heavy_tails']:.5f} | "
                     f"{r['encode_mb_s']:,.0f} | {r['encode_mb_s_best']:,.0f} | "
                     f"{r['encode_krows_s']:,.0f} | {r['decode_mb_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
