"""The `tierstore` command as a user runs it (real subprocesses, real store on disk)."""

import json
import subprocess
import sys

import numpy as np
import torch

import tierstore as ts


def run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "tierstore.cli", *args], capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_bench_cache_replays_a_trace_through_the_dram_tier(tmp_path):
    # a loop over 10 ids, then a scan of 50 new ids, repeated: LRU keeps nothing of the loop
    # at capacity 5; Belady is the upper bound of every policy
    loop = np.tile(np.arange(10), 30)
    trace = np.concatenate([loop, np.arange(100, 150), loop])
    path = tmp_path / "trace.txt"
    path.write_text("\n".join(map(str, trace)) + "\n")
    r = run("bench", "cache", "--trace", str(path), "--capacity", "0.1,0.5",
            "--policy", "lru,lfu,adaptive,belady", "--json")
    res = json.loads(r.stdout)
    tr = res["traces"][str(path)]
    assert tr["accesses"] == len(trace) and tr["unique"] == 60
    cells = {(c["policy"], c["capacity_fraction"]): c for c in tr["cells"]}
    assert cells[("lru", 0.1)]["capacity"] == 6
    for frac in (0.1, 0.5):
        best = cells[("belady", frac)]["hit_rate"]
        for p in ("lru", "lfu", "adaptive"):
            assert 0 <= cells[(p, frac)]["hit_rate"] <= best + 1e-12
    # capacity 30 holds the 10-id loop: every policy hits it after the first round
    assert cells[("lru", 0.5)]["hit_rate"] > 0.8


def test_bench_cache_zipf_spec_and_bad_policy():
    r = run("bench", "cache", "--trace", "zipf:alpha=1.2,n=500,len=3000,seed=3", "--capacity",
            "0.2", "--policy", "lru,lfu", "--json")
    res = json.loads(r.stdout)
    (name, tr), = res["traces"].items()
    assert name.startswith("zipf:") and tr["accesses"] == 3000
    bad = run("bench", "cache", "--trace", "zipf:alpha=1.2,n=50,len=30,seed=3", "--policy",
              "fifo", check=False)
    assert bad.returncode != 0 and "fifo" in bad.stderr and "adaptive" in bad.stderr


def test_stats_prints_every_table(tmp_path):
    path = tmp_path / "s"
    with ts.Store(path, ddr_bytes=1 << 20) as s:
        s.create_table(ts.TableSpec("emb", 1000, 8))
        s.lookup("emb", torch.arange(10))
        s.apply_gradients("emb", torch.arange(10), torch.ones(10, 8))
    st = json.loads(run("stats", "--path", str(path), "--json").stdout)
    assert st["tables"]["emb"]["rows_on_scm"] == 10
    text = run("stats", "--path", str(path)).stdout
    assert "# table emb" in text and "rows_on_scm:10" in text


def test_help_explains_commands():
    out = run("--help").stdout
    for word in ("demo", "bench", "stats"):
        assert word in out
    assert "--capacity" in run("bench", "cache", "--help").stdout


def test_demo_runs_end_to_end_and_reopens_identical():
    res = json.loads(run("demo", "--steps", "3", "--json").stdout)
    assert set(res["policies"]) == {"lru", "lfu", "adaptive"}
    for r in res["policies"].values():
        assert r["reopened_equal"] is True
        assert all(0.0 <= h <= 1.0 for h in r["hit_rate"].values())
        assert r["rows_in_dram"]["country"] == 250  # the small table fits in DRAM
        assert r["rows_on_scm"]["user"] > 0  # the big one spilled to SCM

