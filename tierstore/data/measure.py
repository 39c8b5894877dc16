"""Throughput of the data path (not a test): python -m tierstore.data.measure [--rows N]

Prints samples/s of the synthetic generator per profile (blocks, and batches through the
iterator), rows/s of the TSV reader (plain and gzip) against a plain-Python parse of the same
lines, of `prepare`, and of batches from the prepared form. Run it with OMP_NUM_THREADS=1:
everything here is one core.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

from tierstore.data import batches, open_dataset, prepare
from tierstore.data.schema import hash_categorical
from tierstore.data.synthetic import BLOCK, SyntheticDataset


def write_sample_tsv(path: str, n: int, seed: int = 0) -> None:
    """n Criteo-like lines: 20% missing dense, 10% missing categorical, 8-digit hex."""
    rng = np.random.default_rng(seed)
    cols = [rng.integers(0, 2, n).astype(str)]
    for _ in range(13):
        v = np.floor(np.exp(rng.normal(1.5, 1.5, n))).astype(np.int64).astype(str)
        v[rng.random(n) < 0.2] = ""
        cols.append(v)
    for _ in range(26):
        v = np.char.zfill(np.char.lower(np.array([format(x, "x") for x in
                                                  rng.integers(0, 1 << 32, n)])), 8)
        v[rng.random(n) < 0.1] = ""
        cols.append(v)
    with open(path, "w") as f:
        f.writelines("\t".join(r) + "\n" for r in zip(*[c.tolist() for c in cols]))


def python_parse(path: str) -> int:
    """The plain alternative: split lines and int(x, 16) in list comprehensions (per chunk)."""
    n = 0
    with open(path, "rb") as f:
        while True:
            lines = f.readlines(1 << 20)
            if not lines:
                return n
            rows = [ln.rstrip(b"\n").split(b"\t") for ln in lines]
            np.array([r[0] == b"1" for r in rows], np.float32)
            np.log1p(np.maximum(np.array([[int(x) if x else 0 for x in r[1:14]] for r in rows]), 0))
            hash_categorical(np.array([[int(x, 16) if x else 0 for x in r[14:]] for r in rows],
                                      np.uint64), np.arange(26))
            n += len(rows)


def rate(fn: Callable[[], int], repeats: int = 3) -> float:
    """Best of ``repeats`` items/s."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t))
    return best


def run(rows: int = 200_000, blocks: int = 16) -> dict[str, Any]:
    res: dict[str, Any] = {"generator_samples_per_s": {}, "batches_samples_per_s": {}}
    for name, scale, pool in (("small", 1.0, 1), ("criteo_kaggle", 1.0, 1),
                              ("criteo_kaggle", 0.01, 1), ("meta", 1.0, 1), ("small", 1.0, 4)):
        ds = SyntheticDataset(name, seed=0, scale=scale, pooling=pool)
        ds.block(0)
        key = f"{name}" + (f",scale={scale}" if scale != 1 else "") + (f",pooling={pool}" if pool != 1 else "")
        res["generator_samples_per_s"][key] = rate(
            lambda ds=ds: sum(len(ds.block(b)) for b in range(blocks)))
        res["batches_samples_per_s"][key] = rate(
            lambda ds=ds: sum(len(b) for _, b in zip(range(blocks * BLOCK // 2048), batches(ds, 2048))))
    tmp = tempfile.mkdtemp(prefix="tierstore-measure-")
    try:
        plain = os.path.join(tmp, "sample.tsv")
        write_sample_tsv(plain, rows)
        gz = plain + ".gz"
        with open(plain, "rb") as f, gzip.open(gz, "wb", compresslevel=6) as g:
            shutil.copyfileobj(f, g)
        res["tsv_bytes_per_row"] = os.path.getsize(plain) / rows
        for key, path in (("plain", plain), ("gzip", gz)):
            ds = open_dataset(path)
            res[f"tsv_{key}_rows_per_s"] = rate(
                lambda ds=ds: sum(len(c) for _, c in ds.chunks(ds.start(0)[0])))
            res[f"tsv_{key}_batches_rows_per_s"] = rate(
                lambda ds=ds: sum(len(b) for b in batches(ds, 2048)), 1)
        res["python_split_int_rows_per_s"] = rate(lambda: python_parse(plain), 1)
        out = os.path.join(tmp, "prep")
        t = time.perf_counter()
        prepare(gz, out, shard_rows=rows // 4, progress=False)
        res["prepare_gzip_rows_per_s"] = rows / (time.perf_counter() - t)
        prep = open_dataset(out)
        res["prepared_batches_rows_per_s"] = rate(lambda: sum(len(b) for b in batches(prep, 2048)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierstore.data.measure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="TSV lines to measure on")
    ap.add_argument("--blocks", type=int, default=16, help=f"generator blocks ({BLOCK} samples)")
    a = ap.parse_args(argv)
    res = run(a.rows, a.blocks)
    print(json.dumps({k: (round(v) if isinstance(v, float) else
                          {kk: round(vv) for kk, vv in v.items()}) for k, v in res.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
