"""Smoke test of `tierstore bench dlrm` at a minimal size: every part runs (the throughput part
against real private tierstored services), the result has the documented structure, values are
finite and positive, and the ratios and differences are the ones its rates and NEs give."""

import importlib.util
import json
import math
import os

import pytest

from tierstore.bench import dlrm
from tierstore.cli import main

SMALL = dict(steps=8, scale=0.001, dim=8, batch=128, warmup=1, timed_steps=2, rounds=2,
             max_fill_steps=3, parity_steps=6, parity_batch=64, parity_dim=4,
             parity_eval_samples=512, quality_data="synthetic:small", quality_batch=64,
             quality_dim=4, quality_backend="torch", eval_samples=1024)


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope="module")
def result():
    return dlrm.run(**SMALL, progress=False)


def test_structure_and_consistency(result):
    assert result["mode"] == "dlrm" and result["config"]["steps"] == 8
    for part in dlrm.PARTS:
        assert result[part]["part_seconds"] >= 0, part

    p = result["parity"]
    assert set(p["optimizers"]) == set(dlrm.PARITY_OPTIMIZERS)
    for r in p["optimizers"].values():
        assert r["steps"] == 6 and _pos(r["first_loss"]) and _pos(r["last_loss"])
        assert set(r["pairs"]) == {"torch-embedded", "torch-tierstored", "embedded-tierstored"}
        for pair in r["pairs"].values():
            assert 0 <= pair["max_rel_diff"] < 1e-5 and 1 <= pair["worst_step"] <= 6
        assert all(_pos(ne) for ne in r["ne"].values())
        assert all(0 < h <= 1 for h in r["hit_rate"].values())
    assert p["met"] and p["max_rel_diff"] == max(
        x["max_rel_diff"] for r in p["optimizers"].values() for x in r["pairs"].values())

    t = result["throughput"]
    assert set(t["variants"]) == set(dlrm.VARIANTS) and t["tables"] == 26 and t["rows"] > 26
    assert 1 <= t["fill_steps"] <= 3 and t["warmup_steps"] == t["fill_steps"] + 1
    for v in t["variants"].values():
        assert len(v["samples_per_s_by_round"]) == 2
        assert all(_pos(x) for x in v["samples_per_s_by_round"] + v["model_samples_per_s_by_round"])
        assert v["model_samples_per_s"] >= v["samples_per_s"]  # leaves the data generation out
        if v["backend"] == "torch":
            assert v["hit_rate"] is None and v["dram_fraction"] == 1.0
        else:
            assert 0 < v["hit_rate"] <= 1 and 0 < v["rows_in_dram"] <= v["capacity_rows"]
    assert t["variants"]["torch_adagrad"]["sparse_optimizer"] == "adagrad"
    assert t["variants"]["tierstored_scm"]["dram_fraction"] == 0.1
    assert t["variants"]["tierstored_scm"]["capacity_rows"] < t["rows"]
    for key, ratio in t["ratios"].items():
        mine, base = key.split(" ")[0].split("/")
        rate = "model_samples_per_s" if key.endswith("(model)") else "samples_per_s"
        assert _close(ratio, t["variants"][mine][rate] / t["variants"][base][rate]), key
    assert t["baseline"] == "torch_adagrad"
    assert t["met_dram"] == (t["ratios"]["tierstored_dram/torch_adagrad"] >= 0.9)

    q = result["quality"]
    assert set(q["runs"]) == {"dlrm_shampoo", "dlrm_adagrad", "logreg"}
    assert 0 < q["planted"]["ne"] < 1
    for r in q["runs"].values():
        assert _pos(r["ne"]) and 0 < r["auc"] <= 1 and r["samples"] == 8 * 64
        assert _close(r["ne_minus_planted"], r["ne"] - q["planted"]["ne"])
        assert _close(r["ne_minus_logreg"], r["ne"] - q["runs"]["logreg"]["ne"])
    assert q["met"] == all(q["runs"][n]["ne"] < q["runs"]["logreg"]["ne"]
                           for n in ("dlrm_shampoo", "dlrm_adagrad"))
    json.dumps(result)  # stored as benchmarks/results/dlrm.json


def test_rendering(result):
    text = dlrm.table(result)
    assert "Parity" in text and "Throughput" in text and "Quality" in text
    assert "planted model" in text and text.count("target >=") == 2
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "run_all.py")
    spec = importlib.util.spec_from_file_location("run_all", path)
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert "dlrm" in run_all.SECTIONS
    assert text in run_all.SECTIONS["dlrm"][1](result)


def test_bad_part():
    with pytest.raises(ValueError, match="unknown part"):
        dlrm.run(only=["parity", "bogus"])
    with pytest.raises(SystemExit, match="unknown part"):
        main(["bench", "dlrm", "--only", "nope"])
