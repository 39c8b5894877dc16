"""Configuration of the ``tierstored`` service: a TOML file, overridden by command-line flags.

    cfg = from_sources("/etc/tierstore.toml", {"log_level": "debug"})   # -> ServiceConfig
    cfg.socket_path, cfg.pid_path                                       # inside cfg.run_dir

The file is flat TOML: the settings below as top-level keys, plus one ``[[tables]]`` entry per
table the service creates at start when it is missing (see ``examples/tierstore.toml``)::

    run_dir = "/run/tierstored"
    data_dir = "/var/lib/tierstore"
    ddr_bytes = "4GiB"

    [[tables]]
    name = "user"
    num_rows = 1_000_000_000
    dim = 64
    optimizer = { kind = "rowwise_adagrad", lr = 0.01, eps = 1e-8 }

Byte sizes (``ddr_bytes``, ``mailbox_bytes``) are integers or strings with a unit: "512MiB",
"4GiB", "1GB", "100000". Relative paths in the file are relative to the file's directory; those
given as flags are relative to the working directory. Every mistake raises :class:`ConfigError`
naming the key (or flag) and the file it came from; nothing is created here (the server makes
``run_dir`` with mode 0700 and opens the store in ``data_dir``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import tomllib

from tierstore.cache import POLICIES
from tierstore.config import TableSpec
from tierstore.errors import TierstoreError
from tierstore.optim.sparse import OPTIMIZERS, SparseOptimizer, optimizer_from_dict

SOCKET_NAME = "tierstored.sock"
PID_NAME = "tierstored.pid"
DEFAULT_MAILBOX_BYTES = 64 << 20
DEFAULT_MAX_BATCH = 1 << 20
ID_BYTES = 8  # an id travels as int64: a mailbox holds at least max_batch of them
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# belady is an offline oracle (it needs the whole future trace); Store refuses it too
SERVICE_POLICIES = tuple(p for p in POLICIES if p != "belady")
_SUN_PATH_MAX = 107  # AF_UNIX sun_path is 108 bytes on Linux, NUL included

FILE_KEYS = ("run_dir", "data_dir", "ddr_bytes", "policy", "max_batch", "mailbox_bytes",
             "log_level", "tables")
TABLE_KEYS = ("name", "num_rows", "dim", "dtype", "optimizer", "init", "seed", "id_space")
REQUIRED = ("run_dir", "data_dir", "ddr_bytes")
FLAGS = {k: "--" + k.replace("_", "-") for k in FILE_KEYS if k != "tables"}

_UNITS = {"": 1, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")

KEY_HELP: dict[str, str] = {
    "run_dir": "directory of the control socket (tierstored.sock) and pid file "
               "(tierstored.pid); created with mode 0700. Required.",
    "data_dir": "the store directory (SCM row files, LMDB catalog); created if missing. "
                "Required.",
    "ddr_bytes": "DRAM budget for all tables' caches: an integer or a string with a unit "
                 "(\"512MiB\", \"4GiB\", \"1GB\"). Required.",
    "policy": f"cache policy for tables larger than their DRAM share: "
              f"{', '.join(SERVICE_POLICIES)} (default adaptive).",
    "max_batch": f"most ids one request may carry; bigger batches are refused "
                 f"(default {DEFAULT_MAX_BATCH}).",
    "mailbox_bytes": "per-client shared-memory buffer for request payloads, with units like "
                     "ddr_bytes; at least 8 x max_batch (default max(64MiB, 8 x max_batch)).",
    "log_level": f"{', '.join(LOG_LEVELS)} (default info).",
    "tables": "[[tables]] entries: tables created at start when missing (existing tables are "
              "opened as they are).",
    "tables.name": "table name: 1-64 characters of [A-Za-z0-9_.-]. Required.",
    "tables.num_rows": "rows of a dense table (ids in [0, num_rows)); size hint for a sparse "
                       "one. Required.",
    "tables.dim": "row width, 1-65536. Required.",
    "tables.dtype": "float32 (default) or float16.",
    "tables.optimizer": "e.g. { kind = \"rowwise_adagrad\", lr = 0.01, eps = 1e-8 }; kinds and "
                        "their keys: rowwise_adagrad (lr, eps, weight_decay), adagrad (lr, eps),"
                        " sgd (lr); a kind string alone takes the defaults (default sgd, lr "
                        "0.01).",
    "tables.init": "rows never written: uniform (default), normal or zeros.",
    "tables.seed": "seed of the generated initial rows (default 0).",
    "tables.id_space": "dense (default; ids < num_rows) or sparse (any non-negative int64 id).",
}


class ConfigError(TierstoreError, ValueError):
    """A tierstored configuration that cannot be used (names the key or flag and the file)."""


def _keyed(e: ConfigError, *keys: str) -> ConfigError:
    e.keys = keys  # the settings at fault, for from_sources to say where they came from
    return e


class _Bad(Exception):
    """A value's problem, before it is told where the value came from."""


# -- values -----------------------------------------------------------------------------------
def parse_bytes(s: Any) -> int:
    """A positive byte count from an int or a string such as "512MiB", "4GiB", "1GB", "1.5GiB",
    "100000" (units B, KB/MB/GB/TB = 10**3.., KiB/MiB/GiB/TiB = 2**10.., case-insensitive).
    Raises ConfigError."""
    try:
        return _bytes(s)
    except _Bad as e:
        raise ConfigError(str(e)) from None


def _bytes(s: Any) -> int:
    if isinstance(s, bool):
        raise _Bad(f"expected a byte count, got {s!r}")
    if isinstance(s, float):
        if not math.isfinite(s) or not s.is_integer():
            raise _Bad(f"expected a whole number of bytes, got {s!r}")
        s = int(s)
    if isinstance(s, int):
        n = s
    elif isinstance(s, str):
        m = _BYTES_RE.match(s)
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None:
            raise _Bad(f"expected a byte count such as 100000, \"512MiB\", \"4GiB\" or \"1GB\" "
                       f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {s!r}")
        exact = Fraction(m.group(1)) * unit
        if exact.denominator != 1:
            raise _Bad(f"{s!r} is not a whole number of bytes")
        n = int(exact)
    else:
        raise _Bad(f"expected a byte count (an integer or a string like \"4GiB\"), "
                   f"got {type(s).__name__} {s!r}")
    if not 0 < n < 1 << 63:
        raise _Bad(f"a byte count must be positive (and below 2**63), got {s!r}")
    return n


def _path(v: Any) -> str:
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise _Bad(f"expected a directory path, got {v!r}")
    return os.fspath(v)


def _positive_int(v: Any) -> int:
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise _Bad(f"expected a positive integer, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _Bad(f"expected a positive integer, got {v!r}")
    return v


def _policy(v: Any) -> str:
    if v == "belady":
        raise _Bad(f"'belady' is an offline oracle (it needs the future trace) and cannot serve "
                   f"requests; valid: {', '.join(SERVICE_POLICIES)}")
    if not isinstance(v, str) or v not in SERVICE_POLICIES:
        raise _Bad(f"unknown cache policy {v!r}; valid: {', '.join(SERVICE_POLICIES)}")
    return v


def _log_level(v: Any) -> str:
    if not isinstance(v, str) or v.lower() not in LOG_LEVELS:
        raise _Bad(f"unknown log level {v!r}; valid: {', '.join(LOG_LEVELS)}")
    return v.lower()


def _unknown(key: str, valid: tuple[str, ...] | list[str]) -> str:
    near = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown key {key!r}{hint}; valid keys: {', '.join(valid)}"


def _optimizer(v: Any) -> SparseOptimizer:
    if isinstance(v, SparseOptimizer):
        return v
    if isinstance(v, str):
        v = {"kind": v}
    if not isinstance(v, Mapping):
        raise _Bad(f"optimizer: expected a table like {{ kind = \"rowwise_adagrad\", lr = 0.01 }}"
                   f" or a kind string, got {v!r}")
    kind = v.get("kind")
    if kind is None:
        raise _Bad(f"optimizer: missing 'kind' (one of {', '.join(OPTIMIZERS)})")
    if not isinstance(kind, str) or kind not in OPTIMIZERS:
        raise _Bad(f"optimizer: unknown kind {kind!r}; valid: {', '.join(OPTIMIZERS)}")
    params = [f.name for f in dataclasses.fields(OPTIMIZERS[kind])]
    for k in v:
        if k != "kind" and k not in params:
            raise _Bad(f"optimizer ({kind}): " + _unknown(k, ["kind", *params]))
    try:
        return optimizer_from_dict(dict(v))
    except (TypeError, ValueError) as e:
        raise _Bad(f"optimizer ({kind}): {e}") from None


def _table(entry: Any) -> TableSpec:
    if isinstance(entry, TableSpec):
        return entry
    if not isinstance(entry, Mapping):
        raise _Bad(f"expected a table of keys {', '.join(TABLE_KEYS)}, got {entry!r}")
    for k in entry:
        if k not in TABLE_KEYS:
            raise _Bad(_unknown(k, TABLE_KEYS))
    missing = [k for k in ("name", "num_rows", "dim") if k not in entry]
    if missing:
        raise _Bad(f"missing required key{'s' * (len(missing) > 1)} {', '.join(missing)}")
    kw = dict(entry)
    if "optimizer" in kw:
        kw["optimizer"] = _optimizer(kw["optimizer"])
    for k in ("dtype", "init", "id_space"):
        if k in kw and not isinstance(kw[k], str):
            raise _Bad(f"{k} must be a string, got {kw[k]!r}")
    try:
        return TableSpec(**kw)
    except (TypeError, ValueError) as e:  # InvalidSpec is a ValueError
        raise _Bad(str(e)) from None


def _table_label(entry: Any, i: int) -> str:
    name = entry.get("name") if isinstance(entry, Mapping) else getattr(entry, "name", None)
    return f"[[tables]] #{i + 1}" + (f" ({name!r})" if isinstance(name, str) else "")


def _tables(v: Any) -> tuple[TableSpec, ...]:
    if isinstance(v, (str, bytes, Mapping)) or not hasattr(v, "__iter__"):
        raise _Bad(f"expected a list of tables ([[tables]] entries), got {v!r}")
    out: list[TableSpec] = []
    for i, entry in enumerate(v):
        try:
            spec = _table(entry)
        except _Bad as e:
            raise _Bad(f"{_table_label(entry, i)}: {e}") from None
        if any(s.name == spec.name for s in out):
            raise _Bad(f"{_table_label(entry, i)}: table name {spec.name!r} appears twice")
        out.append(spec)
    return tuple(out)


_NORMALIZE = {
    "run_dir": _path,
    "data_dir": _path,
    "ddr_bytes": _bytes,
    "policy": _policy,
    "max_batch": _positive_int,
    "mailbox_bytes": lambda v: None if v is None else _bytes(v),
    "log_level": _log_level,
    "tables": _tables,
}


# -- the configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``tierstored`` needs to start; validated on construction (ConfigError).

    ``ddr_bytes``/``mailbox_bytes`` may be given as strings with units and are stored as ints;
    ``mailbox_bytes=None`` means max(64 MiB, 8 x max_batch); ``tables`` may be given as
    TableSpecs or dicts of ``[[tables]]`` keys and is stored as a tuple of TableSpec.
    """

    run_dir: str
    data_dir: str
    ddr_bytes: int
    policy: str = "adaptive"
    max_batch: int = DEFAULT_MAX_BATCH
    mailbox_bytes: int | None = None
    log_level: str = "info"
    tables: tuple[TableSpec, ...] = ()

    def __post_init__(self) -> None:
        for key, norm in _NORMALIZE.items():
            try:
                object.__setattr__(self, key, norm(getattr(self, key)))
            except _Bad as e:
                raise ConfigError(f"{key}: {e}") from None
        if self.mailbox_bytes is None:
            object.__setattr__(self, "mailbox_bytes",
                               max(DEFAULT_MAILBOX_BYTES, ID_BYTES * self.max_batch))
        elif self.mailbox_bytes < ID_BYTES * self.max_batch:
            raise _keyed(ConfigError(
                f"mailbox_bytes ({self.mailbox_bytes}) cannot hold a request of max_batch "
                f"({self.max_batch}) int64 ids; give mailbox_bytes >= "
                f"{ID_BYTES * self.max_batch} or a smaller max_batch"),
                "max_batch", "mailbox_bytes")
        if len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise _keyed(ConfigError(
                f"run_dir: {self.run_dir!r} is too long for a unix socket path "
                f"({self.socket_path!r} is over {_SUN_PATH_MAX} bytes); choose a shorter "
                f"directory"), "run_dir")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.run_dir, SOCKET_NAME)

    @property
    def pid_path(self) -> str:
        return os.path.join(self.run_dir, PID_NAME)


# -- sources ----------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict, its keys (top level and ``[[tables]]``) checked.

    Values are checked by :func:`from_sources`. Raises ConfigError (missing or unreadable file,
    invalid TOML, unknown key: the message names the key and the file).
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {p!r} cannot be read: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p!r} is not valid TOML: {e}") from None
    for k in data:
        if k not in FILE_KEYS:
            raise ConfigError(f"{p}: {_unknown(k, FILE_KEYS)}")
    tables = data.get("tables", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{p}: tables must be [[tables]] entries (an array of tables), "
                          f"got {tables!r}")
    for i, t in enumerate(tables):
        for k in t:
            if k not in TABLE_KEYS:
                raise ConfigError(f"{p}: {_table_label(t, i)}: {_unknown(k, TABLE_KEYS)}")
    return data


def from_sources(toml_path: str | os.PathLike | None,
                 overrides: Mapping[str, Any] | None = None) -> ServiceConfig:
    """The service configuration: the TOML file (if any), then ``overrides`` on top.

    ``overrides`` maps setting names (``run_dir``, ``ddr_bytes``, ... as in the file; the
    command-line flags) to values; ``None`` values are ignored, so parsed flags can be passed
    as they are. Relative paths from the file are resolved against its directory, from
    overrides against the working directory. Raises ConfigError naming the key or flag.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    base = os.getcwd()
    if toml_path is not None:
        path = os.path.abspath(os.fspath(toml_path))
        data = load(path)
        for k, v in data.items():
            values[k] = v
            where[k] = path if k == "tables" else f"{path}: {k}"  # entries name themselves
        file_base = os.path.dirname(path)
        for k in ("run_dir", "data_dir"):
            if isinstance(values.get(k), str) and values[k]:
                values[k] = os.path.join(file_base, os.path.expanduser(values[k]))
    for k, v in (overrides or {}).items():
        if k not in FILE_KEYS:
            raise ConfigError(f"overrides: {_unknown(k, FILE_KEYS)}")
        if v is None:
            continue
        if k in ("run_dir", "data_dir") and isinstance(v, (str, os.PathLike)) and os.fspath(v):
            v = os.path.join(base, os.path.expanduser(os.fspath(v)))
        values[k] = v
        where[k] = FLAGS.get(k, k)
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        how = "; ".join(f"{k}: give {FLAGS[k]} or set {k} in the config file" for k in missing)
        more = "" if toml_path is not None else " (--config FILE reads a TOML file)"
        raise ConfigError(f"missing required setting{'s' * (len(missing) > 1)}: {how}{more}")
    for k, v in values.items():
        try:
            values[k] = _NORMALIZE[k](v)
        except _Bad as e:
            raise ConfigError(f"{where[k]}: {e}") from None
    for k in ("run_dir", "data_dir"):
        values[k] = os.path.normpath(values[k])
    try:
        return ServiceConfig(**values)
    except ConfigError as e:  # checks across keys: say where those keys came from
        sources = ", ".join(f"{k} from {where[k]}" for k in getattr(e, "keys", ()) if k in where)
        raise ConfigError(f"{e} [{sources}]" if sources else str(e)) from None
