"""Checkpoints (issue 4): policies, exact and quantized restores, chains, sessions, retention,
dense state, the cost model, the CLI and the benchmark at minimal size. Real stores on disk."""

import json
import os

import numpy as np
import pytest
import torch

import tierstore as ts
from tierstore import ckpt, quant
from tierstore.ckpt import writer
from tierstore.ckpt.policy import PolicyOptions, decide

ROWS = 4000


def make_store(path, ddr_bytes=60_000):
    """Two tables that do not fit in DRAM (rows churn to SCM) and a sparse-id one."""
    st = ts.Store(path, ddr_bytes=ddr_bytes)
    st.create_table(ts.TableSpec("a", ROWS, 8, optimizer=ts.RowWiseAdagrad(lr=0.1), seed=3))
    st.create_table(ts.TableSpec("b", 500, 4, optimizer=ts.Adagrad(lr=0.1)))
    st.create_table(ts.TableSpec("s", 1000, 4, optimizer=ts.SGD(lr=0.1), id_space="sparse"))
    return st


def train(st, rng, steps=3):
    for _ in range(steps):
        ids = rng.zipf(1.3, 400) % ROWS
        st.apply_gradients("a", torch.from_numpy(ids), torch.randn(len(ids), 8))
        st.apply_gradients("b", torch.from_numpy(rng.integers(0, 500, 50)), torch.randn(50, 4))
        st.apply_gradients("s", torch.from_numpy(rng.integers(0, 100, 30) * 7919),
                           torch.randn(30, 4))


def dump(st):
    """Every row that is not at its initial value, plus a few that are, per table."""
    out = {}
    for t in st.tables():
        rows = np.union1d(st.written_rows(t), np.arange(50))
        out[t] = (rows, *st.read_rows(t, rows))
    return out


def same(x, y):
    assert x.keys() == y.keys()
    for t in x:
        assert np.array_equal(x[t][0], y[t][0]), t
        assert np.array_equal(x[t][1], y[t][1]), t
        assert np.array_equal(x[t][2], y[t][2]), t


@pytest.mark.parametrize("policy,kw", [(p, {}) for p in ckpt.POLICIES] + [
    ("intermittent", {"increments": "consecutive"}), ("intermittent", {"rebaseline_at": 0.9})])
def test_policies_restore_exactly(tmp_path, rng, policy, kw):
    """fp32 checkpoints of every policy restore bit for bit, newest and older ones, after more
    training; the kinds follow the policy."""
    st = make_store(tmp_path / "s")
    root = tmp_path / "ck"
    paths, states, kinds = [], [], []
    for i in range(5):
        train(st, rng)
        p = st.checkpoint(root, policy=policy, bits=32, keep=None, step=i, wait=True, **kw)
        paths.append(p)
        states.append(dump(st))
        kinds.append(ckpt.list_checkpoints(root)[-1]["kind"])
    want = {"full": ["full"] * 5, "incremental": ["full"] + ["cumulative"] * 4,
            "consecutive": ["full"] + ["delta"] * 4}
    if policy in want:
        assert kinds == want[policy]
    else:
        inc = "delta" if kw.get("increments") == "consecutive" else "cumulative"
        assert kinds[0] == "full" and set(kinds) == {"full", inc}, kinds
    train(st, rng)
    for i in (4, 1, 3, 0):
        res = st.restore(paths[i])
        assert res["step"] == i and res["checkpoint"] == os.path.basename(paths[i])
        same(dump(st), states[i])
        assert all(len(st.take_modified(t)) == 0 for t in st.tables())  # restoring is no update
    st.close()


def test_chain_continues_after_restore_and_written_set_is_exact(tmp_path, rng):
    """After a restore the chain goes on with increments from the restored checkpoint; the
    session's record of written rows equals the store's."""
    st = make_store(tmp_path / "s")
    root = tmp_path / "ck"
    train(st, rng)
    first = st.checkpoint(root, policy="consecutive", bits=32, wait=True)
    train(st, rng)
    second = st.checkpoint(root, policy="consecutive", bits=32, wait=True)
    st.restore(first)
    train(st, rng)
    third = st.checkpoint(root, policy="consecutive", bits=32, wait=True)
    state = dump(st)
    m = {r["name"]: r for r in ckpt.list_checkpoints(root)}
    n1, n2, n3 = (os.path.basename(p) for p in (first, second, third))
    assert m[n3]["kind"] == "delta" and m[n3]["parent"] == n1
    assert m[n3]["restore_set"] == [n1, n3] and m[n2]["restore_set"] == [n1, n2]
    sess = writer.session(st)
    for t in st.tables():
        assert np.array_equal(sess.written[t].rows(), st.written_rows(t))
    train(st, rng)
    st.restore(third)
    same(dump(st), state)
    st.close()


def test_new_store_object_starts_a_baseline(tmp_path, rng):
    """The modified-row record lives in memory: a reopened store's first checkpoint is full,
    unless it restored from the chain first."""
    path, root = tmp_path / "s", tmp_path / "ck"
    st = make_store(path)
    train(st, rng)
    st.checkpoint(root, policy="incremental", bits=32, wait=True)
    train(st, rng)
    p2 = st.checkpoint(root, policy="incremental", bits=32, wait=True)
    st.close()
    st = ts.Store(path, ddr_bytes=60_000)
    train(st, rng)
    h = ckpt.checkpoint(st, root, "incremental", 32, wait=True)
    assert h.kind == "full" and "first checkpoint" in h.reason
    st.restore(p2)
    train(st, rng)
    h = ckpt.checkpoint(st, root, "incremental", 32, wait=True)
    assert h.kind == "cumulative" and h.wait()["parent"] == os.path.basename(p2)
    st.create_table(ts.TableSpec("new", 10, 2))
    h = ckpt.checkpoint(st, root, "incremental", 32, wait=True)
    assert h.kind == "full" and "tables changed" in h.reason
    st.close()


def test_quantized_restore_and_bits_raised_after_restore(tmp_path, rng):
    st = make_store(tmp_path / "s", ddr_bytes=1 << 22)
    train(st, rng, 5)
    before = dump(st)
    p = st.checkpoint(tmp_path / "ck", bits=4, quant="adaptive", state_dtype="fp16", wait=True)
    man = ckpt.wait(st)
    assert man["scheme"] == {"kind": "adaptive", "bits": 4} and man["state_dtype"] == "fp16"
    train(st, rng)
    res = st.restore(p)
    after = dump(st)
    for t in before:
        rows, w0, s0 = before[t]
        assert np.array_equal(after[t][0], rows)
        w0 = w0.astype(np.float32)
        err = quant.row_errors(w0, after[t][1]).mean()
        assert 0 < err < 0.15, (t, err)  # 4-bit adaptive: ~8% per row
        bad = ~np.isclose(after[t][2], s0, rtol=1e-3, atol=1e-6)  # fp16 subnormals
        assert not bad.any(), (t, after[t][2][bad][:5], s0[bad][:5])  # fp16 state
    assert res["restores"] == 1
    h = ckpt.checkpoint(st, tmp_path / "ck", bits=4, wait=True)
    assert h.kind == "full" and "scheme changed" in h.reason
    assert h.wait()["scheme"] == {"kind": "adaptive", "bits": quant.raise_bits(4, 1)}
    assert writer.effective_bits("auto", 1, 0) == quant.choose_bits(1)
    assert writer.effective_bits(4, None, 2) == quant.raise_bits(quant.raise_bits(4, 1), 2)
    assert writer.effective_bits(32, None, 5) == 32
    st.close()


def test_float16_table_fp32_scheme_is_lossless(tmp_path, rng):
    st = ts.Store(tmp_path / "s", ddr_bytes=1 << 20)
    st.create_table(ts.TableSpec("h", 300, 6, dtype="float16", optimizer=ts.SGD(lr=0.5)))
    st.apply_gradients("h", torch.arange(100), torch.randn(100, 6))
    before = dump(st)
    p = st.checkpoint(tmp_path / "ck", bits=32, wait=True)
    assert ckpt.wait(st)["tables"]["h"]["scheme"]["kind"] == "fp16"
    st.apply_gradients("h", torch.arange(100), torch.randn(100, 6))
    st.restore(p)
    same(dump(st), before)
    st.close()


def test_extra_state_round_trip(tmp_path, rng):
    """Dense parameters, the dense optimizer's state and the reader position come back through
    torch.distributed.checkpoint, as saved when the checkpoint was taken."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    st = make_store(tmp_path / "s")
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_avg = opt.state[model.weight]["exp_avg"].clone()
    p = st.checkpoint(tmp_path / "ck", extra_state={"model": msd, "optim": osd,
                                                    "reader": {"epoch": 2, "offset": 12345}},
                      step=77, reader={"offset": 12345})
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the write runs: the copy is unaffected
    ckpt.wait(st)
    res = st.restore(p)
    assert res["step"] == 77 and res["reader"] == {"offset": 12345}
    extra = res["extra_state"]
    assert extra["reader"] == {"epoch": 2, "offset": 12345}
    m2 = torch.nn.Linear(4, 3)
    o2 = torch.optim.Adam(m2.parameters())
    set_state_dict(m2, o2, model_state_dict=extra["model"], optim_state_dict=extra["optim"])
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k])
    assert torch.equal(o2.state[m2.weight]["exp_avg"], want_avg)
    # with a template, DCP loads in place
    tmpl = {"model": torch.nn.Linear(4, 3).state_dict(), "optim": osd,
            "reader": {"epoch": 0, "offset": 0}}
    res = st.restore(p, extra_state=tmpl)
    assert res["extra_state"] is tmpl and torch.equal(tmpl["model"]["weight"], want["weight"])
    st.close()


def test_async_handle_and_one_writer(tmp_path, rng):
    st = make_store(tmp_path / "s")
    train(st, rng)
    h1 = ckpt.checkpoint(st, tmp_path / "ck", "consecutive", 8)
    assert os.path.dirname(h1.path) == str(tmp_path / "ck")
    train(st, rng)
    h2 = ckpt.checkpoint(st, tmp_path / "ck", "consecutive", 8)  # waits for h1's write first
    assert h1.done()
    assert h2.wait()["parent"] == h1.name and h2.kind == "delta"
    assert h1.stall_s > 0 and set(h1.snapshot) >= {"take_modified_s", "read_rows_s"}
    assert h1.stats["bytes"] == h1.wait()["bytes"] > 0
    other = ts.Store(tmp_path / "s2", ddr_bytes=1 << 20)
    other.create_table(ts.TableSpec("x", 10, 2))
    lock = ckpt.format.RootLock(str(tmp_path / "ck"))  # another writer holds the root
    with pytest.raises(ckpt.CheckpointError, match="another process"):
        other.checkpoint(tmp_path / "ck")
    lock.release()
    other.checkpoint(tmp_path / "ck", wait=True)
    other.close()
    st.close()


def test_retention_keeps_last_chains(tmp_path, rng):
    st = make_store(tmp_path / "s")
    root = tmp_path / "ck"
    for i in range(7):
        train(st, rng)
        st.checkpoint(root, policy="full" if i % 3 == 0 else "consecutive", bits=8, keep=2,
                      wait=True)
    # kinds: F d d F? no: a policy change starts a baseline -> F F d F F d F
    rows = ckpt.list_checkpoints(root)
    chains = {r["baseline"] for r in rows}
    assert len(chains) == 2 and all(r["restorable"] for r in rows)
    assert rows[-1]["name"] == "ckpt-000007"
    ckpt.apply_retention(str(root), 1)
    assert [r["name"] for r in ckpt.list_checkpoints(root)] == ["ckpt-000007"]
    assert ckpt.verify_root(root)["ok"]
    st.close()


def test_bad_arguments_change_nothing(tmp_path, rng):
    st = make_store(tmp_path / "s")
    train(st, rng)
    for kw, err in [({"policy": "sometimes"}, ValueError), ({"bits": 5}, ValueError),
                    ({"quant": "magic"}, ValueError), ({"state_dtype": "int8"}, ValueError),
                    ({"keep": 0}, ValueError), ({"rebaseline_at": 0.5, "policy": "full"}, ValueError),
                    ({"extra_state": [1]}, TypeError)]:
        with pytest.raises(err):
            st.checkpoint(tmp_path / "ck", **kw)
    assert ckpt.list_checkpoints(tmp_path / "ck") == []
    # modifications were not consumed: an incremental chain still sees them
    assert len(st.take_modified("a")) > 0
    with pytest.raises(ckpt.CorruptCheckpoint, match="missing"):
        st.restore(tmp_path / "nowhere")
    st.close()


def test_restore_refuses_conflicting_spec(tmp_path, rng):
    st = make_store(tmp_path / "s")
    train(st, rng)
    p = st.checkpoint(tmp_path / "ck", bits=32, wait=True)
    st.close()
    other = ts.Store(tmp_path / "o", ddr_bytes=1 << 20)
    other.create_table(ts.TableSpec("a", ROWS, 4))  # same name, other shape
    with pytest.raises(ckpt.CheckpointError, match="differs"):
        other.restore(p)
    other.drop_table("a")
    other.restore(p)  # missing tables are created from the checkpoint's specs
    assert sorted(other.tables()) == ["a", "b", "s"]
    other.close()


def test_non_row_sparse_optimizer_is_refused(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Decay(ts.SGD):
        kind: ClassVar[str] = "sgd"
        dense_decay: ClassVar[bool] = True

    with pytest.raises(ckpt.CheckpointError, match="row-sparse"):
        writer.check_row_sparse(ts.TableSpec("d", 10, 2, optimizer=Decay(lr=0.1)))


def test_cost_model():
    """Intermittent re-baselines when the increment exceeds the cycle's average per interval
    (with a new baseline's size); consecutive deltas when they outgrow a baseline."""
    opts = PolicyOptions("intermittent")
    cyc = {"baseline_rows": 100, "increment_rows": []}
    assert decide(opts, None, cyc, 90, 90, lambda: 100).kind == "cumulative"  # first: always
    cyc["increment_rows"] = [40]
    assert decide(opts, None, cyc, 60, 30, lambda: 100).kind == "cumulative"  # 60 <= 70
    assert decide(opts, None, cyc, 75, 30, lambda: 100).kind == "full"        # 75 > 70
    assert decide(opts, "forced", cyc, 1, 1, lambda: 100).kind == "full"
    fr = PolicyOptions("intermittent", rebaseline_at=0.5)
    assert decide(fr, None, cyc, 49, 1, lambda: 100).kind == "cumulative"
    assert decide(fr, None, cyc, 50, 1, lambda: 100).kind == "full"
    cons = PolicyOptions("intermittent", increments="consecutive")
    assert decide(cons, None, {"increment_rows": [30, 30]}, 0, 30, lambda: 100).kind == "delta"
    assert decide(cons, None, {"increment_rows": [30, 30, 30]}, 0, 30, lambda: 100).kind == "full"
    assert decide(PolicyOptions("consecutive"), None, cyc, 9, 9, lambda: 1).kind == "delta"


def test_cli_save_list_verify_restore(tmp_path, rng, capsys):
    from tierstore.cli import main
    path, root = str(tmp_path / "s"), str(tmp_path / "ck")
    st = make_store(path)
    train(st, rng)
    st.close()
    assert main(["ckpt", "save", "--path", path, "--root", root, "--bits", "32"]) == 0
    st = ts.Store(path, ddr_bytes=60_000)
    want = dump(st)
    train(st, rng)
    st.close()
    assert main(["ckpt", "save", "--path", path, "--root", root, "--bits", "8",
                 "--policy", "full", "--json"]) == 0
    capsys.readouterr()
    assert main(["ckpt", "list", "--root", root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["scheme"] for r in rows] == ["fp32", "adaptive8"]
    assert main(["ckpt", "verify", "--root", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert main(["ckpt", "restore", "--path", path, rows[0]["path"], "--json"]) == 0
    st = ts.Store(path, ddr_bytes=60_000)
    same(dump(st), want)
    st.close()
    capsys.readouterr()
    assert main(["ckpt", "list", "--root", root]) == 0
    assert "ckpt-000002" in capsys.readouterr().out
    assert main(["ckpt", "verify"]) == 2


def test_bench_smoke():
    from tierstore.bench import ckpt as bench
    res = bench.run(rows=3000, dim=8, batch=32, pooling=4, steps_between=3, checkpoints=3,
                    policies=("full", "intermittent"), bits=(32, 4), quality_steps=6,
                    quality_bits=(32, 4), recon_rows=200, progress=False,
                    quality_data="synthetic:small", quality_batch=64,
                    quality_eval_samples=512)
    b = res["bytes"]
    assert set(b["configs"]) == {"full/fp32", "full/adaptive4", "intermittent/fp32",
                                 "intermittent/adaptive4"}
    assert b["configs"]["full/fp32"]["written_ratio_vs_full_fp32"] == 1.0
    assert b["configs"]["intermittent/adaptive4"]["written_ratio_vs_full_fp32"] > 1.0
    # the measured configuration takes the store's own record, the others the replay's: the
    # same training, so the same kinds and (fp32 vs fp32 of another policy aside) rows
    assert b["snapshot_mode"] == "cow" and len(b["stall_s"]) == 3
    assert b["configs"]["intermittent/adaptive4"]["kinds"] == \
        b["configs"]["intermittent/fp32"]["kinds"]
    assert len(b["snapshot_rows"]) == 3 and min(b["snapshot_rows"]) > 0
    q = res["quality"]
    assert q["job"] == "dlrm" and q["tables"] == 26 and q["restored_at"] == 3
    assert q["by_bits"]["32"]["rel_change"] == 0.0  # an exact restore changes nothing
    assert q["by_bits"]["4"]["eval_loss"] != q["eval_loss_never_restored"]  # 4 bits is lossy
    assert "adaptive4" in q["reconstruction"] and "adaptive4" in b["reconstruction"]
    assert "checks" in res and "stall_max_in_steps" in res["checks"]
    assert "checkpoints" in bench.table(res)
