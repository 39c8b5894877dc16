"""`tierstore train`: backend parity, the summary, bad input, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tierstore as ts
from tierstore.train.config import TrainConfig, TrainConfigError, from_sources
from tierstore.train.loop import run

BIN = os.path.dirname(sys.executable)


def _cfg(**kw):
    base = dict(data="synthetic:small", steps=25, time_limit=None, batch_size=128,
                dense_optimizer="adagrad", dram_fraction=0.2, eval_samples=2048, log_every=1,
                dim=8)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("sparse", ["sgd", "rowwise_adagrad"])
def test_backends_agree_step_by_step(sparse):
    """Same seed, data and optimizers: torch, embedded and tierstored losses agree within
    1e-5 relative at every step (the CI version of the parity benchmark)."""
    runs = {b: run(_cfg(backend=b, sparse_optimizer=sparse), progress=False)
            for b in ("torch", "embedded", "tierstored")}
    ref = np.array([p["loss"] for p in runs["torch"]["train_loss"]])
    assert len(ref) == 25 and ref[-1] < ref[0]
    for b in ("embedded", "tierstored"):
        got = np.array([p["loss"] for p in runs[b]["train_loss"]])
        assert np.max(np.abs(got / ref - 1)) < 1e-5, (b, got, ref)
        assert runs[b]["hit_rate"] is not None and 0 < runs[b]["hit_rate"] < 1
    assert abs(runs["embedded"]["ne"] - runs["torch"]["ne"]) < 1e-5


def test_summary_fields_and_logreg():
    s = run(_cfg(backend="embedded", model="logreg", eval_every=10), progress=False)
    for key in ("train_loss", "eval_logloss", "ne", "auc", "samples_per_s", "hit_rate",
                "planted"):
        assert s[key] is not None, key
    assert [e["step"] for e in s["eval"]] == [10, 20, 25]
    assert s["planted"]["ne"] < 1.0 and 0.5 < s["auc"] <= 1.0


def test_bad_options_list_valid_values(tmp_path):
    with pytest.raises(TrainConfigError, match="valid: torch, embedded, tierstored"):
        TrainConfig(backend="gpu")
    with pytest.raises(TrainConfigError, match="dram_fraction"):
        TrainConfig(dram_fraction=0)
    with pytest.raises(TrainConfigError, match="checkpoints need a store backend"):
        TrainConfig(backend="torch", checkpoint_every=10)
    recipe = tmp_path / "r.toml"
    recipe.write_text('modle = "dlrm"\n')
    with pytest.raises(TrainConfigError, match="unknown keys \\['modle'\\]"):
        from_sources(str(recipe), {})
    out = subprocess.run([f"{BIN}/tierstore", "train", "--data", "synthetic:nope"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "valid: criteo_kaggle, meta, small" in out.stderr
    out = subprocess.run([f"{BIN}/tierstore", "train", "--dense-optimizer", "sgd"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "valid: shampoo, adagrad, adam" in out.stderr


def test_missing_service_is_a_clear_error(tmp_path):
    out = subprocess.run([f"{BIN}/tierstore", "train", "--backend", "tierstored", "--run-dir",
                          str(tmp_path / "nothing"), "--data", "synthetic:small"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "no tierstored at" in out.stderr and "leave run_dir unset" in out.stderr


def test_ctrl_c_stops_cleanly_and_writes_back(tmp_path):
    store = tmp_path / "store"
    p = subprocess.Popen([f"{BIN}/tierstore", "train", "--backend", "embedded", "--store-dir",
                          str(store), "--data", "synthetic:small", "--steps", "100000",
                          "--time-limit", "300", "--batch-size", "64", "--json",
                          "--no-progress", "--eval-samples", "1024", "--dim", "8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(12)  # startup (imports, tables) and some steps
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    s = json.loads(out)
    assert s["interrupted"] and s["steps"] > 0
    with ts.Store(str(store)) as st:  # the store was flushed and released
        assert len(st.tables()) == 26
        assert sum(len(st.written_rows(t)) for t in st.tables()) > 0


@pytest.mark.parametrize("backend", ["embedded", "tierstored"])
def test_resume_continues_exactly(tmp_path, backend):
    """A run checkpointed at step 12 (fp32 rows) and resumed elsewhere takes the same steps
    as an uninterrupted run: rows, dense parameters, Shampoo's state, reader position."""
    base = dict(backend=backend, dense_optimizer="shampoo", log_every=1)
    whole = run(_cfg(steps=20, **base), progress=False)
    first = run(_cfg(steps=12, checkpoint_every=12, checkpoint_bits=32,
                     checkpoint_dir=str(tmp_path / "ck"), store_dir=str(tmp_path / "s1"),
                     **base), progress=False)
    assert first["checkpoints"]["count"] == 1
    second = run(_cfg(steps=20, resume=first["checkpoints"]["newest"],
                      store_dir=str(tmp_path / "s2"), **base), progress=False)
    want = [p["loss"] for p in whole["train_loss"]][12:]
    got = [p["loss"] for p in second["train_loss"]]
    assert second["steps"] == 20 and len(got) == 8
    assert np.max(np.abs(np.array(got) / np.array(want) - 1)) < 1e-6


def test_malformed_tsv_lines_skipped_or_strict(tmp_path):
    good = "\t".join(["1"] + [str(i) for i in range(13)] + ["68fd1e64"] * 26)
    lines = [good] * 40 + ["garbage line"] + [good] * 20
    path = tmp_path / "d.tsv"
    path.write_text("\n".join(lines) + "\n")
    args = [f"{BIN}/tierstore", "train", "--backend", "torch", "--data", str(path),
            "--rows-per-table", "100", "--steps", "3", "--batch-size", "8", "--eval-samples",
            "8", "--no-progress", "--dim", "4", "--json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "line 41" in out.stderr
    assert json.loads(out.stdout)["steps"] == 3
    out = subprocess.run(args[:-1] + ["--steps", "100", "--strict"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "line 41" in out.stderr
