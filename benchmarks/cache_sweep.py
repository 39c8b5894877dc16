#!/usr/bin/env python
"""Hit-rate sweep of the cache policies: policy x capacity x trace, with the Belady oracle.

Development tool for tierstore/cache (the product's ``tierstore bench cache`` replays through
the real DDR tier). Each cell drives a fresh policy over the trace with
``tierstore.cache.replay.replay_policy``. Capacities are fractions of the trace's unique ids.

    python benchmarks/cache_sweep.py                       # real trace + 3 Zipf traces
    python benchmarks/cache_sweep.py --trace zipf:alpha=0.9,n=200000,len=400000,seed=1 --json

It also checks the targets of issue 2 ("Numbers to reach", item 1) for ``adaptive``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tierstore.cache import make_policy  # noqa: E402
from tierstore.cache.replay import replay_policy  # noqa: E402
from tierstore.cache.traces import trace_from_spec  # noqa: E402

REAL_TRACE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "../../shared/data/real/dlrm-reuse-traces/reuse_medium_table_500K.txt",
)
ZIPF_TRACES = [f"zipf:alpha={a},n=200000,len=400000,seed=1" for a in (0.9, 1.05, 1.2)]
# Targets: per cell, adaptive >= max(LRU, LFU) - margin (points are 0.01 of hit rate).
MARGINS = {"real": 0.005, "zipf": 0.01}


def trace_label(spec: str) -> str:
    return spec if spec.startswith("zipf:") else os.path.basename(spec)


def run_cell(spec: str, policy: str, fraction: float, batch: int) -> dict:
    trace = trace_from_spec(spec)
    capacity = max(1, round(fraction * len(np.unique(trace))))
    kw = {"future": trace, "batch": batch} if policy == "belady" else {}
    result = replay_policy(make_policy(policy, capacity, **kw), trace, batch=batch)
    return {
        "trace": trace_label(spec),
        "policy": policy,
        "capacity_fraction": fraction,
        "capacity": capacity,
        "accesses": len(trace),
        "hits": result["hits"],
        "hit_rate": result["hit_rate"],
        "seconds": result["seconds"],
        "us_per_access": 1e6 * result["seconds"] / len(trace),
        "access_us": 1e6 * result["access_seconds"] / len(trace),
    }


def check_targets(cells: list[dict]) -> dict:
    """Issue 2 item 1 for adaptive: per-cell margins and the average against LRU/Belady."""
    rate = {(c["trace"], c["policy"], c["capacity_fraction"]): c["hit_rate"] for c in cells}
    keys = sorted({(c["trace"], c["capacity_fraction"]) for c in cells})
    per_cell, sums = [], {"adaptive": 0.0, "lru": 0.0, "belady": 0.0}
    for trace, fraction in keys:
        got = {p: rate.get((trace, p, fraction)) for p in ("adaptive", "lru", "lfu", "belady")}
        if got["adaptive"] is None or got["lru"] is None or got["lfu"] is None:
            continue
        margin = MARGINS["zipf" if trace.startswith("zipf:") else "real"]
        best = max(got["lru"], got["lfu"])
        per_cell.append(
            {
                "trace": trace,
                "capacity_fraction": fraction,
                "adaptive_minus_best": got["adaptive"] - best,
                "allowed": -margin,
                "ok": got["adaptive"] >= best - margin,
            }
        )
        if got["belady"] is not None:
            for p in sums:
                sums[p] += got[p]
    n = len(per_cell)
    summary = {"cells": per_cell, "all_cells_ok": all(c["ok"] for c in per_cell)}
    if n and sums["belady"]:
        mean = {p: v / n for p, v in sums.items()}
        gap = mean["belady"] - mean["lru"]
        summary["mean"] = mean
        summary["adaptive_closer_to_belady_than_lru"] = mean["adaptive"] > mean["lru"]
        summary["share_of_lru_to_belady_gap_closed"] = (
            (mean["adaptive"] - mean["lru"]) / gap if gap > 0 else None
        )
    return summary


def print_table(cells: list[dict], fractions: list[float], policies: list[str]) -> None:
    by_key = {(c["trace"], c["policy"], c["capacity_fraction"]): c for c in cells}
    traces = list(dict.fromkeys(c["trace"] for c in cells))
    head = "".join(f"{f:>16.0%}" for f in fractions)
    print(f"{'trace':44s} {'policy':9s}{head}")
    for trace in traces:
        for policy in policies:
            row = [by_key.get((trace, policy, f)) for f in fractions]
            text = "".join(
                f"{c['hit_rate']:>8.4f} ({c['access_us']:4.1f}us)" if c else f"{'-':>16s}"
                for c in row
            )
            print(f"{trace:44s} {policy:9s}{text}")
    print("(hit rate per access; in parentheses: microseconds per access inside policy.access)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", action="append", help="trace file or zipf: spec (repeatable)")
    parser.add_argument("--capacity", default="0.01,0.05,0.1,0.25")
    parser.add_argument("--policy", default="lru,lfu,adaptive,belady")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="cells replayed in parallel")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    traces = args.trace or [os.path.normpath(REAL_TRACE), *ZIPF_TRACES]
    fractions = [float(f) for f in args.capacity.split(",")]
    policies = args.policy.split(",")
    jobs = [(t, p, f, args.batch) for t in traces for p in policies for f in fractions]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            cells = list(pool.map(run_cell, *zip(*jobs)))
    else:
        cells = [run_cell(*job) for job in jobs]
    summary = check_targets(cells)
    if args.json:
        json.dump({"batch": args.batch, "cells": cells, "targets": summary}, sys.stdout, indent=1)
        print()
    else:
        print_table(cells, fractions, policies)
        if summary["cells"]:
            bad = [c for c in summary["cells"] if not c["ok"]]
            print(f"adaptive within target in {len(summary['cells']) - len(bad)}"
                  f"/{len(summary['cells'])} cells")
            for c in bad:
                print(f"  MISSED {c['trace']} {c['capacity_fraction']:.0%}: "
                      f"{c['adaptive_minus_best']:+.4f} (allowed {c['allowed']:+.3f})")
        if "mean" in summary:
            m = summary["mean"]
            print(f"mean hit rate: lru {m['lru']:.4f}  adaptive {m['adaptive']:.4f}  "
                  f"belady {m['belady']:.4f}  (adaptive closes "
                  f"{summary['share_of_lru_to_belady_gap_closed']:.0%} of the LRU->Belady gap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
