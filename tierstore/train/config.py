"""The configuration of ``tierstore train``: a recipe (TOML) whose keys flags override.

Every key has a default, so ``tierstore train`` alone runs the embedded default recipe (the
README's main job). Unknown keys and values outside the valid sets fail at startup with the
list of valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from tierstore.errors import TierstoreError

MODELS = ("dlrm", "logreg")
BACKENDS = ("torch", "embedded", "tierstored")
DENSE_OPTIMIZERS = ("shampoo", "adagrad", "adam")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "sgd")
POLICIES = ("adaptive", "lru", "lfu")


class TrainConfigError(TierstoreError, ValueError):
    """A recipe or flag that cannot be used; the message names it and the valid values."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run. See KEY_HELP for each field."""

    model: str = "dlrm"
    data: str = "synthetic:criteo_kaggle,scale=0.01"
    rows_per_table: int = 1_000_000
    strict: bool = False
    backend: str = "tierstored"
    run_dir: str | None = None
    store_dir: str | None = None
    dram_fraction: float = 0.1
    policy: str = "adaptive"
    dim: int = 16
    bottom: tuple[int, ...] = (64,)
    top: tuple[int, ...] = (64,)
    dense_optimizer: str = "shampoo"
    dense_lr: float = 0.01
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.05
    steps: int = 1_000_000
    time_limit: float | None = 110.0
    batch_size: int = 512
    eval_every: int = 0
    eval_samples: int = 32_768
    log_every: int = 20
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    checkpoint_bits: int = 8
    resume: str | None = None
    seed: int = 0
    plot: str | None = None
    out_dir: str | None = None

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)
        _choice("backend", self.backend, BACKENDS)
        _choice("dense_optimizer", self.dense_optimizer, DENSE_OPTIMIZERS)
        _choice("sparse_optimizer", self.sparse_optimizer, SPARSE_OPTIMIZERS)
        _choice("policy", self.policy, POLICIES)
        for key in ("steps", "batch_size", "dim", "eval_samples", "log_every",
                    "rows_per_table"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise TrainConfigError(f"{key} must be a positive integer, got "
                                       f"{getattr(self, key)!r}")
        for key in ("eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise TrainConfigError(f"{key} must be an integer >= 0, got "
                                       f"{getattr(self, key)!r}")
        if not 0 < self.dram_fraction <= 1:
            raise TrainConfigError(f"dram_fraction must be in (0, 1], got {self.dram_fraction}")
        for key in ("dense_lr", "sparse_lr"):
            if not getattr(self, key) > 0:
                raise TrainConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise TrainConfigError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        if self.backend == "torch" and (self.checkpoint_every or self.resume):
            raise TrainConfigError("checkpoints need a store backend (embedded or tierstored); "
                                   "the torch backend keeps its tables in this process only")
        if self.checkpoint_bits not in (2, 3, 4, 8, 16, 32):
            raise TrainConfigError(f"checkpoint_bits must be one of 2, 3, 4, 8, 16, 32, got "
                                   f"{self.checkpoint_bits}")


KEY_HELP = {
    "model": f"model to train: {', '.join(MODELS)} (logreg: logistic regression on the same "
             "features, the quality baseline)",
    "data": "synthetic[:PROFILE][,scale=S][,seed=N] (profiles: small, criteo_kaggle, meta) or "
            "a Criteo TSV(.gz) file or a directory made by `tierstore data prepare`",
    "rows_per_table": "rows per table for hashed (non-synthetic) data: ids are taken modulo it",
    "strict": "TSV data: fail on the first malformed line (default: count, warn and skip it)",
    "backend": f"where the embedding rows live: {', '.join(BACKENDS)}",
    "run_dir": "tierstored backend: run directory of a running service (default: start a "
               "private one for this run and stop it at the end)",
    "store_dir": "embedded backend / private service: store directory (default: a temporary one)",
    "dram_fraction": "store backends: DRAM budget as a fraction of all rows (rest on SCM)",
    "policy": f"cache policy of the store backends: {', '.join(POLICIES)}",
    "dim": "embedding dimension (also the bottom MLP's output)",
    "bottom": "hidden sizes of the bottom MLP (list)",
    "top": "hidden sizes of the top MLP (list)",
    "dense_optimizer": f"optimizer of the MLPs: {', '.join(DENSE_OPTIMIZERS)}",
    "dense_lr": "learning rate of the dense optimizer",
    "sparse_optimizer": f"optimizer of the tables: {', '.join(SPARSE_OPTIMIZERS)}",
    "sparse_lr": "learning rate of the sparse optimizer",
    "steps": "training steps at most",
    "time_limit": "stop training after this many seconds (none: only --steps)",
    "batch_size": "samples per step",
    "eval_every": "evaluate every N steps (0: only at the end)",
    "eval_samples": "samples of the held-out stream per evaluation",
    "log_every": "record the training loss every N steps",
    "checkpoint_every": "store backends: take a checkpoint every N steps (0: none)",
    "checkpoint_dir": "where checkpoints go (default: <out_dir>/checkpoints)",
    "checkpoint_bits": "checkpoint quantization: 2, 3, 4, 8 (adaptive), 16 (fp16), 32 (none)",
    "resume": "store backends: a checkpoint to restore before training",
    "seed": "seed of the model's initial weights and the tables' initial rows",
    "plot": "write a PNG with the loss curve and the DRAM hit rate here",
    "out_dir": "directory for the run's outputs (summary.json, plot, checkpoints)",
}

FILE_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise TrainConfigError(f"unknown {key} {value!r}; valid: {', '.join(valid)}")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file's keys (TrainConfigError on unknown keys or bad TOML)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TrainConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise TrainConfigError(f"{path}: unknown keys {unknown}; valid: {', '.join(FILE_KEYS)}")
    return data


def from_sources(recipe: str | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """The recipe's keys, then ``overrides`` (flags; None values are skipped)."""
    values: dict[str, Any] = load(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("bottom", "top"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise TrainConfigError(str(e)) from None
