"""Per-row checkpoint quantization (tierstore.quant): quality, speed and size of every scheme.

    OMP_NUM_THREADS=1 python benchmarks/bench_quant.py [--json] [--rows 100000] [--dim 64]

Rows: N(0, 1) rows of ``dim`` values (and, for the error only, Student-t rows with 3 degrees of
freedom: heavy tails, where trimming the range pays most). Per scheme: stored bytes per row
(codes + float16 scale/bias or centroids), the mean relative L2 reconstruction error per row
(``quant.reconstruction_error``), and encode/decode throughput in MB/s of float32 rows (median
of ``--repeats`` runs, one thread; the kernels are single-threaded numba loops). k-means, the
quality upper bound, is timed and measured on the first ``--kmeans-rows`` rows only (it is the
slow one).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from tierstore import quant
from tierstore.bench.common import environment, median_seconds


def schemes() -> list[quant.Scheme]:
    out = [quant.Scheme.parse(32, "none"), quant.Scheme.parse(16, "none")]
    for kind in quant.QUANTS:
        out += [quant.Scheme.parse(bits, kind) for bits in quant.QUANT_BITS]
    return out


def measure(rows: np.ndarray, heavy: np.ndarray, scheme: quant.Scheme, repeats: int) -> dict:
    enc = quant.encode(rows, scheme)
    dec = quant.decode(enc)
    t_enc = median_seconds(lambda: quant.encode(rows, scheme), repeats=repeats, warmup=0)
    t_dec = median_seconds(lambda: quant.decode(enc), repeats=repeats, warmup=0)
    n, dim = rows.shape
    return {
        "scheme": scheme.name, "kind": scheme.kind, "bits": scheme.bits, "rows": n, "dim": dim,
        "bytes_per_row": enc.nbytes / n,
        "compression": (4 * dim) / (enc.nbytes / n),
        "rel_l2_error": float(quant.row_errors(rows, dec).mean()),
        "rel_l2_error_heavy_tails": quant.reconstruction_error(heavy, scheme),
        "encode_mb_s": rows.nbytes / t_enc / 1e6,
        "encode_krows_s": n / t_enc / 1e3,
        "decode_mb_s": rows.nbytes / t_dec / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kmeans-rows", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((a.rows, a.dim), dtype=np.float32)
    heavy = rng.standard_t(3, (min(a.rows, 20_000), a.dim)).astype(np.float32)
    for s in schemes():  # compile / load the numba kernels outside the timings
        quant.decode(quant.encode(rows[:64], s))
    results = []
    for s in schemes():
        r = rows[:a.kmeans_rows] if s.kind == "kmeans" else rows
        h = heavy[:a.kmeans_rows] if s.kind == "kmeans" else heavy
        results.append(measure(r, h, s, a.repeats))
    out = {"rows": a.rows, "dim": a.dim, "kmeans_rows": min(a.rows, a.kmeans_rows),
           "environment": environment(), "schemes": results}
    if a.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{a.rows:,} N(0,1) rows x dim {a.dim} (k-means: first {out['kmeans_rows']:,}); "
          "error = mean relative L2 error per row; MB/s of float32 rows, one thread\n")
    print("| scheme | bytes/row | vs fp32 | error N(0,1) | error t(3) | encode MB/s | "
          "encode k rows/s | decode MB/s |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scheme']} | {r['bytes_per_row']:.1f} | {r['compression']:.1f}x | "
              f"{r['rel_l2_error']:.5f} | {r['rel_l2_error_heavy_tails']:.5f} | "
              f"{r['encode_mb_s']:,.0f} | {r['encode_krows_s']:,.0f} | {r['decode_mb_s']:,.0f} |")


if __name__ == "__main__":
    main()
