"""Criteo TSV reader, bad lines, the prepared form and `tierstore data prepare`."""

import gzip
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch

from tierstore.data import (
    MISSING_ID,
    MalformedLine,
    MalformedLineWarning,
    PreparedDataset,
    TsvDataset,
    batches,
    hash_hex,
    open_dataset,
    prepare,
)
from tierstore.data.schema import hash_categorical


def random_lines(n, seed=0):
    """n Criteo lines with missing values, negative and long numbers, upper/lower-case hex."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        f = [str(int(rng.integers(0, 2)))]
        for _ in range(13):
            r = rng.random()
            f.append("" if r < 0.2 else str(int(rng.integers(-3, 0))) if r < 0.25 else
                     str(int(rng.integers(0, 10 ** int(rng.integers(1, 12))))))
        for _ in range(26):
            r = rng.random()
            v = int(rng.integers(0, 1 << 32))
            f.append("" if r < 0.15 else format(v, "08X") if r < 0.2 else
                     format(v, "x") if r < 0.3 else format(v, "08x"))
        lines.append("\t".join(f))
    return lines


def reference(lines):
    """The format as the docs state it, one line at a time in plain Python."""
    labels, dense, sparse = [], [], []
    for line in lines:
        f = line.split("\t")
        labels.append(float(f[0]))
        dense.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in f[1:14]])
        sparse.append([hash_hex(x, k) for k, x in enumerate(f[14:])])
    return (np.array(labels, np.float32), np.array(dense, np.float32),
            np.array(sparse, np.int64))


def read_all(ds):
    chunks = [c for _, c in ds.chunks(ds.start(0)[0])]
    return (np.concatenate([c.labels for c in chunks]),
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([np.stack(c.sparse, 1) for c in chunks]))


def write(path, lines, gz=False, end="\n"):
    data = ("".join(line + end for line in lines)).encode()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    return str(path)


@pytest.mark.parametrize("gz", [False, True])
def test_reader_matches_reference_plain_and_gzip(tmp_path, gz):
    lines = random_lines(300)
    path = write(tmp_path / "a.tsv", lines, gz=gz)
    ds = open_dataset(path)
    assert isinstance(ds, TsvDataset) and ds.gzip == gz
    want = reference(lines)
    for block_bytes in (1 << 19, 700):  # whole file, and lines straddling blocks
        ds = TsvDataset(path, block_bytes=block_bytes)
        got = read_all(ds)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert ds.lines == 300 and ds.malformed == 0


def test_missing_values_and_negative_counts(tmp_path):
    empty = "\t".join(["0"] + [""] * 39)
    neg = "\t".join(["1", "-5", "7"] + [""] * 11 + ["ab"] + [""] * 25)
    labels, dense, sparse = read_all(TsvDataset(write(tmp_path / "m.tsv", [empty, neg])))
    np.testing.assert_array_equal(labels, [0, 1])
    assert (dense[0] == 0).all() and (sparse[0] == MISSING_ID).all()
    assert dense[1, 0] == 0.0 and dense[1, 1] == np.float32(math.log(8))  # -5 clamped to 0
    assert sparse[1, 0] == hash_hex("ab", 0) != MISSING_ID
    assert (sparse[1, 1:] == MISSING_ID).all()


def test_crlf_and_no_final_newline(tmp_path):
    lines = random_lines(20, seed=3)
    want = reference(lines)
    crlf = write(tmp_path / "crlf.tsv", lines, end="\r\n")
    bare = tmp_path / "bare.tsv"
    bare.write_text("\n".join(lines))
    for p in (crlf, str(bare)):
        for g, w in zip(read_all(TsvDataset(p, block_bytes=333)), want):
            np.testing.assert_array_equal(g, w)


def test_hash_is_fixed_and_per_feature():
    # pinned: changing these is a new HASH_VERSION (prepared data would no longer match)
    assert hash_hex("68fd1e64", 0) == 2691159853848480025
    assert hash_hex("68fd1e64", 1) == 9152763211133697352
    assert hash_hex("68FD1E64", 0) == hash_hex("068fd1e64", 0) == hash_hex("68fd1e64", 0)
    assert hash_hex("", 5) == MISSING_ID
    ids = hash_categorical(np.arange(10000, dtype=np.uint64), 3)
    assert (ids > 0).all() and len(np.unique(ids)) == 10000


def test_long_fields(tmp_path):
    f = ["1", "123456789012345678"] + ["99999999"] * 12 + ["ffffffffffffffff", "123456789"] + ["1"] * 24
    labels, dense, sparse = read_all(TsvDataset(write(tmp_path / "l.tsv", ["\t".join(f)])))
    assert dense[0, 0] == np.float32(math.log1p(123456789012345678))
    assert sparse[0, 0] == hash_hex("ffffffffffffffff", 0)
    assert sparse[0, 1] == hash_hex("123456789", 1)


BAD = {
    3: ("0\t1\t2", "wrong field count (3, expected 40)"),
    5: ("\t".join(["2"] + ["1"] * 13 + ["a"] * 26), "label '2' is not 0 or 1"),
    6: ("\t".join(["1"] + ["1"] * 4 + ["1.5"] + ["1"] * 8 + ["a"] * 26), "dense feature int_4 '1.5'"),
    7: ("\t".join(["1"] + ["1"] * 12 + ["-"] + ["a"] * 26), "dense feature int_12 '-'"),
    9: ("\t".join(["0"] + ["1"] * 13 + ["a"] * 7 + ["xyz"] + ["a"] * 18), "categorical feature cat_7 'xyz'"),
    10: ("\t".join(["0"] + ["1"] * 13 + ["a"] * 25 + ["1" * 17]), "categorical feature cat_25"),
    11: ("", "wrong field count (1, expected 40)"),
}


def with_bad_lines(n=12):
    good = iter(random_lines(n))
    return [BAD[i][0] if i in BAD else next(good) for i in range(1, n + 1)]


@pytest.mark.parametrize("block_bytes", [1 << 19, 300])
def test_malformed_lines_counted_skipped_and_named(tmp_path, block_bytes):
    lines = with_bad_lines()
    path = write(tmp_path / "bad.tsv", lines)
    ds = TsvDataset(path, block_bytes=block_bytes)
    with pytest.warns(MalformedLineWarning) as rec:
        labels, dense, sparse = read_all(ds)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == len(BAD)
    for (line, (_, why)), msg in zip(sorted(BAD.items()), msgs):
        assert f"line {line}: " in msg and why in msg, msg
    assert ds.malformed == len(BAD) and ds.lines == 12
    good = [ln for i, ln in enumerate(lines, 1) if i not in BAD]
    for g, w in zip((labels, dense, sparse), reference(good)):
        np.testing.assert_array_equal(g, w)


def test_malformed_warnings_capped_with_summary(tmp_path):
    lines = random_lines(5) + ["junk"] * 40
    ds = TsvDataset(write(tmp_path / "many.tsv", lines), max_warnings=3)
    with pytest.warns(MalformedLineWarning) as rec:
        read_all(ds)
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 4
    assert "line 6:" in msgs[0] and "line 8:" in msgs[2]
    assert "skipped 40 malformed lines of 45" in msgs[3] and "6, 7, 8" in msgs[3]


def test_strict_raises_naming_the_line(tmp_path):
    path = write(tmp_path / "bad.tsv", with_bad_lines())
    with pytest.raises(MalformedLine, match=r"bad\.tsv: line 3: wrong field count"):
        read_all(open_dataset(path, strict=True))


def test_tsv_split_by_line_number(tmp_path):
    lines = random_lines(35)
    path = write(tmp_path / "s.tsv", lines)
    want = reference(lines)[2]
    ev = read_all(TsvDataset(path, split="eval"))[2]
    tr = read_all(TsvDataset(path, split="train"))[2]
    np.testing.assert_array_equal(ev, want[[9, 19, 29]])
    assert len(tr) == 32
    with pytest.raises(ValueError, match="valid: all, train, eval"):
        TsvDataset(path, split="test")


@pytest.mark.parametrize("gz", [False, True])
def test_prepare_round_trip_equals_direct_reading(tmp_path, gz):
    lines = random_lines(250, seed=1)
    src = write(tmp_path / "src.tsv", lines, gz=gz)
    out = str(tmp_path / "prep")
    m = prepare(src, out, shard_rows=100, progress=False)
    assert [s["rows"] for s in m["shards"]] == [100, 100, 50]
    assert m["rows"] == 250 and m["source"]["lines"] == 250 and m["hash"] == "splitmix64-v1"
    ds = open_dataset(out)
    assert isinstance(ds, PreparedDataset) and ds.num_samples == 250
    direct = list(batches(open_dataset(src), 64))
    prepared = list(batches(ds, 64))
    assert len(direct) == len(prepared) == 4
    for a, b in zip(direct, prepared):
        for k in ("values", "lengths", "offsets", "dense", "labels"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
    ev = open_dataset(out, split="eval")
    tr = open_dataset(out, split="train")
    assert ev.num_samples == 50 and tr.num_samples == 200
    last = next(iter(batches(ev, 50)))
    assert torch.equal(last.labels, torch.from_numpy(reference(lines)[0][200:]))


def test_prepare_refuses_existing_out_and_leaves_nothing_when_strict_fails(tmp_path):
    src = write(tmp_path / "bad.tsv", with_bad_lines())
    out = tmp_path / "prep"
    with pytest.raises(MalformedLine, match="line 3"):
        prepare(src, str(out), strict=True, progress=False)
    assert os.listdir(tmp_path) == ["bad.tsv"]
    with pytest.warns(MalformedLineWarning):
        m = prepare(src, str(out), progress=False)
    assert m["rows"] == 12 - len(BAD) and m["source"]["malformed"] == len(BAD)
    assert m["source"]["first_malformed"] == sorted(BAD)
    with pytest.raises(FileExistsError):
        prepare(src, str(out), progress=False)
    with pytest.raises(ValueError, match="smaller --shard-rows"):
        open_dataset(str(out), split="eval")


def test_cli_data_prepare(tmp_path, capsys):
    from tierstore.cli import main
    src = write(tmp_path / "bad.tsv", with_bad_lines(30))
    out = str(tmp_path / "prep")
    assert main(["data", "prepare", src, out, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "line 3: wrong field count" in err and not os.path.exists(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command reports warnings itself
        assert main(["data", "prepare", src, out, "--shard-rows", "10", "--json"]) == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["rows"] == 30 - len(BAD) and res["shards"] == 3 and res["malformed"] == len(BAD)
    assert "warning:" in cap.err and "line 9: categorical feature cat_7" in cap.err
    assert main(["data", "prepare", src, out]) == 2
    assert "exists" in capsys.readouterr().err


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthetic"):
        open_dataset(str(tmp_path / "nope.tsv"))
    with pytest.raises(FileNotFoundError, match="data prepare"):
        open_dataset(str(tmp_path))
