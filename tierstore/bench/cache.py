"""`tierstore bench cache`: replay an id trace through the engine's real DRAM tier.

Each (policy, capacity) cell builds a fresh :class:`tierstore.tiers.ddr.DDRCache` over a real
row file and feeds the trace in batches of ``--batch`` ids through ``DDRCache.resolve`` (the
same code path as ``Store.lookup``: index probe, policy decision, SCM reads, evictions).
Hit rate = hits / accesses with first-occurrence semantics inside a batch (exactly per access
for --batch 1). Capacity is a fraction of the trace's distinct ids.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from tierstore.cache import make_policy
from tierstore.cache.traces import trace_from_spec
from tierstore.config import TableSpec
from tierstore.optim.sparse import SGD
from tierstore.tiers.ddr import DDRCache
from tierstore.tiers.rowfile import RowFile


def replay_through_tier(trace: np.ndarray, policy: str, capacity: int, batch: int,
                        workdir: str) -> dict[str, Any]:
    """Hit rate of ``policy`` with ``capacity`` slots on ``trace`` through a real DDRCache."""
    num_rows = int(trace.max()) + 1
    spec = TableSpec("trace", num_rows, 1, init="zeros", optimizer=SGD(0.0))
    path = os.path.join(workdir, f"{policy}-{capacity}-{os.getpid()}.rows")
    rows = RowFile(path, spec)
    kwargs = {"future": trace, "batch": batch} if policy == "belady" else {}
    cache = DDRCache(spec, capacity, rows, make_policy(policy, capacity, **kwargs),
                     f"tierstore.bench.{os.getpid()}.{policy}.{capacity}")
    start = time.perf_counter()
    try:
        for i in range(0, len(trace), batch):
            cache.resolve(trace[i:i + batch])
    finally:
        seconds = time.perf_counter() - start
        counters = dict(cache.counters)
        cache.close()
        rows.close()
        os.unlink(path)
        os.unlink(path + ".journal")
    return {"policy": policy, "capacity": capacity, "hits": counters["hits"],
            "accesses": counters["lookups"], "hit_rate": counters["hits"] / counters["lookups"],
            "seconds": round(seconds, 2),
            "us_per_access": round(1e6 * seconds / counters["lookups"], 2)}


def _cell(args: tuple) -> dict[str, Any]:
    spec, policy, frac, batch = args
    trace = trace_from_spec(spec)
    capacity = max(1, int(round(frac * len(np.unique(trace)))))
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
        out = replay_through_tier(trace, policy, capacity, batch, d)
    out["capacity_fraction"] = frac
    return out


def run(traces: list[str], capacities: list[float], policies: list[str], batch: int = 1,
        jobs: int = 1, progress: bool = True) -> dict[str, Any]:
    """All cells of traces x policies x capacities; ``jobs`` worker processes."""
    results: dict[str, Any] = {"batch": batch, "traces": {}}
    cells = [(t, p, c, batch) for t in traces for c in capacities for p in policies]
    for t in traces:
        tr = trace_from_spec(t)
        results["traces"][t] = {"accesses": int(len(tr)), "unique": int(len(np.unique(tr))),
                                "cells": []}
    bar = tqdm(total=len(cells), desc="cache cells", disable=not progress, unit="cell")
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for cell, out in zip(cells, pool.map(_cell, cells)):
            results["traces"][cell[0]]["cells"].append(out)
            bar.update(1)
    bar.close()
    return results


def table(results: dict[str, Any]) -> str:
    """Markdown table: one row per trace x capacity, one column per policy."""
    lines = []
    for name, tr in results["traces"].items():
        policies = list(dict.fromkeys(c["policy"] for c in tr["cells"]))
        lines.append(f"\n{name} ({tr['accesses']} accesses, {tr['unique']} distinct, "
                     f"batch {results['batch']})\n")
        lines.append("| capacity | " + " | ".join(policies) + " |")
        lines.append("|---|" + "---|" * len(policies))
        for frac in dict.fromkeys(c["capacity_fraction"] for c in tr["cells"]):
            row = {c["policy"]: c["hit_rate"] for c in tr["cells"] if c["capacity_fraction"] == frac}
            lines.append(f"| {frac:g} | " + " | ".join(f"{row[p]:.4f}" for p in policies) + " |")
    return "\n".join(lines)
