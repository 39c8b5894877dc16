"""`tierstore bench dlrm`: training DLRM through tierstore (issue 6, "Numbers to reach").

Every run is ``tierstore train``'s own code (:mod:`tierstore.train`); every process runs with
one thread (``torch.set_num_threads(1)`` here, ``OMP_NUM_THREADS=1`` for the private
``tierstored`` each store run starts). Data is the synthetic generator, so the planted model's
loss is known.

parity      Same seed, data (``parity_data``, default ``synthetic:small``) and optimizers (dense
            ``torch.optim.Adagrad``, deterministic; sparse SGD, then row-wise Adagrad): the
            training loss of every step of ``parity_steps`` steps (``train_loss`` with
            ``log_every=1``) of the ``torch``, ``embedded`` and ``tierstored`` backends (the store
            backends with DRAM for ``parity_dram_fraction`` of the rows, so some rows go through
            SCM). Reported per optimizer and backend pair: max over steps of
            ``|loss_a - loss_b| / |loss_a|``; also each run's evaluation NE.      target < 1e-5
throughput  Samples/s of DLRM (26 tables of ``synthetic:criteo_kaggle,scale=S``, dim 64,
            batch 2048, bottom/top MLP as ``tierstore train``'s defaults, dense Adagrad) built
            from the pieces of :class:`tierstore.train.loop.Run`. Variants, all in this process
            at once, each with its own reader over the same stream:
              torch_rowwise    ``--backend torch``: nn.EmbeddingBag(sparse=True) + the reference
                               row-wise Adagrad update (what ``tierstore train`` runs)
              torch_adagrad    nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad (element-wise
                               state): the issue's baseline
              tierstored_dram  a private tierstored whose DRAM holds every row, row-wise Adagrad
              tierstored_scm   a private tierstored whose DRAM holds ``dram_fraction`` of the rows,
                               the rest on SCM row files
            Warm-up: tierstored_scm steps until its DRAM is full (the first eviction; at most
            ``max_fill_steps``), then ``warmup`` steps more; every other variant as many steps,
            so all readers stand at the same sample. Then ``rounds`` rounds of ``timed_steps``
            steps of every variant (the order rotating per round). A step is timed as the
            training loop does (next batch + forward + backward + dense step + the torch
            backend's sparse step); the batch's generation is also timed apart, so "model"
            rates leave it out. Medians over rounds; ratio = tierstored's rate / the torch
            variant's rate (same run). The torch variants hold every row in this process
            (rows x dim x 4 B for the weights, as much again for element-wise Adagrad's state).
                              tierstored_dram / torch_adagrad >= 0.9, tierstored_scm >= 0.5
            Also: the DRAM hit rate and evictions over the timed steps of the store variants
            (all-DRAM misses are rows read for the first time).
quality     Evaluation NE (``eval_samples`` held-out samples) of DLRM with Shampoo and with
            Adagrad as the dense optimizer, and of logistic regression on the same features
            (``--model logreg``: a 1-wide table per feature + a linear layer over the dense
            features), each trained ``steps`` steps of ``quality_batch`` samples (the same samples)
            on ``quality_data`` through ``quality_backend`` (default: a private tierstored with
            DRAM for ``dram_fraction`` of the rows); against the planted model's NE on the same
            evaluation samples.                         target: both DLRMs' NE < logreg's NE

With the defaults the three parts take about 5 minutes on two shared cores (parity ~30 s,
throughput ~1 min, quality ~3 min).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import tierstore as ts
from tierstore.train.config import TrainConfig

PARTS = ("parity", "throughput", "quality")
BACKENDS = ("torch", "embedded", "tierstored")
PARITY_OPTIMIZERS = ("sgd", "rowwise_adagrad")
VARIANTS = ("torch_rowwise", "torch_adagrad", "tierstored_dram", "tierstored_scm")
TARGETS = {"parity_rel": 1e-5, "throughput_dram": 0.9, "throughput_scm": 0.5}
BASELINE = "torch_adagrad"   # the issue's "nn.EmbeddingBag with sparse gradients + Adagrad"
QUALITY_RUNS = (("dlrm_shampoo", "dlrm", "shampoo"), ("dlrm_adagrad", "dlrm", "adagrad"),
                ("logreg", "logreg", "adagrad"))


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"bench dlrm: {msg}", file=sys.stderr, flush=True)


def _losses(summary: dict[str, Any]) -> np.ndarray:
    return np.array([p["loss"] for p in summary["train_loss"]], dtype=np.float64)


# -- parity -----------------------------------------------------------------------------------
def parity(c: dict[str, Any], progress: bool) -> dict[str, Any]:
    from tierstore.train.loop import run as train
    out: dict[str, Any] = {"optimizers": {}}
    worst = 0.0
    for opt in PARITY_OPTIMIZERS:
        runs = {}
        for b in BACKENDS:
            _say(progress, f"parity: {opt} / {b}")
            cfg = TrainConfig(data=c["parity_data"], backend=b, sparse_optimizer=opt,
                              dense_optimizer="adagrad", steps=c["parity_steps"],
                              time_limit=None, log_every=1, batch_size=c["parity_batch"],
                              dim=c["parity_dim"], dram_fraction=c["parity_dram_fraction"],
                              eval_samples=c["parity_eval_samples"], seed=c["seed"])
            runs[b] = train(cfg, progress=False)
        losses = {b: _losses(s) for b, s in runs.items()}
        steps = {b: len(v) for b, v in losses.items()}
        if len(set(steps.values())) != 1:
            raise RuntimeError(f"parity: backends logged different step counts {steps}")
        pairs = {}
        for a, b in itertools.combinations(BACKENDS, 2):
            rel = np.abs(losses[a] - losses[b]) / np.abs(losses[a])
            pairs[f"{a}-{b}"] = {"max_rel_diff": float(rel.max()),
                                 "worst_step": int(rel.argmax()) + 1}
            worst = max(worst, float(rel.max()))
        ref = losses["torch"]
        out["optimizers"][opt] = {
            "steps": steps["torch"], "first_loss": float(ref[0]), "last_loss": float(ref[-1]),
            "pairs": pairs,
            "ne": {b: s["ne"] for b, s in runs.items()},
            "hit_rate": {b: s["hit_rate"] for b, s in runs.items() if b != "torch"}}
    out["max_rel_diff"] = worst
    out["target"] = TARGETS["parity_rel"]
    out["met"] = worst < TARGETS["parity_rel"]
    return out


# -- throughput -------------------------------------------------------------------------------
class _Trainer:
    """One throughput variant: the pieces of :class:`tierstore.train.loop.Run` (same model,
    dense optimizer, reader and step) without the evaluation set, with the tables' sparse
    optimizer free to be element-wise ``Adagrad`` (run by the torch backend with
    ``torch.optim.Adagrad``), which ``TrainConfig`` does not offer."""

    def __init__(self, cfg: TrainConfig, sparse: str) -> None:
        from tierstore.data import batches, open_dataset
        from tierstore.train.backends import Backend, table_specs
        from tierstore.train.loop import _dense_optimizer, _model, _rows
        self.cfg = cfg
        data = open_dataset(cfg.data, split="train")
        keys = list(next(iter(batches(data, 1))).keys)
        self.rows = _rows(cfg, data, keys)
        specs = table_specs(cfg, self.rows, keys)
        if sparse == "adagrad":
            specs = {n: dataclasses.replace(s, optimizer=ts.Adagrad(lr=cfg.sparse_lr, eps=1e-8))
                     for n, s in specs.items()}
        self.specs = specs
        self.backend = Backend(cfg, specs)
        try:
            self.model = _model(cfg, self.backend.module, len(keys))
            self.optimizer = _dense_optimizer(cfg, self.model.dense_parameters())
            self.reader = batches(data, cfg.batch_size, repeat=True)
        except BaseException:
            self.backend.close()
            raise
        self.setup_s = 0.0
        self.data_s = self.total_s = 0.0
        self.steps = 0

    def step(self) -> None:
        """``Run.train_step``, timed: the whole step and the batch's generation apart."""
        t0 = time.perf_counter()
        b = next(self.reader).remap(self.rows)
        t1 = time.perf_counter()
        logits = self.model(b.dense, b.keys, b.values, b.lengths)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.backend.module.step()
        t2 = time.perf_counter()
        self.data_s += t1 - t0
        self.total_s += t2 - t0
        self.steps += 1

    def reset(self) -> None:
        self.data_s = self.total_s = 0.0
        self.steps = 0

    def close(self) -> None:
        self.backend.close()


def _variant_cfg(c: dict[str, Any], name: str) -> tuple[TrainConfig, str]:
    backend = "torch" if name.startswith("torch") else "tierstored"
    frac = c["dram_fraction"] if name == "tierstored_scm" else 1.0
    cfg = TrainConfig(data=f"synthetic:criteo_kaggle,scale={c['scale']:g}", backend=backend,
                      dram_fraction=frac, dim=c["dim"], batch_size=c["batch"],
                      dense_optimizer="adagrad", sparse_optimizer="rowwise_adagrad",
                      steps=1, time_limit=None, seed=c["seed"])
    return cfg, "adagrad" if name == "torch_adagrad" else "rowwise_adagrad"


def _counts(tr: _Trainer) -> dict[str, int]:
    """hits, lookups, evictions, rows_in_dram, capacity_rows summed over a store variant's
    tables (zeros for the torch backend)."""
    keys = ("hits", "lookups", "evictions", "rows_in_dram", "capacity_rows")
    if tr.backend.conn is None:
        return dict.fromkeys(keys, 0)
    st = tr.backend.conn.stats()["tables"]
    return {k: int(sum(st[n][k] for n in tr.specs if n in st)) for k in keys}


def throughput(c: dict[str, Any], progress: bool) -> dict[str, Any]:
    with warnings.catch_warnings():  # torch.optim.Adagrad on sparse gradients warns once
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return _throughput(c, progress)


def _throughput(c: dict[str, Any], progress: bool) -> dict[str, Any]:
    trainers: dict[str, _Trainer] = {}
    rate: dict[str, list[float]] = {v: [] for v in VARIANTS}
    model_rate: dict[str, list[float]] = {v: [] for v in VARIANTS}
    before: dict[str, dict[str, int]] = {}
    fill = n_warm = 0
    try:
        for v in VARIANTS:
            _say(progress, f"throughput: building {v}")
            t = time.perf_counter()
            trainers[v] = _Trainer(*_variant_cfg(c, v))
            trainers[v].setup_s = time.perf_counter() - t
        # Warm-up: the 10%-DRAM variant until its DRAM is full (first eviction), then
        # `warmup` steps more; every other variant as many steps (same stream position).
        scm = trainers["tierstored_scm"]
        _say(progress, "throughput: warming up tierstored_scm until its DRAM is full")
        while fill < c["max_fill_steps"] and _counts(scm)["evictions"] == 0:
            scm.step()
            fill += 1
        for _ in range(c["warmup"]):
            scm.step()
        n_warm = fill + c["warmup"]
        for v in VARIANTS:
            if v != "tierstored_scm":
                _say(progress, f"throughput: warming up {v} ({n_warm} steps)")
                for _ in range(n_warm):
                    trainers[v].step()
        for v in VARIANTS:
            before[v] = _counts(trainers[v])
        for r in range(c["rounds"]):
            _say(progress, f"throughput: round {r + 1}/{c['rounds']}")
            for k in range(len(VARIANTS)):
                v = VARIANTS[(r + k) % len(VARIANTS)]
                tr = trainers[v]
                tr.reset()
                for _ in range(c["timed_steps"]):
                    tr.step()
                n = tr.steps * c["batch"]
                rate[v].append(n / tr.total_s)
                model_rate[v].append(n / (tr.total_s - tr.data_s))
        out_v: dict[str, Any] = {}
        for v in VARIANTS:
            tr = trainers[v]
            after, b0 = _counts(tr), before[v]
            looked = after["lookups"] - b0["lookups"]
            out_v[v] = {"backend": tr.cfg.backend, "dram_fraction": tr.cfg.dram_fraction
                        if tr.cfg.backend != "torch" else 1.0,
                        "sparse_optimizer": type(next(iter(tr.specs.values())).optimizer).kind,
                        "samples_per_s": statistics.median(rate[v]),
                        "model_samples_per_s": statistics.median(model_rate[v]),
                        "samples_per_s_by_round": rate[v],
                        "model_samples_per_s_by_round": model_rate[v],
                        "hit_rate": (after["hits"] - b0["hits"]) / looked if looked else None,
                        "setup_s": tr.setup_s}
            if tr.backend.conn is not None:
                out_v[v].update(rows_in_dram=after["rows_in_dram"],
                                capacity_rows=after["capacity_rows"],
                                evictions_timed=after["evictions"] - b0["evictions"])
        rows = int(sum(trainers[VARIANTS[0]].rows))
    finally:
        for tr in trainers.values():
            tr.close()
    ratios: dict[str, Any] = {}
    for mine in ("tierstored_dram", "tierstored_scm"):
        for base in ("torch_adagrad", "torch_rowwise"):
            key = f"{mine}/{base}"
            ratios[key] = out_v[mine]["samples_per_s"] / out_v[base]["samples_per_s"]
            ratios[f"{key} (model)"] = (out_v[mine]["model_samples_per_s"]
                                        / out_v[base]["model_samples_per_s"])
    return {"data": f"synthetic:criteo_kaggle,scale={c['scale']:g}", "tables": 26, "rows": rows,
            "dim": c["dim"], "batch": c["batch"], "fill_steps": fill, "warmup_steps": n_warm,
            "timed_steps": c["timed_steps"], "rounds": c["rounds"],
            "torch_weight_bytes": rows * c["dim"] * 4,
            "variants": out_v, "ratios": ratios, "baseline": BASELINE,
            "target_dram": TARGETS["throughput_dram"], "target_scm": TARGETS["throughput_scm"],
            "met_dram": ratios[f"tierstored_dram/{BASELINE}"] >= TARGETS["throughput_dram"],
            "met_scm": ratios[f"tierstored_scm/{BASELINE}"] >= TARGETS["throughput_scm"]}


# -- quality ----------------------------------------------------------------------------------
def quality(c: dict[str, Any], progress: bool) -> dict[str, Any]:
    from tierstore.train.loop import run as train
    runs: dict[str, Any] = {}
    planted = None
    for name, model, dense in QUALITY_RUNS:
        _say(progress, f"quality: {name}")
        cfg = TrainConfig(data=c["quality_data"], backend=c["quality_backend"], model=model,
                          dense_optimizer=dense, steps=c["steps"], time_limit=None,
                          batch_size=c["quality_batch"], dim=c["quality_dim"],
                          dram_fraction=c["dram_fraction"], eval_samples=c["eval_samples"],
                          log_every=max(1, c["steps"] // 50), seed=c["seed"])
        s = train(cfg, progress=False)
        runs[name] = {"model": model, "dense_optimizer": dense, "ne": s["ne"], "auc": s["auc"],
                      "eval_logloss": s["eval_logloss"], "samples": s["steps"] * cfg.batch_size,
                      "samples_per_s": s["samples_per_s"], "hit_rate": s["hit_rate"],
                      "wall_seconds": s["wall_seconds"]}
        planted = s["planted"]
    lr = runs["logreg"]["ne"]
    for name, r in runs.items():
        r["ne_minus_planted"] = r["ne"] - planted["ne"]
        r["ne_minus_logreg"] = r["ne"] - lr
    dlrms = [n for n, m, _ in QUALITY_RUNS if m == "dlrm"]
    return {"data": c["quality_data"], "backend": c["quality_backend"],
            "dram_fraction": c["dram_fraction"] if c["quality_backend"] != "torch" else 1.0,
            "steps": c["steps"], "batch": c["quality_batch"], "dim": c["quality_dim"],
            "eval_samples": c["eval_samples"], "planted": planted, "runs": runs,
            "met": all(runs[n]["ne"] < lr for n in dlrms)}


# -- the benchmark ----------------------------------------------------------------------------
def run(only: tuple[str, ...] | list[str] = PARTS, steps: int = 2000, scale: float = 0.05,
        dim: int = 64, batch: int = 2048, warmup: int = 20, timed_steps: int = 10,
        rounds: int = 5, max_fill_steps: int = 1000, dram_fraction: float = 0.1,
        parity_steps: int = 200,
        parity_data: str = "synthetic:small", parity_batch: int = 256, parity_dim: int = 16,
        parity_dram_fraction: float = 0.2, parity_eval_samples: int = 4096,
        quality_data: str = "synthetic:criteo_kaggle,scale=0.01", quality_batch: int = 512,
        quality_dim: int = 16, quality_backend: str = "tierstored", eval_samples: int = 65536,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the chosen parts (see the module doc); returns one JSON-able dict."""
    bad = [p for p in only if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; valid: {', '.join(PARTS)}")
    if not 0 < dram_fraction < 1:
        raise ValueError(f"dram_fraction must be in (0, 1), got {dram_fraction}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    for k, v in (("steps", steps), ("rounds", rounds), ("timed_steps", timed_steps),
                 ("parity_steps", parity_steps), ("batch", batch)):
        if v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    cfg = {"steps": steps, "scale": scale, "dim": dim, "batch": batch, "warmup": warmup,
           "max_fill_steps": max_fill_steps,
           "timed_steps": timed_steps, "rounds": rounds, "dram_fraction": dram_fraction,
           "parity_steps": parity_steps, "parity_data": parity_data,
           "parity_batch": parity_batch, "parity_dim": parity_dim,
           "parity_dram_fraction": parity_dram_fraction,
           "parity_eval_samples": parity_eval_samples, "quality_data": quality_data,
           "quality_batch": quality_batch, "quality_dim": quality_dim,
           "quality_backend": quality_backend, "eval_samples": eval_samples, "seed": seed}
    res: dict[str, Any] = {"mode": "dlrm", "config": cfg}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for part in PARTS:
            if part in only:
                _say(progress, part)
                started = time.time()
                res[part] = globals()[part](cfg, progress)
                res[part]["part_seconds"] = round(time.time() - started, 1)
    finally:
        torch.set_num_threads(threads)
    return res


def table(res: dict[str, Any]) -> str:
    """Markdown: one block per part that ran."""
    out: list[str] = []
    if "parity" in res:
        p = res["parity"]
        c = res["config"]
        out += [(f"Parity: {c['parity_data']}, batch {c['parity_batch']}, dim {c['parity_dim']}, "
                f"dense Adagrad, store backends with DRAM for {c['parity_dram_fraction']:g} of "
                f"the rows; max over steps of |loss_a - loss_b| / |loss_a|."), "",
                "| sparse optimizer | steps | loss first -> last | " +
                " | ".join(f"{a} vs {b}" for a, b in itertools.combinations(BACKENDS, 2)) +
                " | NE torch / embedded / tierstored |",
                "|---|---|---|" + "---|" * 3 + "---|"]
        for opt, r in p["optimizers"].items():
            rel = " | ".join(f"{r['pairs'][f'{a}-{b}']['max_rel_diff']:.2e}"
                             for a, b in itertools.combinations(BACKENDS, 2))
            ne = " / ".join(f"{r['ne'][b]:.6f}" for b in BACKENDS)
            out.append(f"| {opt} | {r['steps']} | {r['first_loss']:.4f} -> {r['last_loss']:.4f}"
                       f" | {rel} | {ne} |")
        out += ["", (f"Target: < {p['target']:g} relative at every step; worst "
                f"{p['max_rel_diff']:.2e}: {'met' if p['met'] else 'NOT met'}."), ""]
    if "throughput" in res:
        t = res["throughput"]
        out += [(f"Throughput: DLRM, {t['data']} ({t['tables']} tables, {t['rows']:,} rows), dim "
                f"{t['dim']}, batch {t['batch']}, dense Adagrad, one thread; "
                f"{t['warmup_steps']} warm-up steps per variant ({t['fill_steps']} until the "
                f"tierstored_scm service first evicted a row), then {t['rounds']} rounds x "
                f"{t['timed_steps']} steps per variant, interleaved; medians over rounds."), "",
                ("| variant | where the rows live | sparse optimizer | samples/s | samples/s "
                 "without data generation | DRAM hit rate (timed steps) | evictions (timed "
                 "steps) |"),
                "|---|---|---|---|---|---|---|"]
        where = {"torch_rowwise": "nn.EmbeddingBag(sparse=True), reference update",
                 "torch_adagrad": "nn.EmbeddingBag(sparse=True) + torch.optim.Adagrad",
                 "tierstored_dram": "tierstored, all rows in DRAM"}
        for v, r in t["variants"].items():
            w = where.get(v, f"tierstored, {r['dram_fraction']:g} in DRAM, rest on SCM")
            hr = f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-"
            ev = f"{r['evictions_timed']:,}" if "evictions_timed" in r else "-"
            out.append(f"| {v} | {w} | {r['sparse_optimizer']} | {r['samples_per_s']:,.0f} | "
                       f"{r['model_samples_per_s']:,.0f} | {hr} | {ev} |")
        q = t["ratios"]
        out += ["", (f"Ratios (tierstored / torch, samples/s; without data generation in "
                f"brackets). The issue's baseline is {t['baseline']} (nn.EmbeddingBag with "
                f"sparse gradients + torch.optim.Adagrad); torch_rowwise runs the same "
                f"optimizer as tierstored."), ""]
        for mine, target in (("tierstored_dram", t["target_dram"]),
                             ("tierstored_scm", t["target_scm"])):
            for base in ("torch_adagrad", "torch_rowwise"):
                k = f"{mine}/{base}"
                mark = (f" target >= {target:g}x: {'met' if q[k] >= target else 'NOT met'}"
                        if base == t["baseline"] else "")
                out.append(f"- {k}: {q[k]:.2f}x ({q[k + ' (model)']:.2f}x){mark}")
        out.append("")
    if "quality" in res:
        q = res["quality"]
        out += [f"Quality: {q['data']}, {q['steps']} steps x batch {q['batch']} "
                f"({q['steps'] * q['batch']:,} samples) each, backend {q['backend']}"
                + (f" (DRAM {q['dram_fraction']:g})" if q["backend"] != "torch" else "")
                + f", evaluation on {q['eval_samples']:,} held-out samples.", "",
                ("| model | dense optimizer | NE | AUC | NE - planted | NE - logreg | samples/s | "
                 "DRAM hit rate |"),
                "|---|---|---|---|---|---|---|---|"]
        for r in q["runs"].values():
            out.append(f"| {r['model']} | {r['dense_optimizer']} | {r['ne']:.4f} | "
                       f"{r['auc']:.4f} | {r['ne_minus_planted']:+.4f} | "
                       f"{r['ne_minus_logreg']:+.4f} | {r['samples_per_s']:,.0f} | "
                       f"{'-' if r['hit_rate'] is None else format(r['hit_rate'], '.3f')} |")
        pl = q["planted"]
        out += [f"| planted model | - | {pl['ne']:.4f} | {pl['auc']:.4f} | 0 | - | - | - |", "",
                (f"Target: DLRM (Shampoo and Adagrad) NE below logistic regression's: "
                f"{'met' if q['met'] else 'NOT met'}."), ""]
    return "\n".join(out).rstrip()
