"""tierstored configuration: TOML file + flags -> ServiceConfig; every error names its culprit."""

import dataclasses
import os
from pathlib import Path

import pytest

import tierstore as ts
from tierstore.daemon import args
from tierstore.daemon.config import (
    FILE_KEYS,
    KEY_HELP,
    TABLE_KEYS,
    ConfigError,
    ServiceConfig,
    from_sources,
    load,
    parse_bytes,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tierstore.toml"
MINIMAL = 'run_dir = "run"\ndata_dir = "data"\nddr_bytes = "1GiB"\n'


def write(tmp_path, text, name="ts.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def config_error(toml_path, overrides=None):
    with pytest.raises(ConfigError) as e:
        from_sources(toml_path, overrides or {})
    return str(e.value)


# -- what works --------------------------------------------------------------------------------
def test_example_config_parses_into_two_tables():
    cfg = from_sources(str(EXAMPLE), {})
    assert cfg.run_dir == "/run/tierstored" and cfg.data_dir == "/var/lib/tierstore"
    assert cfg.ddr_bytes == 4 << 30 and cfg.policy == "adaptive" and cfg.log_level == "info"
    assert cfg.max_batch == 1 << 20 and cfg.mailbox_bytes == 64 << 20
    assert cfg.socket_path == "/run/tierstored/tierstored.sock"
    assert cfg.pid_path == "/run/tierstored/tierstored.pid"
    user, item = cfg.tables
    assert user == ts.TableSpec("user", num_rows=10**9, dim=64, dtype="float32",
                                optimizer=ts.RowWiseAdagrad(lr=0.01, eps=1e-8), seed=0)
    assert item == ts.TableSpec("item", num_rows=50_000_000, dim=32, dtype="float16",
                                optimizer=ts.SGD(lr=0.05), init="normal", seed=1,
                                id_space="sparse")
    # the dict form load() returns is the file itself, keys checked only
    raw = load(EXAMPLE)
    assert raw["ddr_bytes"] == "4GiB" and [t["name"] for t in raw["tables"]] == ["user", "item"]


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + 'policy = "lru"\nmax_batch = 1000\nlog_level = "debug"\n')
    cfg = args.parse(["--config", path, "--ddr-bytes", "512MiB", "--policy", "lfu",
                      "--max-batch", "4096", "--log-level", "WARNING",
                      "--run-dir", str(tmp_path / "r2")])
    assert cfg.ddr_bytes == 512 << 20 and cfg.policy == "lfu" and cfg.max_batch == 4096
    assert cfg.log_level == "warning" and cfg.run_dir == str(tmp_path / "r2")
    # not overridden: from the file, its relative path resolved against the file's directory
    assert cfg.data_dir == str(tmp_path / "data")
    # flags alone are enough; relative flag paths resolve against the working directory
    cfg = args.parse(["--run-dir", "r", "--data-dir", "d", "--ddr-bytes", "100000"])
    assert cfg.run_dir == os.path.join(os.getcwd(), "r") and cfg.ddr_bytes == 100000
    assert cfg.tables == () and cfg.policy == "adaptive" and cfg.mailbox_bytes == 64 << 20
    # None in overrides means "flag not given": the file's value stays
    assert from_sources(path, {"policy": None, "max_batch": None}).policy == "lru"


def test_mailbox_defaults_to_hold_max_batch_and_is_configurable(tmp_path):
    path = write(tmp_path, MINIMAL)
    assert from_sources(path, {"max_batch": 16 << 20}).mailbox_bytes == 128 << 20
    assert from_sources(path, {"mailbox_bytes": "1MiB", "max_batch": 1000}).mailbox_bytes == 1 << 20
    assert args.parse(["--config", path, "--mailbox-bytes", "2GB"]).mailbox_bytes == 2 * 10**9


@pytest.mark.parametrize("text, n", [
    ("100000", 100000), (123, 123), ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("1GB", 10**9),
    ("1.5GiB", 3 << 29), ("64 kib", 64 << 10), ("2TB", 2 * 10**12), ("10B", 10), (4e9, 4 * 10**9),
])
def test_byte_units(text, n):
    assert parse_bytes(text) == n


def test_units_in_the_toml_file(tmp_path):
    path = write(tmp_path, 'run_dir = "r"\ndata_dir = "d"\nddr_bytes = 3_000_000\n'
                           'mailbox_bytes = "256MiB"\n')
    cfg = from_sources(path, {})
    assert cfg.ddr_bytes == 3_000_000 and cfg.mailbox_bytes == 256 << 20


def test_config_is_frozen_and_validated_when_built_directly():
    cfg = ServiceConfig("/r", "/d", "2GiB", tables=[{"name": "t", "num_rows": 10, "dim": 4,
                                                     "optimizer": "adagrad"}])
    assert cfg.ddr_bytes == 2 << 30 and cfg.tables[0].optimizer == ts.Adagrad()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = "lru"
    with pytest.raises(ConfigError, match="policy"):
        ServiceConfig("/r", "/d", 1 << 30, policy="fifo")


# -- every error names its culprit ---------------------------------------------------------------
def test_unknown_top_level_key_names_key_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + "ddr_byte = 5\n")
    msg = config_error(path)
    assert "'ddr_byte'" in msg and path in msg and "did you mean 'ddr_bytes'" in msg
    with pytest.raises(ConfigError, match="ddr_byte"):
        load(path)


def test_unknown_table_key_names_key_table_and_file(tmp_path):
    path = write(tmp_path, MINIMAL + '[[tables]]\nname = "user"\nnum_rows = 10\ndim = 4\n'
                                     'dims = 8\n')
    msg = config_error(path)
    assert "'dims'" in msg and "'user'" in msg and path in msg


def test_unknown_optimizer_key_is_named(tmp_path):
    path = write(tmp_path, MINIMAL + '[[tables]]\nname = "user"\nnum_rows = 10\ndim = 4\n'
                                     'optimizer = { kind = "sgd", lr = 0.1, eps = 1e-8 }\n')
    msg = config_error(path)
    assert "'eps'" in msg and "sgd" in msg and "'user'" in msg


def test_bad_policy(tmp_path):
    msg = config_error(write(tmp_path, MINIMAL + 'policy = "fifo"\n'))
    assert "'fifo'" in msg and "policy" in msg and "adaptive" in msg
    msg = config_error(write(tmp_path, MINIMAL + 'policy = "belady"\n', "b.toml"))
    assert "belady" in msg and "oracle" in msg
    with pytest.raises(SystemExit) as e:  # as a flag it is an argparse usage error
        args.parse(["--run-dir", "r", "--data-dir", "d", "--ddr-bytes", "1", "--policy", "fifo"])
    assert e.value.code == 2


def test_missing_required_says_which_flag_or_key(tmp_path):
    msg = config_error(None, {})
    for k, flag in (("run_dir", "--run-dir"), ("data_dir", "--data-dir"),
                    ("ddr_bytes", "--ddr-bytes")):
        assert k in msg and flag in msg
    msg = config_error(write(tmp_path, 'run_dir = "r"\ndata_dir = "d"\n'))
    assert "ddr_bytes" in msg and "--ddr-bytes" in msg and "run_dir" not in msg
    with pytest.raises(ConfigError, match="--data-dir"):
        args.parse(["--run-dir", "r", "--ddr-bytes", "1GiB"])


@pytest.mark.parametrize("bad", ["4G", "lots", "-1", "0", "1.5", "0.5B", "1e9", "", True, [1]])
def test_bad_bytes_strings(bad):
    with pytest.raises(ConfigError) as e:
        parse_bytes(bad)
    assert repr(bad) in str(e.value)


def test_bad_bytes_in_file_and_flags_name_the_source(tmp_path):
    path = write(tmp_path, MINIMAL.replace('"1GiB"', '"4 gigs"'))
    msg = config_error(path)
    assert "ddr_bytes" in msg and path in msg and "'4 gigs'" in msg
    msg = config_error(path, {"ddr_bytes": "1GiB", "mailbox_bytes": "lots"})
    assert "--mailbox-bytes" in msg and "'lots'" in msg
    with pytest.raises(SystemExit) as e:
        args.parse(["--config", path, "--ddr-bytes", "4G"])
    assert e.value.code == 2


@pytest.mark.parametrize("entry, culprit", [
    ('name = "user"\ndim = 4\n', "num_rows"),                                      # missing
    ('name = "user"\nnum_rows = 0\ndim = 4\n', "num_rows"),                        # out of range
    ('name = "user"\nnum_rows = 10\ndim = "4"\n', "dim"),                          # wrong type
    ('name = "user"\nnum_rows = 10\ndim = 4\ndtype = "bfloat16"\n', "dtype"),
    ('name = "user"\nnum_rows = 10\ndim = 4\ninit = "xavier"\n', "init"),
    ('name = "user"\nnum_rows = 10\ndim = 4\nid_space = "hashed"\n', "id_space"),
    ('name = "user"\nnum_rows = 10\ndim = 4\nseed = -1\n', "seed"),
    ('name = "us er"\nnum_rows = 10\ndim = 4\n', "name"),
    ('name = "user"\nnum_rows = 10\ndim = 4\noptimizer = { kind = "adam" }\n', "adam"),
    ('name = "user"\nnum_rows = 10\ndim = 4\noptimizer = { lr = 0.1 }\n', "kind"),
    ('name = "user"\nnum_rows = 10\ndim = 4\noptimizer = { kind = "sgd", lr = -1 }\n', "lr"),
    ('name = "user"\nnum_rows = 10\ndim = 4\noptimizer = 3\n', "optimizer"),
])
def test_bad_table_entry(tmp_path, entry, culprit):
    path = write(tmp_path, MINIMAL + "[[tables]]\n" + entry)
    msg = config_error(path)
    assert culprit in msg and "[[tables]] #1" in msg and path in msg


def test_duplicate_table_names_and_malformed_tables(tmp_path):
    t = '[[tables]]\nname = "user"\nnum_rows = 10\ndim = 4\n'
    msg = config_error(write(tmp_path, MINIMAL + t + t))
    assert "[[tables]] #2" in msg and "'user'" in msg and "twice" in msg
    msg = config_error(write(tmp_path, MINIMAL + 'tables = "user"\n', "b.toml"))
    assert "tables" in msg


def test_other_value_errors(tmp_path):
    msg = config_error(write(tmp_path, MINIMAL + "max_batch = 0\n"))
    assert "max_batch" in msg and "0" in msg
    msg = config_error(write(tmp_path, MINIMAL + 'log_level = "chatty"\n', "b.toml"))
    assert "log_level" in msg and "'chatty'" in msg
    msg = config_error(write(tmp_path, 'run_dir = 5\ndata_dir = "d"\nddr_bytes = 1\n', "c.toml"))
    assert "run_dir" in msg and "5" in msg
    # a mailbox that cannot carry max_batch ids: both keys and where they came from
    msg = config_error(write(tmp_path, MINIMAL + 'mailbox_bytes = "1MiB"\n', "d.toml"),
                       {"max_batch": 1 << 20})
    assert "mailbox_bytes" in msg and "max_batch from --max-batch" in msg
    assert "d.toml: mailbox_bytes" in msg and "run_dir" not in msg
    # a unix socket path has at most 107 bytes
    msg = config_error(None, {"run_dir": "/" + "x" * 120, "data_dir": "/d", "ddr_bytes": 1})
    assert "run_dir" in msg and "too long" in msg
    with pytest.raises(ConfigError, match="'verbose'"):
        from_sources(None, {"verbose": True})


def test_unreadable_or_invalid_files(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert missing in config_error(missing)
    path = write(tmp_path, "run_dir = \n")
    msg = config_error(path)
    assert path in msg and "TOML" in msg


def test_help_explains_every_key_signals_and_an_example(capsys):
    assert set(FILE_KEYS) <= set(KEY_HELP)
    assert {f"tables.{k}" for k in TABLE_KEYS} <= set(KEY_HELP)
    with pytest.raises(SystemExit) as e:
        args.parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, text in KEY_HELP.items():
        assert key in out and text.split()[0] in out
    assert "SIGTERM" in out and "SIGINT" in out and "written back" in out
    assert "tierstored --run-dir" in out and "[[tables]]" in out
