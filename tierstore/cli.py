"""The `tierstore` command: demo, benchmarks and admin of an embedded store.

    tierstore demo                         the engine end to end (what `make run` shows)
    tierstore bench cache --trace PATH|zipf:alpha=A,n=N,len=L,seed=S --capacity 0.01,0.1 ...
    tierstore bench lookup|train|scm       tierstore against nn.EmbeddingBag and FBGEMM
    tierstore bench service [--only forward,train,two,scm,idle]   through a running tierstored
    tierstore bench ckpt [--rows N] [--json]   checkpoints: bytes, stall, writer, quality
    tierstore ckpt save|list|restore|verify   incremental, quantized checkpoints
    tierstore stats --run-dir DIR [--json] figures of a running tierstored (like Redis INFO)
    tierstore stats --path DIR [--json]    per-table and per-tier figures of a store
    tierstore data prepare SRC OUT         Criteo TSV(.gz) -> memory-mappable shards
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _words(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result, indent=2) if as_json else text)


def cmd_bench_cache(a: argparse.Namespace) -> int:
    from tierstore.bench import cache
    from tierstore.cache import POLICIES
    bad = [p for p in a.policy if p not in POLICIES]
    if bad:
        raise SystemExit(f"tierstore: unknown policy {bad}; valid: {sorted(POLICIES)}")
    res = cache.run(a.trace, a.capacity, a.policy, a.batch, a.jobs, progress=not a.json)
    _emit(res, a.json, cache.table(res))
    return 0


def cmd_bench_lookup(a: argparse.Namespace, train: bool) -> int:
    from tierstore.bench import lookup
    configs = [c for c in lookup.CONFIGS if a.tables is None or c[0] in a.tables]
    res = lookup.run(train, dims=a.dims, poolings=a.pooling, dists=a.dist, configs=configs,
                     batch_size=a.batch, dram_fraction=a.dram_fraction, policy=a.policy,
                     repeats=a.repeats, progress=not a.json)
    _emit(res, a.json, lookup.table(res))
    return 0


def cmd_bench_scm(a: argparse.Namespace) -> int:
    from tierstore.bench import scm
    res = {"reads": scm.bench_reads(num_rows=a.rows, dim=a.dim), "overhead": scm.bench_overhead()}
    r = res["reads"]
    text = (f"4096 random rows of {a.rows:,} x {a.dim}: RowFile {r['rowfile_rows_per_s'] / 1e6:.2f} "
            f"M rows/s, numpy.memmap {r['memmap_rows_per_s'] / 1e6:.2f} M rows/s, pread loop "
            f"{r['pread_rows_per_s'] / 1e6:.2f} M rows/s; RowFile/memmap {r['ratio_vs_memmap']:.2f}x\n")
    for p, o in res["overhead"].items():
        text += (f"{p}: {o['overhead_bytes_per_cached_row']:.2f} B/cached row + "
                 f"{o['index_bytes_per_table_row']:.1f} B/table row (index)\n")
    _emit(res, a.json, text)
    return 0


def cmd_bench_service(a: argparse.Namespace) -> int:
    from tierstore.bench import service
    try:
        res = service.run(tables=a.tables, rows=a.rows, dim=a.dim, batch=a.batch,
                          pooling=a.pooling, dist=a.dist, repeats=a.repeats, batches=a.batches,
                          dram_fraction=a.dram_fraction, idle_seconds=a.idle_seconds,
                          seconds=a.seconds, rounds=a.rounds, only=a.only,
                          progress=not a.json)
    except ValueError as e:
        raise SystemExit(f"tierstore bench service: {e}") from None
    _emit(res, a.json, service.table(res))
    return 0


def cmd_bench_dlrm(a: argparse.Namespace) -> int:
    from tierstore.bench import dlrm
    try:
        res = dlrm.run(only=a.only, steps=a.steps, scale=a.scale, parity_steps=a.parity_steps,
                       rounds=a.rounds, timed_steps=a.timed_steps, warmup=a.warmup,
                       dram_fraction=a.dram_fraction, quality_backend=a.quality_backend,
                       progress=not a.json)
    except ValueError as e:
        raise SystemExit(f"tierstore bench dlrm: {e}") from None
    _emit(res, a.json, dlrm.table(res))
    return 0


def cmd_stats(a: argparse.Namespace) -> int:
    import tierstore as ts
    if (a.path is None) == (a.run_dir is None):
        print("tierstore stats: give --run-dir (a running tierstored) or --path (a store "
              "directory no process has open)", file=sys.stderr)
        return 2
    if a.run_dir is not None:
        from tierstore.client import connect
        try:
            with connect(a.run_dir, mode="read") as conn:
                st = conn.stats()
        except ts.TierstoreError as e:
            print(f"tierstore stats: {e}", file=sys.stderr)
            return 1
    else:
        with ts.Store(a.path, ddr_bytes=1 << 20) as store:
            for name in store.tables():
                store.open_table(name)
            st = store.stats()
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    if "service" in st:
        print("# service")
        for k, v in st["service"].items():
            print(f"{k}:{v}")
    print(f"# store {st['path']}  policy {st['policy']}  dram {st['dram_bytes']:,} B  "
          f"scm {st['scm_bytes']:,} B")
    for name, t in st["tables"].items():
        print(f"\n# table {name}")
        for k, v in t.items():
            if k != "bytes":
                print(f"{k}:{v}")
        print(f"dram_bytes:{t['bytes']['dram']}\nscm_bytes:{t['bytes']['scm']}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    import contextlib
    from tierstore.demo import run
    if not a.json:
        run(steps=a.steps)
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
        res = run(steps=a.steps, progress=False)
    print(json.dumps(res, indent=2))
    return 0


def cmd_data_prepare(a: argparse.Namespace) -> int:
    import warnings
    from tierstore.data import MalformedLine, MalformedLineWarning, prepare
    name = "tierstore data prepare"

    def show(message, category, filename, lineno, file=None, line=None):  # no source lines
        print(f"{name}: warning: {message}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", MalformedLineWarning)
            warnings.showwarning = show
            m = prepare(a.src, a.out, shard_rows=a.shard_rows, strict=a.strict,
                        progress=not a.json)
    except MalformedLine as e:
        print(f"{name}: {e} (--strict; nothing written)", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    src = m["source"]
    res = {"out": a.out, "rows": m["rows"], "shards": len(m["shards"]), "lines": src["lines"],
           "malformed": src["malformed"], "hash": m["hash"]}
    _emit(res, a.json, f"{a.out}: {m['rows']:,} rows in {len(m['shards'])} shards from "
          f"{src['lines']:,} lines ({src['malformed']:,} malformed lines skipped)")
    return 0

def _ckpt_fail(name: str, e: Exception) -> int:
    print(f"tierstore ckpt {name}: {e}", file=sys.stderr)
    return 1


def cmd_ckpt_save(a: argparse.Namespace) -> int:
    import tierstore as ts
    from tierstore import ckpt
    bits = a.bits if a.bits == "auto" else int(a.bits)
    try:
        with ts.Store(a.path, ddr_bytes=a.ddr_bytes) as store:
            h = ckpt.checkpoint(store, a.root, a.policy, bits, a.quant, keep=a.keep,
                                step=a.step, state_dtype=a.state_dtype,
                                rebaseline_at=a.rebaseline_at,
                                expected_restores=a.expected_restores, wait=True)
    except (ts.TierstoreError, ValueError, OSError) as e:
        return _ckpt_fail("save", e)
    res = {"path": h.path, "kind": h.kind, "reason": h.reason, **h.stats}
    _emit(res, a.json, f"{h.path}: {h.kind} checkpoint ({h.reason}), {h.stats['rows']:,} rows, "
          f"{h.stats['bytes']:,} bytes")
    return 0


def cmd_ckpt_list(a: argparse.Namespace) -> int:
    from tierstore import ckpt
    rows = ckpt.list_checkpoints(a.root)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no checkpoints under {a.root}")
    for r in rows:
        if "kind" not in r:
            print(f"{r['name']}  UNREADABLE: {r['problem']}")
            continue
        state = "restorable" if r["restorable"] else f"NOT restorable: {r['problem']}"
        print(f"{r['name']}  {r['kind']:<10} {r['scheme']:<10} step {r['step']}  "
              f"{r['rows']:>12,} rows {r['bytes']:>14,} B  restore set "
              f"{'+'.join(r['restore_set'])}  {r['created']}  {state}")
    return 0


def cmd_ckpt_restore(a: argparse.Namespace) -> int:
    import tierstore as ts
    try:
        with ts.Store(a.path, ddr_bytes=a.ddr_bytes) as store:
            res = store.restore(a.checkpoint, progress=not a.json)
    except (ts.TierstoreError, ValueError, OSError) as e:
        return _ckpt_fail("restore", e)
    res.pop("extra_state", None)
    _emit(res, a.json, f"{a.path}: restored {res['checkpoint']} (step {res['step']}, restore set "
          f"{'+'.join(res['restore_set'])}; rows per table {res['tables']})")
    return 0


def cmd_ckpt_verify(a: argparse.Namespace) -> int:
    from tierstore import ckpt
    if (a.checkpoint is None) == (a.root is None):
        print("tierstore ckpt verify: give a checkpoint directory or --root DIR", file=sys.stderr)
        return 2
    if a.root is not None:
        rep = ckpt.verify_root(a.root, progress=not a.json)
        results = rep["checkpoints"]
    else:
        rep = ckpt.verify(a.checkpoint, progress=not a.json)
        results = [rep]
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        for r in results:
            print(f"{r['checkpoint']}: {'ok' if r['ok'] else 'CORRUPT'} ({r['files']} files, "
                  f"{r['bytes']:,} bytes)")
            for p in r["problems"]:
                print(f"  {p['file']}: {p['problem']}")
        for n in rep.get("incomplete", []):
            print(f"{n}: interrupted write (not listed; removed by the next writer)")
    return 0 if rep["ok"] else 1


def cmd_bench_ckpt(a: argparse.Namespace) -> int:
    from tierstore.bench import ckpt as bench
    try:
        res = bench.run(rows=a.rows, dim=a.dim, batch=a.batch, pooling=a.pooling, alpha=a.alpha,
                        steps_between=a.steps_between, checkpoints=a.checkpoints,
                        policies=tuple(a.policies), bits=tuple(a.bits), quant_kind=a.quant,
                        quality_steps=a.quality_steps, quality_bits=tuple(a.quality_bits),
                        recon_rows=a.recon_rows, dram_fraction=a.dram_fraction,
                        only=tuple(a.only), workdir=a.workdir, progress=not a.json,
                        quality_data=a.quality_data or bench.QUALITY_DATA,
                        quality_batch=a.quality_batch,
                        quality_eval_samples=a.quality_eval_samples)
    except ValueError as e:
        raise SystemExit(f"tierstore bench ckpt: {e}") from None
    _emit(res, a.json, bench.table(res))
    return 0


def _add_ckpt_parsers(sub: Any, bench: Any) -> None:
    """`tierstore ckpt save|list|restore|verify` and `tierstore bench ckpt` (docs/checkpoints.md)."""
    from tierstore.ckpt.policy import POLICIES
    k = sub.add_parser("ckpt", help="incremental, quantized checkpoints of a store "
                       "(docs/checkpoints.md)")
    ks = k.add_subparsers(dest="ckpt", required=True)
    s = ks.add_parser("save", help="write the next checkpoint of the chain under --root "
                      "(a new process starts with a full baseline)")
    s.add_argument("--path", required=True, help="store directory (no process may have it open)")
    s.add_argument("--root", required=True, help="checkpoint root (one chain per root)")
    s.add_argument("--policy", choices=POLICIES, default="intermittent")
    s.add_argument("--bits", default="4", choices=["32", "16", "8", "4", "3", "2", "auto"],
                   help="32 = fp32, 16 = fp16, else quantized; auto: from --expected-restores")
    s.add_argument("--quant", choices=["uniform", "adaptive", "kmeans"], default="adaptive")
    s.add_argument("--expected-restores", type=int, default=None)
    s.add_argument("--state-dtype", choices=["fp32", "fp16"], default="fp32",
                   help="optimizer state precision (never below fp16)")
    s.add_argument("--rebaseline-at", type=float, default=None,
                   help="intermittent: new baseline when the increments hold this fraction of "
                        "the rows a baseline would")
    s.add_argument("--keep", type=int, default=2, help="chains to keep (retention)")
    s.add_argument("--step", type=int, default=None, help="training step to record")
    s.add_argument("--ddr-bytes", type=int, default=1 << 30)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_ckpt_save)
    ls = ks.add_parser("list", help="committed checkpoints under a root, oldest first")
    ls.add_argument("--root", required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_ckpt_list)
    r = ks.add_parser("restore", help="restore a store to a checkpoint (its whole chain); "
                      "verifies first and changes nothing if the chain is corrupt")
    r.add_argument("--path", required=True, help="store directory (no process may have it open)")
    r.add_argument("checkpoint", help="checkpoint directory (<root>/ckpt-NNNNNN)")
    r.add_argument("--ddr-bytes", type=int, default=1 << 30)
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=cmd_ckpt_restore)
    v = ks.add_parser("verify", help="check manifests, parents and every chunk's checksum; "
                      "exit 1 naming each damaged or missing file")
    v.add_argument("checkpoint", nargs="?", help="a checkpoint directory (and its restore set)")
    v.add_argument("--root", help="every checkpoint under this root")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_ckpt_verify)

    c = bench.add_parser("ckpt", help="checkpoints: bytes written/stored per policy and "
                         "bit-width, stall, writer MB/s, quality after restores")
    c.add_argument("--rows", type=int, default=2_000_000)
    c.add_argument("--dim", type=int, default=64)
    c.add_argument("--batch", type=int, default=4096)
    c.add_argument("--pooling", type=int, default=20)
    c.add_argument("--alpha", type=float, default=1.05, help="Zipf exponent of the ids")
    c.add_argument("--steps-between", type=int, default=200, help="steps between checkpoints")
    c.add_argument("--checkpoints", type=int, default=10)
    c.add_argument("--policies", type=_words, default=list(POLICIES))
    c.add_argument("--bits", type=_ints, default=[32, 16, 8, 4, 2])
    c.add_argument("--quant", choices=["uniform", "adaptive", "kmeans"], default="adaptive")
    c.add_argument("--quality-steps", type=int, default=1000,
                   help="steps of the DLRM job of `tierstore train` (restored at the midpoint "
                        "from a checkpoint of each --quality-bits)")
    c.add_argument("--quality-bits", type=_ints, default=[32, 8, 4])
    c.add_argument("--quality-data", default=None,
                   help="the DLRM job's data, as `tierstore train --data` "
                        "(default synthetic:criteo_kaggle,scale=0.01)")
    c.add_argument("--quality-batch", type=int, default=512, help="the DLRM job's batch size")
    c.add_argument("--quality-eval-samples", type=int, default=32_768,
                   help="held-out samples of the final evaluation loss")
    c.add_argument("--recon-rows", type=int, default=200_000)
    c.add_argument("--dram-fraction", type=float, default=1.0)
    c.add_argument("--only", type=_words, default=["bytes", "quality"],
                   help="comma-separated parts: bytes,quality")
    c.add_argument("--workdir", default=None, help="where checkpoints are written (temp dir)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_bench_ckpt)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierstore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    from tierstore.train.command import add_parser as add_train_parser
    add_train_parser(sub)

    d = sub.add_parser("demo", help="run the engine end to end on synthetic data")
    d.add_argument("--steps", type=int, default=300, help="training-like steps per policy")
    d.add_argument("--json", action="store_true", help="print one JSON summary")
    d.set_defaults(fn=cmd_demo)

    s = sub.add_parser("stats", help="per-table and per-tier figures of a running tierstored "
                       "(--run-dir) or of a store directory (--path)")
    s.add_argument("--run-dir", help="run directory of a running tierstored")
    s.add_argument("--path", help="store directory that no process has open")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stats)

    b = sub.add_parser("bench", help="benchmarks (see BENCHMARKS.md)")
    bs = b.add_subparsers(dest="bench", required=True)
    c = bs.add_parser("cache", help="hit rates of cache policies on a trace, via the DRAM tier")
    c.add_argument("--trace", type=_words, required=True,
                   help="comma-separated: a file (one id per line) or zipf:alpha=A,n=N,len=L,seed=S;"
                        " repeat --trace for several zipf specs", action="extend")
    c.add_argument("--capacity", type=_floats, default=[0.01, 0.05, 0.1, 0.25],
                   help="cache sizes as fractions of the trace's distinct ids")
    c.add_argument("--policy", type=_words, default=["lru", "lfu", "adaptive", "belady"])
    c.add_argument("--batch", type=int, default=1, help="ids per policy decision")
    c.add_argument("--jobs", type=int, default=1, help="worker processes")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_bench_cache)
    for name, train in (("lookup", False), ("train", True)):
        x = bs.add_parser(name, help=("pooled forward" if not train else
                                      "forward + backward + row-wise Adagrad") +
                          " vs nn.EmbeddingBag and FBGEMM TBE")
        x.add_argument("--dims", type=_ints, default=[64, 128])
        x.add_argument("--pooling", type=_ints, default=[1, 20])
        x.add_argument("--dist", type=_words, default=["uniform", "zipf:1.05"])
        x.add_argument("--tables", type=_ints, default=None,
                       help="only these table counts of the configs (26 x 100k, 8 x 1M)")
        x.add_argument("--batch", type=int, default=4096)
        x.add_argument("--dram-fraction", type=float, default=0.1 if train else 1.0,
                       help="train: also run tierstore with DRAM holding this fraction")
        x.add_argument("--policy", default="adaptive")
        x.add_argument("--repeats", type=int, default=15)
        x.add_argument("--json", action="store_true")
        x.set_defaults(fn=lambda a, train=train: cmd_bench_lookup(a, train))
    m = bs.add_parser("scm", help="SCM random-row reads vs numpy.memmap; DRAM overhead per row")
    m.add_argument("--rows", type=int, default=1_000_000)
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_bench_scm)
    v = bs.add_parser("service", help="through a running tierstored: forward vs nn.EmbeddingBag, "
                      "training vs the embedded Store, two client processes, 10%% DRAM, idle CPU")
    v.add_argument("--tables", type=int, default=26, help="tables (two: half per process)")
    v.add_argument("--rows", type=int, default=100_000, help="rows per table")
    v.add_argument("--dim", type=int, default=64)
    v.add_argument("--batch", type=int, default=4096)
    v.add_argument("--pooling", type=int, default=20)
    v.add_argument("--dist", default="zipf:1.05", help="uniform or zipf:ALPHA")
    v.add_argument("--repeats", "--steps", type=int, default=15,
                   help="timed steps per median (forward, train, scm)")
    v.add_argument("--batches", type=int, default=16, help="distinct batches steps cycle over")
    v.add_argument("--dram-fraction", type=float, default=0.1,
                   help="scm: DRAM holds this fraction of the rows")
    v.add_argument("--idle-seconds", type=float, default=10.0,
                   help="idle: how long to watch the idle service's CPU time")
    v.add_argument("--seconds", type=float, default=4.0,
                   help="two: wall time of each timing window")
    v.add_argument("--rounds", type=int, default=3,
                   help="two: rounds of (one process alone, two together)")
    v.add_argument("--only", type=_words, default=["forward", "train", "two", "scm", "idle"],
                   help="comma-separated parts: forward,train,two,scm,idle")
    v.add_argument("--json", action="store_true")
    v.set_defaults(fn=cmd_bench_service)
    dl = bs.add_parser("dlrm", help="training DLRM through tierstore: backend parity, samples/s "
                       "vs nn.EmbeddingBag (all DRAM, 10%% DRAM), NE vs planted and logreg")
    dl.add_argument("--only", type=_words, default=["parity", "throughput", "quality"],
                    help="comma-separated parts: parity,throughput,quality")
    dl.add_argument("--steps", type=int, default=2000,
                    help="quality: training steps of each model (batch 512)")
    dl.add_argument("--scale", type=float, default=0.05,
                    help="throughput: synthetic:criteo_kaggle,scale=S (0.05: 1.7M rows)")
    dl.add_argument("--parity-steps", type=int, default=200, help="parity: steps per run")
    dl.add_argument("--rounds", type=int, default=5, help="throughput: timed rounds")
    dl.add_argument("--timed-steps", type=int, default=10,
                    help="throughput: steps per variant per round")
    dl.add_argument("--warmup", type=int, default=20,
                    help="throughput: warm-up steps after the 10%%-DRAM service is full")
    dl.add_argument("--dram-fraction", type=float, default=0.1,
                    help="throughput and quality: DRAM share of the store runs")
    dl.add_argument("--quality-backend", default="tierstored",
                    choices=["torch", "embedded", "tierstored"])
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(fn=cmd_bench_dlrm)

    dt = sub.add_parser("data", help="click data for training (docs/data.md)")
    ds = dt.add_subparsers(dest="data", required=True)
    pr = ds.add_parser("prepare", help="convert a Criteo TSV(.gz) into memory-mappable shards")
    pr.add_argument("src", help="Criteo TSV file, plain or gzip")
    pr.add_argument("out", help="new directory for the prepared dataset")
    pr.add_argument("--shard-rows", type=int, default=1 << 21,
                    help="rows per shard (the last shard is the eval split)")
    pr.add_argument("--strict", action="store_true",
                    help="fail on the first malformed line instead of skipping it")
    pr.add_argument("--json", action="store_true", help="print one JSON summary")
    pr.set_defaults(fn=cmd_data_prepare)
    _add_ckpt_parsers(sub, bs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if getattr(args, "trace", None):
        args.trace = _split_traces(args.trace)
    return args.fn(args)


def _split_traces(parts: list[str]) -> list[str]:
    """Re-join 'zipf:alpha=1,n=2,len=3,seed=4' that the comma split broke apart."""
    out: list[str] = []
    for p in parts:
        if out and out[-1].startswith("zipf:") and "=" in p and ":" not in p and not p.startswith("/"):
            out[-1] += "," + p
        else:
            out.append(p)
    return out


def tierstored(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tierstored`` service: runs in the foreground until SIGTERM/SIGINT
    (exit 0 after writing back every dirty row); configuration errors exit 2."""
    from tierstore.daemon.args import parse
    from tierstore.daemon.config import ConfigError
    from tierstore.daemon.server import serve
    from tierstore.errors import TierstoreError
    try:
        cfg = parse(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"tierstored: {e}", file=sys.stderr)
        return 2
    try:
        serve(cfg)
    except TierstoreError as e:
        print(f"tierstored: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
