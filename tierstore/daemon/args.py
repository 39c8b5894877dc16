"""Command line of ``tierstored``: flags over an optional TOML file -> :class:`ServiceConfig`.

    cfg = parse(sys.argv[1:])   # argparse errors exit 2; a bad configuration raises ConfigError
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence

from tierstore.daemon.config import (
    FILE_KEYS,
    KEY_HELP,
    LOG_LEVELS,
    SERVICE_POLICIES,
    ConfigError,
    ServiceConfig,
    from_sources,
    parse_bytes,
)

DESCRIPTION = """\
tierstored: the per-host tierstore service. One process owns the store in --data-dir (DRAM
cache of --ddr-bytes over SCM row files) and serves clients on a unix socket in --run-dir,
request payloads travelling through a per-client shared-memory mailbox.

Settings come from --config FILE (TOML) and flags; a flag overrides the file. run_dir,
data_dir and ddr_bytes are required (as flags or keys).

SIGTERM or SIGINT stop the service cleanly: dirty DRAM rows are written back to SCM and the
store is flushed before the process exits."""

EXAMPLE = """\
minimal example:
  tierstored --run-dir /run/tierstored --data-dir /var/lib/tierstore --ddr-bytes 4GiB

  or, with /etc/tierstore.toml holding
      run_dir = "/run/tierstored"
      data_dir = "/var/lib/tierstore"
      ddr_bytes = "4GiB"
      [[tables]]
      name = "user"
      num_rows = 1_000_000_000
      dim = 64
      optimizer = { kind = "rowwise_adagrad", lr = 0.01, eps = 1e-8 }
  tierstored --config /etc/tierstore.toml --log-level debug

(a commented example with two tables: examples/tierstore.toml)"""


def _keys_text() -> str:
    lines = [("config file keys (TOML; byte sizes as integers or strings like \"512MiB\", "
              "\"4GiB\", \"1GB\"):")]
    width = max(len(k) for k in KEY_HELP) + 2
    for key, text in KEY_HELP.items():
        body = textwrap.wrap(text, 96 - width - 2) or [""]
        lines.append(f"  {key:<{width}}{body[0]}")
        lines.extend(" " * (width + 2) + b for b in body[1:])
    return "\n".join(lines)


def _bytes_arg(s: str) -> int:
    try:
        return parse_bytes(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The ``tierstored`` argument parser; every flag defaults to None (= not given)."""
    p = argparse.ArgumentParser(prog="tierstored", description=DESCRIPTION,
                                epilog=_keys_text() + "\n\n" + EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (keys below)")
    p.add_argument("--run-dir", metavar="DIR", help=KEY_HELP["run_dir"])
    p.add_argument("--data-dir", metavar="DIR", help=KEY_HELP["data_dir"])
    p.add_argument("--ddr-bytes", metavar="N", type=_bytes_arg, help=KEY_HELP["ddr_bytes"])
    p.add_argument("--policy", choices=SERVICE_POLICIES, help=KEY_HELP["policy"])
    p.add_argument("--max-batch", metavar="N", type=_positive_int, help=KEY_HELP["max_batch"])
    p.add_argument("--mailbox-bytes", metavar="N", type=_bytes_arg,
                   help=KEY_HELP["mailbox_bytes"])
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, help=KEY_HELP["log_level"])
    return p


def parse(argv: Sequence[str] | None = None) -> ServiceConfig:
    """The configuration from ``argv`` (default ``sys.argv[1:]``) and the --config file.

    Bad flags exit 2 through argparse (with usage); a bad or incomplete configuration raises
    ConfigError for the caller to print.
    """
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    overrides = {k: getattr(ns, k) for k in FILE_KEYS if k != "tables"}
    return from_sources(ns.config, overrides)
