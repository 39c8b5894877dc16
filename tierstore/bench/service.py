"""`tierstore bench service`: tierstore through a running ``tierstored``, in one run.

Every part uses the same synthetic tables (``tables`` x ``rows``, fp32, row-wise Adagrad lr 0.01
eps 1e-8) and the same ``make_batches`` ids (``n_batches`` distinct batches, steps cycling over
them); a step is one batch over every table of the part. A training step is the pooled forward
of every table in one ``pooled_many`` call (pipelined by the client: the service resolves one
table's misses while the client pools another's), then each table's fused backward. Times
are medians per step; a "ratio" is always tierstore's rate over the baseline's rate
(baseline seconds / tierstore seconds), so above 1 means tierstore is faster. Alternatives
compared in a part are timed interleaved, one step of each per round, so load from other
processes hits both alike.
Every process (this one, the service, the workers) runs with ``OMP_NUM_THREADS=1``.

forward  Pooled forward (``conn.pooled`` per table, include_last_offset) through a service
         whose DRAM holds every row (warmed by one full pass, so every row of the batches is
         resident and read straight from the shared slab) vs ``nn.EmbeddingBag(mode="sum")``
         per table in this process under ``no_grad``, same ids.                 target >= 0.85
train    Forward + fused backward (``conn.apply_pooled_gradients`` with a fixed grad_output)
         through the same all-DRAM service vs the embedded ``tierstore.Store`` (same tables,
         same DRAM budget, warmed the same way) in this process.                 target >= 0.85
two      Two worker processes (``python -m tierstore.bench.service worker``), each the writer
         of its own ``tables // 2`` tables of the all-DRAM service (13 + 13 of 26: both halves
         fit the one service's DRAM), each running the training step loop on its tables for a
         fixed wall time. Windows alternate: worker A alone, then A and B together (both
         started on a barrier: each warms up, reports ready, then reads the common start time
         on stdin). Ratio: aggregate steps/s of A + B over A's steps/s alone (medians over
         rounds).                                                                target >= 1.6
         Also each worker's CPU time / wall time per window (below 1 while together: other
         load on the machine took the cores) and the service's CPU time over the part.
scm      Training steps through a second service whose DRAM holds ``dram_fraction`` of the
         rows (``dram_fraction * tables * rows * Store.cached_row_bytes`` plus one row per
         table; the rest on SCM row files, page cache warm after one full pass) vs the
         all-DRAM service, interleaved. Also the hit rate over the timed steps (``conn.stats()``
         hits / lookups, summed over tables).                                   target >= 0.5
idle     CPU time of the all-DRAM service process (utime + stime of /proc/PID/stat) over
         ``idle_seconds`` while a client has every table attached and does nothing, as percent
         of one core.                                                            target < 1 %
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

import tierstore as ts
from tierstore.daemon.launch import ServiceProcess
from tierstore.bench.common import interleaved
from tierstore.bench.workload import Batch, make_batches

PARTS = ("forward", "train", "two", "scm", "idle")
TARGETS = {"forward": 0.85, "train": 0.85, "two": 1.6, "scm": 0.5, "idle_percent": 1.0}
_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# -- a tierstored process ----------------------------------------------------------------------
class Daemon(ServiceProcess):
    """The benchmark's ``tierstored``: a :class:`ServiceProcess` with the given DRAM and policy."""

    def __init__(self, root: str, ddr_bytes: int, policy: str = "adaptive") -> None:
        super().__init__(root, int(ddr_bytes), policy)


# -- helpers --------------------------------------------------------------------------------
def _spec(name: str, rows: int, dim: int) -> ts.TableSpec:
    return ts.TableSpec(name, rows, dim, optimizer=ts.RowWiseAdagrad(lr=0.01, eps=1e-8))


def ddr_bytes_for(tables: int, rows: int, dim: int, fraction: float) -> int:
    """DRAM budget holding ``fraction`` of every table's rows (plus one row per table)."""
    per_row = ts.Store.cached_row_bytes(_spec("t0", rows, dim))
    return int(tables * rows * per_row * fraction) + tables * per_row


def _names(first: int, count: int) -> list[str]:
    return [f"t{t}" for t in range(first, first + count)]


def train_step(api: Any, names: list[str], b: Batch, grad: torch.Tensor,
               nxt: Batch | None = None) -> None:
    """Forward of one batch over ``names`` (a Connection or a Store), then each table's fused
    backward, as a model's forward and loss.backward() run them. The forward is one
    ``pooled_many`` call (the client pipelines it through the service, as
    TierEmbeddingBagCollection's forward does). With ``nxt``, each table's backward is
    followed by the prefetch of its batch in ``nxt`` (a no-op for tables held whole)."""
    n = len(names)
    api.pooled_many(names, b.indices[:n], b.offsets[:n], include_last_offset=True)
    for t, name in enumerate(names):
        api.apply_pooled_gradients(name, b.indices[t], b.offsets[t], grad,
                                   include_last_offset=True)
        if nxt is not None:
            api.prefetch(name, nxt.indices[t])


def forward_step(api: Any, names: list[str], b: Batch) -> None:
    """One table's pooled forward after another, each output dropped (as the baseline's)."""
    for t, name in enumerate(names):
        api.pooled(name, b.indices[t], b.offsets[t], include_last_offset=True)


def _hits_lookups(conn: Any) -> tuple[int, int]:
    st = conn.stats()["tables"]
    return sum(s["hits"] for s in st.values()), sum(s["lookups"] for s in st.values())


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"bench service: {msg}", file=sys.stderr, flush=True)


# -- the benchmark --------------------------------------------------------------------------
class _Bench:
    def __init__(self, root: str, cfg: dict[str, Any], progress: bool) -> None:
        self.root, self.cfg, self.progress = root, cfg, progress
        c = cfg
        self.names = _names(0, c["tables"])
        self.batches = make_batches(c["tables"], c["rows"], c["batch"], c["pooling"], c["dist"],
                                    c["batches"], seed=c["seed"])
        g = torch.Generator().manual_seed(c["seed"])
        self.grad = torch.randn(c["batch"], c["dim"], generator=g)
        self.resident: Daemon | None = None
        self.warm = False

    def batch(self, i: int) -> Batch:
        return self.batches[i % len(self.batches)]

    def _create(self, d: Daemon) -> None:
        with d.connect() as conn:
            for name in self.names:
                conn.create_table(_spec(name, self.cfg["rows"], self.cfg["dim"]))

    def service(self, warm: bool) -> Daemon:
        """The all-DRAM service (started on first use), warmed by one full training pass."""
        c = self.cfg
        if self.resident is None:
            _say(self.progress, "starting the all-DRAM service")
            d = Daemon(os.path.join(self.root, "dram"),
                       ddr_bytes_for(c["tables"], c["rows"], c["dim"], 1.0))
            self.resident = d.start()
            self._create(d)
        if warm and not self.warm:
            with self.resident.connect() as conn:
                for i in range(len(self.batches)):
                    train_step(conn, self.names, self.batch(i), self.grad, self.batch(i + 1))
            self.warm = True
        return self.resident

    def forward(self) -> dict[str, Any]:
        c = self.cfg
        conn = self.service(warm=True).connect()
        bags = [torch.nn.EmbeddingBag(c["rows"], c["dim"], mode="sum") for _ in self.names]

        def eb(i: int) -> None:
            b = self.batch(i)
            with torch.no_grad():
                for t, bag in enumerate(bags):
                    bag(b.indices[t], b.torch_offsets[t])
        try:
            for i in range(len(self.batches)):  # attach the tables, touch every batch once
                forward_step(conn, self.names, self.batch(i))
            eb(0)
            m = interleaved({"ts": lambda i: forward_step(conn, self.names, self.batch(i)),
                             "eb": eb}, c["repeats"])
        finally:
            conn.close()
        return {"tierstore_service_s": m["ts"], "torch_embeddingbag_s": m["eb"],
                "ratio": m["eb"] / m["ts"], "target": TARGETS["forward"]}

    def train(self) -> dict[str, Any]:
        c = self.cfg
        conn = self.service(warm=True).connect()
        store = ts.Store(os.path.join(self.root, "embedded"),
                         ddr_bytes=ddr_bytes_for(c["tables"], c["rows"], c["dim"], 1.0))
        try:
            for name in self.names:
                store.create_table(_spec(name, c["rows"], c["dim"]))
            for i in range(len(self.batches)):  # admit every row of the batches, numba warm
                train_step(store, self.names, self.batch(i), self.grad, self.batch(i + 1))
            train_step(conn, self.names, self.batch(0), self.grad)  # attach (service warm)
            m = interleaved({
                "service": lambda i: train_step(conn, self.names, self.batch(i), self.grad,
                                                self.batch(i + 1)),
                "store": lambda i: train_step(store, self.names, self.batch(i), self.grad,
                                              self.batch(i + 1))},
                c["repeats"])
        finally:
            conn.close()
            store.close()
        return {"tierstore_service_s": m["service"], "tierstore_embedded_s": m["store"],
                "ratio": m["store"] / m["service"], "target": TARGETS["train"]}

    def two(self) -> dict[str, Any]:
        c = self.cfg
        half = c["tables"] // 2
        if half < 1:
            raise ValueError("the two-process part needs --tables >= 2")
        d = self.service(warm=False)
        win, gap = c["seconds"], 0.5
        windows, t = [], 0.0
        for _ in range(c["rounds"]):  # (start, end, who): A alone, then A and B
            windows.append((t, t + win, "solo"))
            t += win + gap
            windows.append((t, t + win, "pair"))
            t += win + gap
        specs = [(_names(0, half), [w for w in windows]),
                 (_names(half, half), [w for w in windows if w[2] == "pair"])]
        procs = []
        try:
            for k, (names, wins) in enumerate(specs):
                cmd = [sys.executable, "-m", "tierstore.bench.service", "worker",
                       "--run-dir", d.run_dir, "--tables", ",".join(names),
                       "--rows", str(c["rows"]), "--dim", str(c["dim"]),
                       "--batch", str(c["batch"]), "--pooling", str(c["pooling"]),
                       "--dist", c["dist"], "--batches", str(c["batches"]),
                       "--seed", str(c["seed"] + 1 + k),
                       "--windows", ",".join(f"{s:g}:{e:g}" for s, e, _ in wins)]
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              text=True, env=_ENV))
            for p in procs:  # barrier: both warmed up and waiting
                line = p.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"worker {p.pid} did not start (said {line!r}, "
                                       f"exit {p.poll()})")
            t0 = time.time() + 0.2
            svc_cpu0 = d.cpu_seconds()
            for p in procs:
                p.stdin.write(f"{t0!r}\n")
                p.stdin.flush()
            outs = []
            for p in procs:
                out, _ = p.communicate(timeout=t + 300)
                if p.returncode != 0:
                    raise RuntimeError(f"worker {p.pid} exited with {p.returncode}")
                outs.append(json.loads(out.strip().splitlines()[-1]))
            svc_cpu = d.cpu_seconds() - svc_cpu0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        a, b = iter(outs[0]["windows"]), iter(outs[1]["windows"])
        solo, pair, solo_cpu, pair_cpu = [], [], [], []
        for _, _, who in windows:
            wa = next(a)
            ra = wa["steps"] / wa["seconds"]
            if who == "solo":
                solo.append(ra)
                solo_cpu.append(wa["cpu_seconds"] / wa["seconds"])
            else:
                wb = next(b)
                pair.append([ra, wb["steps"] / wb["seconds"]])
                pair_cpu.append([wa["cpu_seconds"] / wa["seconds"],
                                 wb["cpu_seconds"] / wb["seconds"]])
        solo_rate = statistics.median(solo)
        pair_rate = statistics.median(sum(p) for p in pair)
        return {"tables_per_process": half, "window_s": win, "rounds": c["rounds"],
                "solo_steps_per_s_by_round": solo, "pair_steps_per_s_by_round": pair,
                "solo_cpu_share_by_round": solo_cpu, "pair_cpu_share_by_round": pair_cpu,
                "service_cpu_seconds": svc_cpu,
                "solo_steps_per_s": solo_rate, "pair_steps_per_s": pair_rate,
                "ratio": pair_rate / solo_rate, "target": TARGETS["two"]}

    def scm(self) -> dict[str, Any]:
        c = self.cfg
        frac = c["dram_fraction"]
        resident = self.service(warm=True)
        ddr = ddr_bytes_for(c["tables"], c["rows"], c["dim"], frac)
        _say(self.progress, f"starting the {frac:g}-DRAM service ({ddr:,} bytes)")
        d = Daemon(os.path.join(self.root, f"dram{frac:g}"), ddr).start()
        conn = resident.connect()
        try:
            self._create(d)
            small = d.connect()
            try:
                for i in range(len(self.batches)):  # admit, page cache warm, attach
                    train_step(small, self.names, self.batch(i), self.grad, self.batch(i + 1))
                train_step(conn, self.names, self.batch(0), self.grad)  # attach (service warm)
                h0, l0 = _hits_lookups(small)
                m = interleaved({
                    "all": lambda i: train_step(conn, self.names, self.batch(i), self.grad,
                                                self.batch(i + 1)),
                    "frac": lambda i: train_step(small, self.names, self.batch(i), self.grad,
                                                 self.batch(i + 1))},
                    c["repeats"])
                h1, l1 = _hits_lookups(small)
                dram_rows = sum(t["rows_in_dram"] for t in small.stats()["tables"].values())
            finally:
                small.close()
        finally:
            conn.close()
            d.stop()
        return {"dram_fraction": frac, "ddr_bytes": ddr, "rows_in_dram": dram_rows,
                "tierstore_service_s": m["frac"], "all_dram_service_s": m["all"],
                "hit_rate": (h1 - h0) / max(l1 - l0, 1), "ratio": m["all"] / m["frac"],
                "target": TARGETS["scm"]}

    def idle(self) -> dict[str, Any]:
        secs = self.cfg["idle_seconds"]
        d = self.service(warm=False)
        with d.connect() as conn:
            for name in self.names:
                conn.attach(name)
            time.sleep(1.0)  # let the attach settle
            c0, w0 = d.cpu_seconds(), time.monotonic()
            time.sleep(secs)
            c1, w1 = d.cpu_seconds(), time.monotonic()
            clients = conn.stats()["service"]["clients"]
        return {"seconds": w1 - w0, "cpu_seconds": c1 - c0, "clients": clients,
                "tables_attached": len(self.names),
                "percent_of_core": 100.0 * (c1 - c0) / (w1 - w0),
                "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
                "target_percent": TARGETS["idle_percent"]}

    def close(self) -> None:
        if self.resident is not None:
            self.resident.stop()


def run(tables: int = 26, rows: int = 100_000, dim: int = 64, batch: int = 4096,
        pooling: int = 20, dist: str = "zipf:1.05", repeats: int = 15, batches: int = 16,
        dram_fraction: float = 0.1, idle_seconds: float = 10.0, seconds: float = 4.0,
        rounds: int = 3, only: tuple[str, ...] | list[str] = PARTS, seed: int = 0,
        progress: bool = True) -> dict[str, Any]:
    """Run the chosen parts (see the module doc); returns one JSON-able dict."""
    bad = [p for p in only if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {bad}; valid: {', '.join(PARTS)}")
    if not 0 < dram_fraction < 1:
        raise ValueError(f"dram_fraction must be in (0, 1), got {dram_fraction}")
    cfg = {"tables": tables, "rows": rows, "dim": dim, "batch": batch, "pooling": pooling,
           "dist": dist, "repeats": repeats, "batches": batches, "dram_fraction": dram_fraction,
           "idle_seconds": idle_seconds, "seconds": seconds, "rounds": rounds, "seed": seed}
    res: dict[str, Any] = {"mode": "service", "config": cfg}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="tierstore-bench-") as root:
            b = _Bench(root, cfg, progress)
            try:
                for part in PARTS:
                    if part in only:
                        _say(progress, part)
                        started = time.time()
                        res[part] = getattr(b, part)()
                        res[part]["part_seconds"] = round(time.time() - started, 1)
            finally:
                b.close()
    finally:
        torch.set_num_threads(threads)
    return res


def table(res: dict[str, Any]) -> str:
    """Markdown: one row per part that ran."""
    ms = lambda s: f"{1e3 * s:.2f} ms/step"  # noqa: E731
    c = res["config"]
    lines = [(f"{c['tables']} tables x {c['rows']:,} rows, fp32 dim {c['dim']}, batch "
              f"{c['batch']}, pooling {c['pooling']}, ids {c['dist']}, {c['batches']} distinct "
              f"batches, {c['repeats']} timed steps per median."), "",
             "| part | tierstore (service) | baseline | ratio (rate) | target |",
             "|---|---|---|---|---|"]

    def row(name, mine, base, ratio, target, ok):
        lines.append(f"| {name} | {mine} | {base} | {ratio} | {target}: "
                     f"{'met' if ok else 'NOT met'} |")
    if "forward" in res:
        r = res["forward"]
        row("pooled forward, all rows in DRAM", ms(r["tierstore_service_s"]),
            f"nn.EmbeddingBag {ms(r['torch_embeddingbag_s'])}", f"{r['ratio']:.2f}x",
            f">= {r['target']}x", r["ratio"] >= r["target"])
    if "train" in res:
        r = res["train"]
        row("training step, all rows in DRAM", ms(r["tierstore_service_s"]),
            f"embedded Store {ms(r['tierstore_embedded_s'])}", f"{r['ratio']:.2f}x",
            f">= {r['target']}x", r["ratio"] >= r["target"])
    if "two" in res:
        r = res["two"]
        row(f"two client processes, {r['tables_per_process']} tables each",
            f"{r['pair_steps_per_s']:.1f} steps/s together",
            f"one process alone {r['solo_steps_per_s']:.1f} steps/s", f"{r['ratio']:.2f}x",
            f">= {r['target']}x", r["ratio"] >= r["target"])
    if "scm" in res:
        r = res["scm"]
        row(f"training step, {r['dram_fraction']:g} of rows in DRAM (hit rate "
            f"{r['hit_rate']:.3f})", ms(r["tierstore_service_s"]),
            f"all-DRAM service {ms(r['all_dram_service_s'])}", f"{r['ratio']:.2f}x",
            f">= {r['target']}x", r["ratio"] >= r["target"])
    if "idle" in res:
        r = res["idle"]
        row(f"idle service, {r['tables_attached']} tables attached by an idle client",
            f"{r['percent_of_core']:.2f} % of a core ({r['cpu_seconds']:.2f} s CPU in "
            f"{r['seconds']:.1f} s)", "", "", f"< {r['target_percent']:g} %",
            r["percent_of_core"] < r["target_percent"])
    return "\n".join(lines)


# -- the worker of the two-process part -------------------------------------------------------
def worker(argv: list[str]) -> int:
    """Train on some tables of a running service in given windows of wall time.

    Builds its batches, warms up (one full pass), prints ``ready``, reads the common start time
    (``time.time()`` seconds) from stdin, then for each window ``START:END`` (seconds after the
    start) runs training steps from START until END and finally prints one JSON line
    ``{"windows": [{"steps": n, "seconds": s, "cpu_seconds": c}, ...]}`` (s: START to the end
    of the last step; c: this process's CPU time in it).
    """
    import argparse

    from tierstore.client import connect
    p = argparse.ArgumentParser(prog="python -m tierstore.bench.service worker")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tables", required=True, help="comma-separated table names")
    for k, v in (("--rows", 100_000), ("--dim", 64), ("--batch", 4096), ("--pooling", 20),
                 ("--batches", 16), ("--seed", 1)):
        p.add_argument(k, type=int, default=v)
    p.add_argument("--dist", default="zipf:1.05")
    p.add_argument("--windows", required=True, help="START:END,... seconds after the start")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in a.tables.split(",") if n]
    windows = [tuple(float(x) for x in w.split(":")) for w in a.windows.split(",") if w]
    batches = make_batches(len(names), a.rows, a.batch, a.pooling, a.dist, a.batches, a.seed)
    grad = torch.randn(a.batch, a.dim, generator=torch.Generator().manual_seed(a.seed))
    conn = connect(a.run_dir)
    try:
        for i, b in enumerate(batches):
            train_step(conn, names, b, grad, batches[(i + 1) % len(batches)])
        print("ready", flush=True)
        t0 = float(sys.stdin.readline())
        out, i = [], 0
        for start, end in windows:
            time.sleep(max(0.0, t0 + start - time.time()))
            s, c, n = time.time(), time.process_time(), 0
            while time.time() < t0 + end:
                train_step(conn, names, batches[i % len(batches)], grad,
                           batches[(i + 1) % len(batches)])
                i += 1
                n += 1
            out.append({"steps": n, "seconds": time.time() - s,
                        "cpu_seconds": time.process_time() - c})
    finally:
        conn.close()
    print(json.dumps({"windows": out}), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2:]))
    sys.exit("usage: python -m tierstore.bench.service worker ... (the benchmark itself: "
             "tierstore bench service)")
