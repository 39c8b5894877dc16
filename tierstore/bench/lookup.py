"""`tierstore bench lookup` and `tierstore bench train`: tierstore against nn.EmbeddingBag and
FBGEMM's CPU TBE on the same tables and ids, in one run.

lookup: pooled forward, every row in DRAM.
train:  pooled forward + backward + row-wise Adagrad (FBGEMM EXACT_ROWWISE_ADAGRAD; torch has
        no row-wise Adagrad, so its baseline is nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad),
        with every row in DRAM, and tierstore again with DRAM holding ``--dram-fraction`` of each
        table (rest on SCM, page cache warm).
Times are medians per step (all tables of one batch), steps cycling over ``n_batches`` batches.
tierstore and FBGEMM are held at once and their steps interleaved (one of each per round), with
nn.EmbeddingBag too for lookup; train times torch (3-12x slower; holding it too with its Adagrad
state does not fit 8 x 1M x 128 in this machine's memory) and the DRAM-fraction store after.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import tempfile
from typing import Any, Callable

import torch

import tierstore as ts
from tierstore.tiers import rowfile
from tierstore.bench.common import fbgemm_available, interleaved, median_seconds
from tierstore.bench.workload import Batch, make_batches

CONFIGS = [  # (tables, rows per table)
    (26, 100_000),
    (8, 1_000_000),
]


def _cycle(batches: list[Batch]) -> Callable[[], Batch]:
    it = itertools.cycle(batches)
    return lambda: next(it)


def _tierstore(path: str, T: int, rows: int, dim: int, fraction: float, policy: str) -> ts.Store:
    spec0 = ts.TableSpec("t0", rows, dim, optimizer=ts.RowWiseAdagrad(lr=0.01, eps=1e-8))
    per_row = ts.Store.cached_row_bytes(spec0)
    ddr = int(T * rows * per_row * fraction) + T * per_row
    store = ts.Store(path, ddr_bytes=ddr, policy=policy)
    for t in range(T):
        store.create_table(ts.TableSpec(f"t{t}", rows, dim,
                                        optimizer=ts.RowWiseAdagrad(lr=0.01, eps=1e-8)))
    return store


def _fbgemm(T: int, rows: int, dim: int):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (EmbeddingLocation,
                                                                      PoolingMode)
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, OptimType, SplitTableBatchedEmbeddingBagsCodegen)
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, eps=1e-8,
        pooling_mode=PoolingMode.SUM)


def _fbgemm_input(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.cat(b.indices)
    n = [len(i) for i in b.indices]
    parts, base = [], 0
    for t, off in enumerate(b.offsets):
        parts.append(off[:-1] + base if t < len(b.offsets) - 1 else off + base)
        base += n[t]
    return idx, torch.cat(parts)


def _settle_machine() -> None:
    """Start a configuration from what the previous one left: the memory it freed handed
    back to the kernel (glibc keeps freed heap pages: 2.5-3 GB after a 26 x 100k
    configuration's torch baseline, which lowers MemAvailable and with it the kernel's dirty
    threshold that picks the 10% store's write path) and its deleted files' disk work done.
    Measured on 8 x 1M x 64 pooling 20 Zipf run after the 26 x 100k configurations: 10% DRAM
    steps 60.0 ms without this, 53.3 ms with it; 48.4 ms run first in a process."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)
    os.sync()


def bench_config(T: int, rows: int, dim: int, pooling: int, dist: str, batch_size: int,
                 train: bool, dram_fraction: float, policy: str, n_batches: int,
                 repeats: int) -> dict[str, Any]:
    _settle_machine()
    batches = make_batches(T, rows, batch_size, pooling, dist, n_batches, seed=dim + pooling)
    grad = torch.randn(batch_size, dim)
    res: dict[str, Any] = {"tables": T, "rows": rows, "dim": dim, "pooling": pooling,
                           "dist": dist, "batch": batch_size}
    if not train:
        res.update(_lookup_interleaved(T, rows, dim, batches, repeats))
        return res
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
        res.update(_train_vs_fbgemm(f"{d}/all", T, rows, dim, batches, grad, policy, repeats))
        if dram_fraction < 1.0:
            res.update(_train_fraction(f"{d}/part", T, rows, dim, batches, grad, dram_fraction,
                                       policy, repeats))
    res.update(_torch_baseline(T, rows, dim, batches, grad, train, n_batches, repeats))
    return res


def _train_step(store: ts.Store, T: int, batches: list[Batch],
                grad: torch.Tensor) -> Callable[[int], None]:
    """Step i: forward + fused backward of batch i (cycling) over every table, each table's
    backward followed by the prefetch of its batch i + 1 (a no-op on tables held whole)."""
    def step(i: int) -> None:
        b = batches[i % len(batches)]
        nxt = batches[(i + 1) % len(batches)]
        for t in range(T):
            store.pooled(f"t{t}", b.indices[t], b.offsets[t], include_last_offset=True)
            store.apply_pooled_gradients(f"t{t}", b.indices[t], b.offsets[t], grad,
                                         include_last_offset=True)
            store.prefetch(f"t{t}", nxt.indices[t])
    return step


def _train_vs_fbgemm(path: str, T: int, rows: int, dim: int, batches: list[Batch],
                     grad: torch.Tensor, policy: str, repeats: int) -> dict[str, float]:
    """Training steps of tierstore (every row in DRAM) and FBGEMM's TBE (when installed), held
    at once and interleaved (one step of each per round; medians of seconds per step)."""
    store = _tierstore(path, T, rows, dim, 1.0, policy)
    fns: dict[str, Callable[[int], object]] = {"tierstore": _train_step(store, T, batches, grad)}
    if fbgemm_available():
        fns["fbgemm_tbe"] = _fbgemm_train_step(T, rows, dim, batches, grad)
    for i in range(len(batches)):  # warm: load the rows, page in the tables, compile
        for fn in fns.values():
            fn(i)
    out = interleaved(fns, repeats)
    store.close()
    # Free the TBE (its tables and optimizer state, GBs at 8 x 1M) before the next measurement:
    # kept alive, it lowers the kernel's dirty threshold, which decides how the 10%-DRAM
    # store writes its row files (tiers/rowfile.py), and measures that store in a machine
    # with less free memory than the job it stands for.
    fns.clear()
    del store, fns
    gc.collect()
    return out


def _fbgemm_train_step(T: int, rows: int, dim: int, batches: list[Batch],
                       grad: torch.Tensor) -> Callable[[int], None]:
    """Step i of FBGEMM's TBE (EXACT_ROWWISE_ADAGRAD) on batch i: forward + backward."""
    tbe = _fbgemm(T, rows, dim)
    inputs = [_fbgemm_input(b) for b in batches]
    g = grad.repeat(1, T)

    def fb_step(i: int) -> None:
        tbe(*inputs[i % len(inputs)]).backward(g)
    return fb_step


def _train_fraction(path: str, T: int, rows: int, dim: int, batches: list[Batch],
                    grad: torch.Tensor, fraction: float, policy: str,
                    repeats: int) -> dict[str, float]:
    """Training steps of tierstore with DRAM for ``fraction`` of each table (rest on SCM, page
    cache warm after one pass over the batches), and the hit rate over the timed steps."""
    store = _tierstore(path, T, rows, dim, fraction, policy)
    step = _train_step(store, T, batches, grad)
    for i in range(len(batches)):
        step(i)
    before = store.stats()["tables"]
    written = dict(rowfile.WRITTEN_ROWS)
    key = f"tierstore_dram_{fraction:g}"
    out = {key: interleaved({key: step}, repeats)[key]}
    # rows written per path by the timed steps (a write still running is not counted yet)
    out[key + "_scm_writes"] = {k: rowfile.WRITTEN_ROWS[k] - written[k] for k in written}
    st = store.stats()["tables"]
    out[key + "_hit_rate"] = (sum(st[n]["hits"] - before[n]["hits"] for n in st)
                              / sum(st[n]["lookups"] - before[n]["lookups"] for n in st))
    store.close()
    del store
    gc.collect()
    return out


def _lookup_interleaved(T: int, rows: int, dim: int, batches: list[Batch],
                        repeats: int) -> dict[str, float]:
    """Forward only: tierstore (every row in DRAM), nn.EmbeddingBag and FBGEMM's TBE (when
    installed) held at once and timed one step of each per round, so load from other processes
    hits all alike (medians of seconds per step)."""
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
        store = _tierstore(f"{d}/s", T, rows, dim, 1.0, "adaptive")
        bags = [torch.nn.EmbeddingBag(rows, dim, mode="sum") for _ in range(T)]
        fns: dict[str, Callable[[int], object]] = {}

        def ts_step(i: int) -> None:
            b = batches[i % len(batches)]
            for t in range(T):
                store.pooled(f"t{t}", b.indices[t], b.offsets[t], include_last_offset=True)

        def eb_step(i: int) -> None:
            b = batches[i % len(batches)]
            with torch.no_grad():
                for t in range(T):
                    bags[t](b.indices[t], b.torch_offsets[t])
        fns = {"tierstore": ts_step, "torch_embeddingbag": eb_step}
        if fbgemm_available():
            tbe = _fbgemm(T, rows, dim)
            inputs = [_fbgemm_input(b) for b in batches]

            def fb_step(i: int) -> None:
                with torch.no_grad():
                    tbe(*inputs[i % len(inputs)])
            fns["fbgemm_tbe"] = fb_step
        for i in range(len(batches)):  # warm: page in every table, compile
            for fn in fns.values():
                fn(i)
        out = interleaved(fns, repeats)
        store.close()
    return out


def _torch_baseline(T, rows, dim, batches, grad, train, n_batches, repeats) -> dict[str, float]:
    bags = [torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=train) for _ in range(T)]
    opt = torch.optim.Adagrad([b.weight for b in bags], lr=0.01, eps=1e-8) if train else None
    nxt = _cycle(batches)

    def step() -> None:
        b = nxt()
        if train:
            opt.zero_grad()
            outs = [bags[t](b.indices[t], b.torch_offsets[t]) for t in range(T)]
            torch.autograd.backward(outs, [grad] * T)
            opt.step()
        else:
            with torch.no_grad():
                for t in range(T):
                    bags[t](b.indices[t], b.torch_offsets[t])
    out = {"torch_embeddingbag": median_seconds(step, repeats=repeats if not train else
                                                max(3, repeats // 3), warmup=1)}
    del bags, opt
    gc.collect()
    return out


def run(train: bool, dims=(64, 128), poolings=(1, 20), dists=("uniform", "zipf:1.05"),
        configs=CONFIGS, batch_size: int = 4096, dram_fraction: float = 0.1,
        policy: str = "adaptive", n_batches: int | None = None, repeats: int = 15,
        progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm
    torch.manual_seed(0)
    if n_batches is None:  # training streams more distinct batches so the cache really churns
        n_batches = 16 if train else 4
    cells = list(itertools.product(configs, dims, poolings, dists))
    out = []
    for (T, rows), dim, pooling, dist in tqdm(cells, desc="bench train" if train else
                                              "bench lookup", disable=not progress):
        r = bench_config(T, rows, dim, pooling, dist, batch_size, train, dram_fraction, policy,
                         n_batches, repeats)
        r["speedup_vs_torch"] = r["torch_embeddingbag"] / r["tierstore"]
        if "fbgemm_tbe" in r:
            r["speedup_vs_fbgemm"] = r["fbgemm_tbe"] / r["tierstore"]
        key = f"tierstore_dram_{dram_fraction:g}"
        if key in r:
            r["dram_fraction_rate_ratio"] = r["tierstore"] / r[key]
        out.append(r)
    return {"mode": "train" if train else "lookup", "results": out}


def _write_paths(counts: dict[str, int] | None) -> str:
    """How the timed 10% steps wrote their row files: "mapping", "pwrite" or both."""
    if not counts:
        return "n/a"
    used = [k for k in ("mapping", "pwrite") if counts.get(k)]
    return " + ".join(used) if used else "none"


def table(results: dict[str, Any]) -> str:
    train = results["mode"] == "train"
    head = ["tables x rows", "dim", "pool", "ids", "tierstore ms", "nn.EmbeddingBag ms",
            "FBGEMM ms", "vs torch", "vs FBGEMM"]
    if train:
        head += ["10% DRAM ms", "hit rate", "10%/all rate", "SCM writes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["results"]:
        ms = lambda k: f"{1e3 * r[k]:.2f}" if k in r else "n/a"  # noqa: E731
        cells = [f"{r['tables']} x {r['rows']:,}", str(r["dim"]), str(r["pooling"]), r["dist"],
                 ms("tierstore"), ms("torch_embeddingbag"), ms("fbgemm_tbe"),
                 f"{r['speedup_vs_torch']:.2f}x",
                 f"{r['speedup_vs_fbgemm']:.2f}x" if "speedup_vs_fbgemm" in r else "n/a"]
        if train:
            k = next((k for k in r if k.startswith("tierstore_dram_")
                      and not k.endswith(("rate", "writes"))), None)
            cells += [ms(k) if k else "n/a", f"{r[k + '_hit_rate']:.3f}" if k else "n/a",
                      f"{r['dram_fraction_rate_ratio']:.2f}x" if k else "n/a",
                      _write_paths(r.get(f"{k}_scm_writes")) if k else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
