"""Where the CPU of a training step goes: the caller's thread, the store's other threads
(prefetch, row-file writes) and the rest of the machine (the kernel's writeback of dirty
page-cache pages), per step, for `tierstore bench train`'s step on one configuration.

    OMP_NUM_THREADS=1 python benchmarks/cpu_per_step.py --tables 8 --rows 1000000 --dim 128 \
        --pooling 20 --dram-fraction 0.1

Times per step are milliseconds of CPU over the timed steps (getrusage for the process and its
calling thread, /proc/stat for the whole machine, Linux only). The machine's total over its
cores bounds the steps from below: they cannot average less than total / cores. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import torch

from tierstore.bench import lookup
from tierstore.bench.workload import make_batches
from tierstore.tiers import rowfile


def _machine_ms() -> np.ndarray:
    """CPU time of the whole machine so far: user (incl. nice), system (incl. irq), idle,
    iowait, in ms."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = f
    return np.array([user + nice, system + irq + softirq, idle, iowait]) * tick


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pooling", type=int, default=20)
    p.add_argument("--dist", default="zipf:1.05")
    p.add_argument("--dram-fraction", type=float, default=0.1)
    p.add_argument("--warm", type=int, default=16, help="untimed steps first (the bench's 16)")
    p.add_argument("--steps", type=int, default=24, help="timed steps")
    a = p.parse_args()
    torch.set_num_threads(1)
    batches = make_batches(a.tables, a.rows, 4096, a.pooling, a.dist, 16,
                           seed=a.dim + a.pooling)
    grad = torch.randn(4096, a.dim)
    with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as d:
        store = lookup._tierstore(f"{d}/s", a.tables, a.rows, a.dim, a.dram_fraction,
                                  "adaptive")
        step = lookup._train_step(store, a.tables, batches, grad)
        for i in range(a.warm):
            step(i)
        written = dict(rowfile.WRITTEN_ROWS)
        m0, p0 = _machine_ms(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = resource.getrusage(resource.RUSAGE_THREAD)
        times = []
        for i in range(a.steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        m1, p1 = _machine_ms(), resource.getrusage(resource.RUSAGE_SELF)
        t1 = resource.getrusage(resource.RUSAGE_THREAD)
        after = dict(rowfile.WRITTEN_ROWS)  # (closing writes every dirty row back)
        store.close()
    n = a.steps
    proc = np.array([p1.ru_utime - p0.ru_utime, p1.ru_stime - p0.ru_stime]) * 1e3 / n
    main_t = np.array([t1.ru_utime - t0.ru_utime, t1.ru_stime - t0.ru_stime]) * 1e3 / n
    mach = (m1 - m0) / n
    print(f"{a.tables} x {a.rows:,} x {a.dim}, pooling {a.pooling}, {a.dist}, DRAM "
          f"{a.dram_fraction:g}: median step {1e3 * statistics.median(times):.1f} ms")
    print("rows written to SCM per step: "
          + ", ".join(f"{k} {(after[k] - written[k]) / n:,.0f}" for k in written))
    print(f"caller's thread:      user {main_t[0]:7.1f}  system {main_t[1]:7.1f} ms/step")
    print(f"other threads:        user {proc[0] - main_t[0]:7.1f}  system "
          f"{proc[1] - main_t[1]:7.1f} ms/step")
    print(f"outside this process: user {mach[0] - proc[0]:7.1f}  system "
          f"{mach[1] - proc[1]:7.1f} ms/step")
    cores = os.cpu_count() or 1
    busy = mach[0] + mach[1]
    print(f"machine: {busy:.1f} ms of CPU per step on {cores} cores (idle {mach[2]:.1f}, iowait "
          f"{mach[3]:.1f}): steps cannot average less than {busy / cores:.1f} ms")


if __name__ == "__main__":
    main()
