"""Smoke test of `tierstore bench service` at a minimal size: every part runs against a real
tierstored, the result has the documented structure, and its ratios are the rates it reports."""

import importlib.util
import json
import math
import os

import pytest

from tierstore.bench import service
from tierstore.cli import main

SMALL = dict(tables=2, rows=2000, dim=8, batch=64, pooling=4, batches=2, repeats=3,
             dram_fraction=0.1, idle_seconds=0.5, seconds=0.5, rounds=1)


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def result():
    return service.run(**SMALL, progress=False)


def test_structure_and_ratios(result):
    assert result["mode"] == "service"
    assert result["config"]["tables"] == 2 and result["config"]["rows"] == 2000
    for part in service.PARTS:
        assert part in result, part
        assert result[part]["part_seconds"] >= 0

    f = result["forward"]
    assert f["tierstore_service_s"] > 0 and f["torch_embeddingbag_s"] > 0
    assert _close(f["ratio"], f["torch_embeddingbag_s"] / f["tierstore_service_s"])
    assert f["target"] == 0.85

    t = result["train"]
    assert t["tierstore_service_s"] > 0 and t["tierstore_embedded_s"] > 0
    assert _close(t["ratio"], t["tierstore_embedded_s"] / t["tierstore_service_s"])

    two = result["two"]
    assert two["tables_per_process"] == 1 and two["rounds"] == 1
    assert len(two["solo_steps_per_s_by_round"]) == 1
    assert len(two["pair_steps_per_s_by_round"]) == 1
    assert all(r > 0 for r in two["solo_steps_per_s_by_round"])
    assert all(a > 0 and b > 0 for a, b in two["pair_steps_per_s_by_round"])
    assert _close(two["solo_steps_per_s"], two["solo_steps_per_s_by_round"][0])
    assert _close(two["pair_steps_per_s"], sum(two["pair_steps_per_s_by_round"][0]))
    assert _close(two["ratio"], two["pair_steps_per_s"] / two["solo_steps_per_s"])

    s = result["scm"]
    assert s["tierstore_service_s"] > 0 and s["all_dram_service_s"] > 0
    assert _close(s["ratio"], s["all_dram_service_s"] / s["tierstore_service_s"])
    assert 0 < s["hit_rate"] < 1  # a 10% cache over Zipf ids: some hits, some misses
    assert s["ddr_bytes"] == service.ddr_bytes_for(2, 2000, 8, 0.1)
    assert 0 < s["rows_in_dram"] < 2 * 2000

    i = result["idle"]
    assert i["seconds"] >= 0.5 and i["cpu_seconds"] >= 0 and i["clients"] == 1
    assert _close(i["percent_of_core"], 100 * i["cpu_seconds"] / i["seconds"])

    json.dumps(result)  # stored as benchmarks/results/service.json


def test_rendering(result):
    text = service.table(result)
    rows = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert len(rows) == 2 + len(service.PARTS)  # header, rule, one row per part
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "run_all.py")
    spec = importlib.util.spec_from_file_location("run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    md = run_all.render_service(result)
    assert "two processes" in md and "hit rate" in md and "idle" in md
    assert "service" in run_all.SECTIONS


def test_only_one_part_and_bad_part(capsys):
    assert main(["bench", "service", "--tables", "2", "--rows", "1000", "--dim", "8",
                 "--batch", "32", "--pooling", "2", "--batches", "1", "--idle-seconds", "0.2",
                 "--only", "idle", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(service.PARTS) & set(res) == {"idle"}
    with pytest.raises(ValueError, match="unknown part"):
        service.run(only=["forward", "bogus"])
    with pytest.raises(SystemExit):
        main(["bench", "service", "--only", "nope"])
