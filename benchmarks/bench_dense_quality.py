"""Quality of the dense optimizers on the training task (issue 5): DLRM trained with Distributed
Shampoo, Adagrad and Adam for the same number of steps on the same synthetic click data (the
same tables, rows and sparse optimizer), evaluation log loss every ``--eval-every`` steps.

Each optimizer gets its best learning rate from a small grid (the final evaluation loss
decides), so the comparison is between tuned optimizers, not between one lucky setting and
others. Tables live in memory (``torch`` backend): storage does not change the values (the
backends agree step by step), and this keeps the run short.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dense_quality.py [--steps 3000] \\
        [--json-out FILE]

Prints one JSON document (curves included) and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tierstore.train.config import TrainConfig
from tierstore.train.loop import run

GRID = {"shampoo": (0.003, 0.01, 0.03, 0.1), "adagrad": (0.003, 0.01, 0.03, 0.1),
        "adam": (0.0001, 0.0003, 0.001, 0.003)}


def measure(steps: int, eval_every: int, data: str, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": steps, "batch_size": batch, "data": data, "runs": {}}
    t0 = time.perf_counter()
    for opt, lrs in GRID.items():
        for lr in lrs:
            cfg = TrainConfig(backend="torch", data=data, dense_optimizer=opt, dense_lr=lr,
                              steps=steps, time_limit=None, batch_size=batch,
                              eval_every=eval_every, eval_samples=32768, log_every=50)
            s = run(cfg, progress=False)
            out["runs"][f"{opt}@{lr}"] = {
                "optimizer": opt, "lr": lr, "eval": s["eval"], "final_logloss": s["eval_logloss"],
                "ne": s["ne"], "auc": s["auc"]}
            out["planted"] = s["planted"]
            print(f"{opt} lr={lr}: eval log loss {s['eval_logloss']:.5f} NE {s['ne']:.4f}",
                  flush=True)
    best = {}
    for opt in GRID:
        runs = [r for r in out["runs"].values() if r["optimizer"] == opt]
        best[opt] = min(runs, key=lambda r: r["final_logloss"])
    out["best"] = best
    out["shampoo_lowest"] = all(best["shampoo"]["final_logloss"] < best[o]["final_logloss"]
                                for o in ("adagrad", "adam"))
    out["seconds"] = time.perf_counter() - t0
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"DLRM on `{res['data']}`, batch {res['batch_size']}, {res['steps']} steps, tables in "
             f"memory (torch backend), row-wise Adagrad on the tables; each dense optimizer at its "
             f"best learning rate of {GRID} (by final evaluation loss). Planted model (best "
             f"achievable): log loss {res['planted']['logloss']:.5f}, NE "
             f"{res['planted']['ne']:.4f}.", "",
             "| dense optimizer | best lr | " + " | ".join(
                 f"eval log loss @ {e['step']}" for e in res["best"]["shampoo"]["eval"])
             + " | NE | AUC |",
             "|---|---|" + "---|" * len(res["best"]["shampoo"]["eval"]) + "---|---|"]
    for opt, r in res["best"].items():
        lines.append(f"| {opt} | {r['lr']} | " + " | ".join(f"{e['logloss']:.5f}" for e in r["eval"])
                     + f" | {r['ne']:.4f} | {r['auc']:.4f} |")
    lines += ["", f"Shampoo reaches the lowest evaluation loss: "
                  f"{'yes' if res['shampoo_lowest'] else 'NO'}. Every run (final log loss): "
              + ", ".join(f"{k} {v['final_logloss']:.5f}" for k, v in res["runs"].items()) + "."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--data", default="synthetic:criteo_kaggle,scale=0.01")
    p.add_argument("--json-out", help="also write the JSON result here")
    a = p.parse_args()
    res = measure(a.steps, a.eval_every, a.data, a.batch_size)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
