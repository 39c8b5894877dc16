"""`tierstore bench ckpt`: incremental, quantized checkpoints (Check-N-Run) on a training job.

Workload (issue 4): one table of ``rows`` x ``dim`` (2M x 64), row-wise Adagrad, Zipf(1.05)
batches of ``batch`` bags x ``pooling`` ids (4096 x 20), a checkpoint every ``steps_between``
steps (200), ``checkpoints`` checkpoints (10). Every step is a pooled forward and the fused
backward with a random gradient of the pooled output.

Parts:

- **bytes**: every configuration (policy x bit-width, adaptive quantization below 16 bits)
  checkpoints the same store state into its own root at each checkpoint point, so all see the
  same training. The measured (default) configuration takes the store's own modified-row
  record; the others replay the rows the benchmark saw updated since the previous point
  (every id of a batch gets an update), with synchronous reads shared between them. Reported:
  bytes written over the checkpoints per configuration against ``full`` at fp32 (10 full fp32
  checkpoints), and bytes a restore of the newest checkpoint reads (its restore set) against
  the newest full fp32 checkpoint.
- **stall / writer**: the default configuration (intermittent, 4-bit adaptive, copy-on-write
  snapshot) is taken last, asynchronously, as a training loop would. The stall is everything
  the loop waits for at a checkpoint: the previous write if it has not finished when the
  steps between checkpoints are done (the loop's ``checkpoint()`` would wait for it) plus the
  time ``checkpoint()`` takes to return; against the median step outside writes. What the
  training thread pays later is reported beside it: the steps that overlap a write (they copy
  the rows they change first), the first step after each checkpoint, the rows copied on
  write. The writer's throughput is fp32 input bytes (weights as fp32 + optimizer state) per
  second of the writer thread's CPU time (one core) and per second of wall time.
- **quality**: the DLRM job of ``tierstore train`` (``quality_data``, embedded store with
  every row in DRAM, Shampoo on the dense layers, row-wise Adagrad on the tables, batch 512,
  one torch thread: deterministic) trained ``quality_steps`` steps never restored; and
  restored at the midpoint into a fresh store from a checkpoint at each of ``quality_bits``
  (rows quantized, optimizer state fp32, dense and optimizer state and reader position
  alongside; 32 is the control: it must match exactly), then trained to the end. Reported:
  final evaluation log loss (``quality_eval_samples`` held-out samples) and its relative
  change against the never-restored run.
- **reconstruction**: mean relative L2 error per row (``quant.reconstruction_error``) of every
  scheme on up to ``recon_rows`` trained rows of the workload table and of the DLRM tables.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch

import tierstore as ts
from tierstore import ckpt, quant
from tierstore.bench.common import environment
from tierstore.bench.workload import id_sampler

DEFAULT = ("intermittent", 4)
TARGETS = {"bytes_written_ratio": 6.0, "stored_ratio": 2.5, "stall_steps": 1.0,
           "writer_mb_s": 200.0, "quality_8bit": 1e-4, "quality_4bit": 5e-4}


class _Replay:
    """What checkpoint() sees of the store: the same tables and rows, with the rows modified
    since the previous point taken once for every configuration. Configurations that read the
    same rows at one point share one read (``cache``; the default configuration, whose stall
    is measured, reads for itself)."""

    def __init__(self, store: ts.Store, cache: dict | None) -> None:
        self.store = store
        self.cache = cache
        self.mods: dict[str, np.ndarray] = {}

    def tables(self) -> list[str]:
        return self.store.tables()

    @property
    def snapshot_rows(self):
        """Copy-on-write snapshots for the measured (default) configuration; the others share
        synchronous reads."""
        return self.store.snapshot_rows if self.cache is None else None

    def open_table(self, name: str) -> Any:
        return self.store.open_table(name)

    def take_modified(self, name: str, deferred: bool = False) -> Any:
        """The measured configuration takes the store's own record (deferred: in its
        writer thread); the others replay the rows the benchmark saw updated."""
        if self.cache is None:
            return self.store.take_modified(name, deferred=deferred)
        return self.mods.pop(name, np.empty(0, np.int64))

    def written_rows(self, name: str) -> np.ndarray:
        return self.store.written_rows(name)

    def read_rows(self, name: str, rows: Any) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is None:
            return self.store.read_rows(name, rows)
        key = (name, len(rows), hash(np.asarray(rows).tobytes()))
        hit = self.cache.get(key)
        if hit is None or not np.array_equal(hit[0], rows):
            hit = self.cache[key] = (np.array(rows), *self.store.read_rows(name, rows))
        return hit[1], hit[2]


def _config_name(policy: str, bits: int, kind: str) -> str:
    return f"{policy}/{quant.Scheme.parse(bits, kind if bits < 16 else 'none').name}"


def _store(path: str, name: str, rows: int, dim: int, fraction: float, lr: float) -> ts.Store:
    spec = ts.TableSpec(name, rows, dim, optimizer=ts.RowWiseAdagrad(lr=lr, eps=1e-8), seed=1)
    per_row = ts.Store.cached_row_bytes(spec)
    store = ts.Store(path, ddr_bytes=max(1 << 20, int(rows * fraction * per_row) + per_row))
    store.create_table(spec)
    return store


def run_bytes(work: str, rows: int, dim: int, batch: int, pooling: int, alpha: float,
              steps_between: int, checkpoints: int, policies: list[str], bits: list[int],
              quant_kind: str, fraction: float, progress: bool,
              recon_rows: int = 0) -> dict[str, Any]:
    from tqdm import tqdm
    from tierstore.ckpt import kernels as ck
    store = _store(os.path.join(work, "store"), "t", rows, dim, fraction, 0.05)
    rng = np.random.default_rng(0)
    draw = id_sampler(f"zipf:{alpha}", rows, 1, rng)
    offsets = torch.arange(0, batch * pooling, pooling, dtype=torch.int64)
    configs = [(p, b) for p in policies for b in bits]
    if ("full", 32) not in configs:
        configs.insert(0, ("full", 32))
    if DEFAULT not in configs:
        configs.append(DEFAULT)
    configs.remove(DEFAULT)
    configs.append(DEFAULT)  # the default goes last, asynchronously, like a training loop
    shared: dict = {}  # reads of this point, shared by the configurations
    proxies = {c: _Replay(store, None if c == DEFAULT else shared) for c in configs}
    names = {c: _config_name(c[0], c[1], quant_kind) for c in configs}
    roots = {c: os.path.join(work, names[c].replace("/", "_")) for c in configs}
    written = {c: [] for c in configs}
    kinds = {c: [] for c in configs}
    newest_restore = {}
    step_times, overlap_times, after_times = [], [], []
    stalls, waits, writer, handles = [], [], [], []
    touched = np.zeros(rows, dtype=np.uint8)  # the replay's record of the rows updated
    handle = None
    bar = tqdm(total=steps_between * checkpoints, desc="train+checkpoint", disable=not progress,
               leave=False)

    def step() -> float:
        ids = torch.from_numpy(draw(0, batch * pooling))
        t = time.perf_counter()
        store.pooled("t", ids, offsets)
        store.apply_pooled_gradients("t", ids, offsets, torch.randn(batch, dim) * 0.1)
        dt = time.perf_counter() - t
        ck.mark(touched, ids.numpy())  # every id of a batch gets an update (not timed)
        bar.update(1)
        return dt

    for point in range(checkpoints):
        for i in range(steps_between):
            dt = step()
            if i == 0 and handle is not None:
                after_times.append(dt)  # the first step after a checkpoint returned
            if handle is not None and not handle.done():
                overlap_times.append(dt)
            else:
                step_times.append(dt)
        wait_s = 0.0
        if handle is not None:
            # what the loop's next checkpoint() waits for: the previous write, if unfinished
            t0 = time.perf_counter()
            handle.wait()
            wait_s = time.perf_counter() - t0
            waits.append(wait_s)
        mods = ck.rows_of(touched)
        touched[:] = 0
        for c in configs:
            if c == DEFAULT:
                shared.clear()  # the others' reads are done: free them before training on
                t1 = time.perf_counter()
                handle = ckpt.checkpoint(proxies[c], roots[c], c[0], c[1], quant_kind, keep=1,
                                         step=(point + 1) * steps_between)
                stalls.append(wait_s + time.perf_counter() - t1)
                handles.append(handle)
            else:
                proxies[c].mods = {"t": mods}
                man = ckpt.checkpoint(proxies[c], roots[c], c[0], c[1], quant_kind, keep=1,
                                      wait=True).wait()
                written[c].append(man["bytes"])
                kinds[c].append(man["kind"])
    shared.clear()
    handle.wait()
    bar.close()
    for h in handles:
        man = h.wait()
        writer.append(h.stats)
        written[DEFAULT].append(man["bytes"])
        kinds[DEFAULT].append(man["kind"])
    parts = [h.snapshot for h in handles]
    for c in configs:
        newest = ckpt.list_checkpoints(roots[c])[-1]
        newest_restore[c] = newest["restore_bytes"]
    full32 = ("full", 32)
    ref_written = sum(written[full32])
    ref_stored = written[full32][-1]
    step_s = statistics.median(step_times)
    wr_in = sum(w["input_bytes"] for w in writer)
    med = statistics.median
    out = {
        "configs": {names[c]: {
            "policy": c[0], "bits": c[1], "kinds": kinds[c], "bytes_written": sum(written[c]),
            "bytes_per_checkpoint": written[c],
            "written_ratio_vs_full_fp32": ref_written / max(1, sum(written[c])),
            "newest_restore_bytes": newest_restore[c],
            "stored_ratio_vs_full_fp32": ref_stored / max(1, newest_restore[c]),
        } for c in configs},
        "default": names[DEFAULT],
        "full_fp32_bytes_written": ref_written,
        "full_fp32_newest_bytes": ref_stored,
        "step_s": step_s,
        "step_s_max": max(step_times),
        "step_s_during_write": med(overlap_times) if overlap_times else None,
        "step_s_during_write_mean": float(np.mean(overlap_times)) if overlap_times else None,
        "step_s_during_write_max": max(overlap_times) if overlap_times else None,
        "steps_during_write": len(overlap_times),
        "first_step_after_checkpoint_s": after_times,
        "first_step_after_checkpoint_median_s": med(after_times) if after_times else None,
        "write_wait_s": waits,
        "stall_s": stalls,
        "stall_median_s": med(stalls),
        "stall_max_s": max(stalls),
        "stall_parts_median_s": {k: med(p[k] for p in parts)
                                 for k in ("take_modified_s", "decide_s", "read_rows_s")},
        "writer_thread_parts_median_s": {k: med(p.get(k, 0.0) for p in parts)
                                         for k in ("writer_take_modified_s",
                                                   "writer_decide_s", "writer_fix_s")},
        "snapshot_mode": parts[-1]["mode"],
        "snapshot_rows": [p["rows"] for p in parts],
        "rows_copied_on_write": [w.get("rows_copied_on_write", 0) for w in writer],
        "stall_median_in_steps": med(stalls) / step_s,
        "stall_max_in_steps": max(stalls) / step_s,
        "writer": {"input_mb": wr_in / 1e6,
                   "cpu_s": sum(w["write_cpu_s"] for w in writer),
                   "wall_s": sum(w["write_s"] for w in writer),
                   "mb_per_s_cpu": wr_in / 1e6 / max(1e-9, sum(w["write_cpu_s"] for w in writer)),
                   "mb_per_s_wall": wr_in / 1e6 / max(1e-9, sum(w["write_s"] for w in writer))},
        "written_rows_final": int(len(store.written_rows("t"))),
    }
    if recon_rows:
        trained = store.written_rows("t")
        sample = np.sort(np.random.default_rng(0).permutation(trained)[:recon_rows])
        out["reconstruction"] = reconstruction(store.read_rows("t", sample)[0]
                                               .astype(np.float32))
    store.close()
    return out


# -- quality ---------------------------------------------------------------------------------

QUALITY_DATA = "synthetic:criteo_kaggle,scale=0.01"


def _dlrm_config(work: str, tag: str, data: str, steps: int, batch: int, eval_samples: int,
                 resume: str | None = None) -> Any:
    from tierstore.train.config import TrainConfig
    return TrainConfig(model="dlrm", data=data, backend="embedded",
                       store_dir=os.path.join(work, f"dlrm-{tag}"), dram_fraction=1.0,
                       steps=steps, time_limit=None, batch_size=batch,
                       eval_samples=eval_samples, resume=resume, seed=0)


def run_quality(work: str, steps: int, bits: list[int], quant_kind: str, recon_rows: int,
                progress: bool, data: str = QUALITY_DATA, batch: int = 512,
                eval_samples: int = 32_768) -> dict[str, Any]:
    """The DLRM job of ``tierstore train`` (embedded store, every row in DRAM, Shampoo on
    the dense layers, row-wise Adagrad on the tables, one torch thread: deterministic) trained
    ``steps`` steps never restored, and restored at the midpoint from a checkpoint at each of
    ``bits`` (rows at that bit-width with ``quant_kind``, optimizer state fp32, dense state and
    reader position alongside) into a fresh store and trained to the end. 32 is the control:
    an exact restore must change nothing."""
    from tqdm import tqdm
    from tierstore.train.loop import Run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: runs comparable bit for bit
    mid = steps // 2
    bar = tqdm(total=steps + (steps - mid) * len(bits), desc="quality (dlrm)",
               disable=not progress, leave=False)
    try:
        run = Run(_dlrm_config(work, "base", data, steps, batch, eval_samples))
        try:
            for _ in range(mid):
                run.train_step()
                bar.update(1)
            paths = {}
            for b in bits:  # each its own chain: a baseline of the same state
                paths[b] = run.backend.checkpoint(os.path.join(work, f"dlrm-q{b}"), run.step,
                                                  run.dense_state(), run.reader.state_dict(), b)
                run.backend.wait_checkpoints()
            initial = run.evaluate()["logloss"]
            while run.step < steps:
                run.train_step()
                bar.update(1)
            base = run.evaluate()["logloss"]
            store = run.backend.conn
            sample = []
            for t in store.tables():  # trained rows of every table, for the error table
                w = store.read_rows(t, store.written_rows(t))[0]
                sample.append(w.astype(np.float32))
            trained = np.concatenate(sample)
            tables = len(store.tables())
            table_rows = int(sum(run.rows))
        finally:
            run.close()
        out: dict[str, Any] = {
            "job": "dlrm", "data": data, "tables": tables, "rows": table_rows,
            "batch": batch, "steps": steps, "restored_at": mid, "eval_samples": eval_samples,
            "eval_loss_at_midpoint": initial, "eval_loss_never_restored": base, "by_bits": {}}
        for b in bits:
            r = Run(_dlrm_config(work, f"r{b}", data, steps, batch, eval_samples,
                                 resume=paths[b]))
            try:
                assert r.step == mid, (r.step, mid)
                while r.step < steps:
                    r.train_step()
                    bar.update(1)
                loss = r.evaluate()["logloss"]
            finally:
                r.close()
            out["by_bits"][str(b)] = {"scheme": _config_name("", b, quant_kind)[1:],
                                      "eval_loss": loss, "rel_change": abs(loss - base) / base}
        bar.close()
    finally:
        torch.set_num_threads(threads)
    sample = trained[np.random.default_rng(0).permutation(len(trained))[:recon_rows]]
    out["reconstruction"] = reconstruction(sample)
    out["reconstruction_rows"] = f"{len(sample):,} trained DLRM rows of dim {sample.shape[1]}"
    return out


def reconstruction(rows: np.ndarray, kmeans_rows: int = 5000) -> dict[str, float]:
    """Mean relative L2 error per row of every scheme (k-means on the first rows only)."""
    out = {"fp16": quant.reconstruction_error(rows, quant.Scheme.parse(16, "none"))}
    for kind in quant.QUANTS:
        for b in quant.QUANT_BITS:
            x = rows[:kmeans_rows] if kind == "kmeans" else rows
            out[f"{kind}{b}"] = quant.reconstruction_error(x, quant.Scheme.parse(b, kind))
    return out


# -- the whole benchmark ---------------------------------------------------------------------

def run(rows: int = 2_000_000, dim: int = 64, batch: int = 4096, pooling: int = 20,
        alpha: float = 1.05, steps_between: int = 200, checkpoints: int = 10,
        policies: tuple[str, ...] = ckpt.POLICIES, bits: tuple[int, ...] = (32, 16, 8, 4, 2),
        quant_kind: str = "adaptive", quality_steps: int = 1000,
        quality_bits: tuple[int, ...] = (32, 8, 4), recon_rows: int = 200_000,
        dram_fraction: float = 1.0, only: tuple[str, ...] = ("bytes", "quality"),
        workdir: str | None = None, progress: bool = True,
        quality_data: str = QUALITY_DATA, quality_batch: int = 512,
        quality_eval_samples: int = 32_768) -> dict[str, Any]:
    """The whole benchmark (see the module docstring); ``only`` picks parts."""
    for p in policies:
        if p not in ckpt.POLICIES:
            raise ValueError(f"unknown policy {p!r}; valid: {', '.join(ckpt.POLICIES)}")
    for b in list(bits) + list(quality_bits):
        quant.Scheme.parse(b, quant_kind if b < 16 else "none")
    work = tempfile.mkdtemp(prefix="tierstore-bench-ckpt-", dir=workdir)
    started = time.time()
    res: dict[str, Any] = {
        "workload": {"rows": rows, "dim": dim, "batch": batch, "pooling": pooling,
                     "dist": f"zipf:{alpha}", "optimizer": "rowwise_adagrad",
                     "steps_between": steps_between, "checkpoints": checkpoints,
                     "quant": quant_kind, "dram_fraction": dram_fraction},
        "targets": TARGETS}
    try:
        if "bytes" in only:
            res["bytes"] = run_bytes(work, rows, dim, batch, pooling, alpha, steps_between,
                                     checkpoints, list(policies), list(bits), quant_kind,
                                     dram_fraction, progress, recon_rows)
        if "quality" in only:
            res["quality"] = run_quality(work, quality_steps, list(quality_bits), quant_kind,
                                         recon_rows, progress, quality_data, quality_batch,
                                         quality_eval_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["checks"] = checks(res)
    res["environment"] = environment()
    res["seconds"] = round(time.time() - started, 1)
    return res


def checks(res: dict[str, Any]) -> dict[str, Any]:
    """Each target of issue 4 against the measured value (reported, never asserted)."""
    out: dict[str, Any] = {}
    b = res.get("bytes")
    if b:
        d = b["configs"][b["default"]]
        out["bytes_written_ratio"] = {"value": d["written_ratio_vs_full_fp32"],
                                      "target": f">= {TARGETS['bytes_written_ratio']}"}
        out["stored_ratio"] = {"value": d["stored_ratio_vs_full_fp32"],
                               "target": f">= {TARGETS['stored_ratio']}"}
        out["stall_in_steps"] = {"value": b["stall_median_in_steps"],
                                 "target": f"<= {TARGETS['stall_steps']}"}
        out["stall_max_in_steps"] = {"value": b["stall_max_in_steps"],
                                     "target": f"<= {TARGETS['stall_steps']}"}
        out["writer_mb_s_one_core"] = {"value": b["writer"]["mb_per_s_cpu"],
                                       "target": f">= {TARGETS['writer_mb_s']}"}
    q = res.get("quality")
    if q:
        for bits, key in (("8", "quality_8bit"), ("4", "quality_4bit")):
            if bits in q["by_bits"]:
                out[f"quality_{bits}bit_rel_change"] = {"value": q["by_bits"][bits]["rel_change"],
                                                        "target": f"<= {TARGETS[key]}"}
    for where, part in (("table", b), ("dlrm", q)):
        r = (part or {}).get("reconstruction")
        if r:
            out[f"adaptive_beats_uniform_{where}"] = {
                bb: r[f"adaptive{bb}"] < r[f"uniform{bb}"] for bb in quant.QUANT_BITS}
    for v in out.values():
        if "target" in v:
            op, t = v["target"].split()
            v["met"] = v["value"] >= float(t) if op == ">=" else v["value"] <= float(t)
    return out


def table(res: dict[str, Any]) -> str:
    lines = []
    w = res["workload"]
    lines.append(f"# checkpoints: {w['rows']:,} x {w['dim']} rows, {w['batch']} x {w['pooling']} "
                 f"{w['dist']}, every {w['steps_between']} steps, {w['checkpoints']} checkpoints")
    b = res.get("bytes")
    if b:
        lines.append(f"{'config':<24}{'written MB':>12}{'vs full fp32':>14}{'newest MB':>11}"
                     f"{'vs full fp32':>14}  kinds")
        for name, c in b["configs"].items():
            ks = "".join({"full": "F", "cumulative": "c", "delta": "d"}[k] for k in c["kinds"])
            lines.append(f"{name:<24}{c['bytes_written'] / 1e6:>12.1f}"
                         f"{c['written_ratio_vs_full_fp32']:>13.1f}x"
                         f"{c['newest_restore_bytes'] / 1e6:>11.1f}"
                         f"{c['stored_ratio_vs_full_fp32']:>13.1f}x  {ks}")
        lines.append(f"step {b['step_s'] * 1e3:.1f} ms; stall per checkpoint ({b['snapshot_mode']}"
                     f" snapshot; includes waiting for the previous write) median "
                     f"{b['stall_median_s'] * 1e3:.2f} ms ({b['stall_median_in_steps']:.2f} "
                     f"steps), max {b['stall_max_s'] * 1e3:.2f} ms "
                     f"({b['stall_max_in_steps']:.2f} steps); previous write unfinished at "
                     f"{sum(x > 0.0005 for x in b['write_wait_s'])} of "
                     f"{len(b['write_wait_s'])} checkpoints")
        sp = b["stall_parts_median_s"]
        wp = b["writer_thread_parts_median_s"]
        lines.append(f"  stall parts (median): take_modified {sp['take_modified_s'] * 1e3:.2f} "
                     f"ms, policy {sp['decide_s'] * 1e3:.2f} ms, read_rows "
                     f"{sp['read_rows_s'] * 1e3:.2f} ms; in the writer thread: enumerate the "
                     f"taken record {wp['writer_take_modified_s'] * 1e3:.1f} ms, policy "
                     f"{wp['writer_decide_s'] * 1e3:.1f} ms, fix the snapshot "
                     f"{wp['writer_fix_s'] * 1e3:.1f} ms for "
                     f"{statistics.median(b['snapshot_rows']):,.0f} rows")
        if b["step_s_during_write"] is not None:
            lines.append(f"  steps while a write runs ({b['steps_during_write']}): median "
                         f"{b['step_s_during_write'] * 1e3:.1f} ms, mean "
                         f"{b['step_s_during_write_mean'] * 1e3:.1f} ms, max "
                         f"{b['step_s_during_write_max'] * 1e3:.1f} ms (other steps max "
                         f"{b['step_s_max'] * 1e3:.1f} ms); first step after a checkpoint "
                         f"median {b['first_step_after_checkpoint_median_s'] * 1e3:.1f} ms; "
                         f"rows copied on write per checkpoint median "
                         f"{statistics.median(b['rows_copied_on_write']):,.0f}")
        wr = b["writer"]
        lines.append(f"writer: {wr['input_mb']:.0f} MB fp32 input, {wr['mb_per_s_cpu']:.0f} MB/s "
                     f"per core (thread CPU time), {wr['mb_per_s_wall']:.0f} MB/s wall")
        if b.get("reconstruction"):
            lines.append("reconstruction error of the table's trained rows (mean relative L2 "
                         "per row): " + ", ".join(f"{k} {v:.4f}"
                                                  for k, v in b["reconstruction"].items()))
    q = res.get("quality")
    if q:
        lines.append(f"quality: DLRM ({q['data']}, {q['tables']} tables, {q['rows']:,} rows, "
                     f"batch {q['batch']}), eval loss never restored "
                     f"{q['eval_loss_never_restored']:.6f} ({q['steps']} steps, restores at "
                     f"{q['restored_at']})")
        for bits, r in q["by_bits"].items():
            lines.append(f"  restored from {r['scheme']:<10} eval loss {r['eval_loss']:.6f}  "
                         f"relative change {r['rel_change'] * 100:.5f}%")
        lines.append(f"reconstruction error of {q['reconstruction_rows']} (mean relative L2 "
                     f"per row): " + ", ".join(f"{k} {v:.4f}"
                                               for k, v in q["reconstruction"].items()))
    for k, v in res.get("checks", {}).items():
        if "met" in v:
            lines.append(f"{k}: {v['value']:.4g} (target {v['target']}) "
                         f"{'met' if v['met'] else 'NOT met'}")
        elif k.startswith("adaptive_beats_uniform"):
            lines.append(f"{k}: " + ", ".join(f"{bb} bits {'yes' if ok else 'NO'}"
                                              for bb, ok in v.items()))
    return "\n".join(lines)
