"""``tierstore train``: flags (each overrides the recipe's key of the same name), the run, the
printed summary and the run's files (summary.json, loss/hit-rate PNG)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

from tierstore.train.config import KEY_HELP, TrainConfig, TrainConfigError, from_sources

_FLOAT = ("dram_fraction", "dense_lr", "sparse_lr", "time_limit")
_INT = ("rows_per_table", "dim", "steps", "batch_size", "eval_every", "eval_samples",
        "log_every", "checkpoint_every", "checkpoint_bits", "seed")
_LIST = ("bottom", "top")


def add_parser(sub: Any) -> None:
    """Register ``train`` on a sub-parser collection."""
    defaults = TrainConfig()
    t = sub.add_parser(
        "train", help="train a recommendation model with its tables in tierstore",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train DLRM (or logistic regression) on click data with the embedding rows "
                    "in tierstore. With no flags: the README's main job (a private tierstored, "
                    "DRAM for 10%% of the rows, Shampoo, about two minutes).",
        epilog="Every flag overrides the recipe key of the same name (dashes for underscores).")
    t.add_argument("--config", help="recipe TOML file (keys: the flags' names)")
    for key, help_text in KEY_HELP.items():
        flag = "--" + key.replace("_", "-")
        default = getattr(defaults, key)
        kind = float if key in _FLOAT else int if key in _INT else str
        extra = ({"nargs": "+", "type": int} if key in _LIST else
                 {"action": "store_const", "const": True} if key == "strict" else {"type": kind})
        t.add_argument(flag, dest=key, default=None, help=f"{help_text} (default: {default})",
                       **extra)
    t.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)


def cmd_train(a: argparse.Namespace) -> int:
    from tierstore.errors import TierstoreError
    from tierstore.train.loop import run
    overrides = {k: getattr(a, k) for k in KEY_HELP}
    try:
        cfg = from_sources(a.config, overrides)
    except TrainConfigError as e:
        print(f"tierstore train: {e}", file=sys.stderr)
        return 2
    if cfg.out_dir and cfg.plot is None:
        cfg = dataclasses.replace(cfg, plot=os.path.join(cfg.out_dir, "run.png"))
    try:
        with contextlib.redirect_stdout(sys.stderr) if a.json else contextlib.nullcontext():
            summary = run(cfg, progress=not a.no_progress)
    except (TierstoreError, ValueError) as e:
        print(f"tierstore train: {e}", file=sys.stderr)
        return 1
    if cfg.out_dir:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(text(summary))
    return 130 if summary["interrupted"] else 0


def text(s: dict[str, Any]) -> str:
    """The short human summary."""
    lines = [f"{s['model']} on {s['data']} ({s['tables']} tables, {s['rows']:,} rows), "
             f"backend {s['backend']}, DRAM {s['dram_fraction']:.0%} of rows"
             + (" (interrupted)" if s["interrupted"] else ""),
             f"  steps {s['steps']:,} x {s['batch_size']}: "
             f"{s['samples_per_s']:,.0f} samples/s" if s["samples_per_s"] else "  no steps",
             f"  eval: log loss {s['eval_logloss']:.5f}  NE {s['ne']:.4f}  AUC {s['auc']:.4f}"]
    if s.get("planted"):
        p = s["planted"]
        lines.append(f"  planted model (best achievable): log loss {p['logloss']:.5f}  "
                     f"NE {p['ne']:.4f}  AUC {p['auc']:.4f}")
    if s.get("hit_rate") is not None:
        lines.append(f"  DRAM hit rate {s['hit_rate']:.3f}")
    if s.get("checkpoints"):
        c = s["checkpoints"]
        lines.append(f"  checkpoints: {c['taken']} taken, {c['count']} kept "
                     f"({c['bytes_written']:,} bytes, {c['full_fp32_bytes'] / max(c['bytes_written'], 1):.1f}x "
                     f"less than as many full fp32 ones); stall {c['stall_seconds_median'] * 1e3:.0f} ms")
    if s.get("plot"):
        lines.append(f"  plot: {s['plot']}")
    return "\n".join(lines)
