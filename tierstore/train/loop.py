"""The ``tierstore train`` loop: data -> model -> loss -> backward (the tables' sparse
optimizer runs where the rows live) -> dense optimizer; periodic evaluation, checkpoints and a
progress bar; a JSON-able summary at the end. Ctrl-C stops after the current step and still
writes back, evaluates and summarises."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tierstore.data import NUM_DENSE, SyntheticDataset, batches, open_dataset
from tierstore.models import DLRM, LogReg
from tierstore.optim import DistributedShampoo
from tierstore.train import metrics
from tierstore.train.backends import Backend, table_specs
from tierstore.train.config import TrainConfig


def _rows(cfg: TrainConfig, ds: Any, keys: list[str]) -> list[int]:
    """Rows per table: the synthetic profile's cardinalities, else rows_per_table (hashing)."""
    if isinstance(ds, SyntheticDataset):
        return list(ds.profile.cardinalities)
    return [cfg.rows_per_table] * len(keys)


def _dense_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    if cfg.dense_optimizer == "shampoo":
        return DistributedShampoo(params, lr=cfg.dense_lr, grafting="adagrad",
                                  betas=(0.0, 1.0), epsilon=1e-10,
                                  precondition_frequency=20, start_preconditioning_step=20,
                                  max_preconditioner_dim=512)
    if cfg.dense_optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.dense_lr)
    return torch.optim.Adam(params, lr=cfg.dense_lr)


def _model(cfg: TrainConfig, embeddings: torch.nn.Module, num_sparse: int) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    if cfg.model == "logreg":
        return LogReg(embeddings, NUM_DENSE)
    return DLRM(embeddings, NUM_DENSE, num_sparse, cfg.dim, bottom=cfg.bottom, top=cfg.top)


class Run:
    """One training run (``run()`` does it all; the pieces are separate for tests)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.train_data = open_dataset(cfg.data, split="train", strict=cfg.strict)
        self.eval_data = open_dataset(cfg.data, split="eval", strict=cfg.strict)
        first = next(iter(batches(self.train_data, 1)))
        self.keys = list(first.keys)
        self.rows = _rows(cfg, self.train_data, self.keys)
        self.specs = table_specs(cfg, self.rows, self.keys)
        self.backend = Backend(cfg, self.specs)
        self.model = _model(cfg, self.backend.module, len(self.keys))
        self.optimizer = _dense_optimizer(cfg, self.model.dense_parameters())
        self.reader = batches(self.train_data, cfg.batch_size, repeat=True)
        self.eval_batches = self._eval_set()
        self.step = 0
        self.log: dict[str, list] = {"train_loss": [], "eval": [], "hit_rate": []}
        self.ckpt_root = cfg.checkpoint_dir or (os.path.join(cfg.out_dir, "checkpoints")
                                                if cfg.out_dir else None)
        if cfg.checkpoint_every and self.ckpt_root is None:
            self.close()
            raise ValueError("checkpoint_every needs checkpoint_dir (or out_dir)")
        self.checkpoint_seconds: list[float] = []
        if cfg.resume:
            self.resume(cfg.resume)

    def _eval_set(self) -> list[Any]:
        it = batches(self.eval_data, min(self.cfg.batch_size * 4, self.cfg.eval_samples))
        out, n = [], 0
        for b in it:
            out.append(b.remap(self.rows))
            n += b.batch_size
            if n >= self.cfg.eval_samples:
                break
        return out

    # -- steps ------------------------------------------------------------------------------
    def train_step(self) -> float:
        b = next(self.reader).remap(self.rows)
        logits = self.model(b.dense, b.keys, b.values, b.lengths)
        loss = F.binary_cross_entropy_with_logits(logits, b.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # also the tables' sparse optimizer step (store backends)
        self.optimizer.step()
        self.backend.module.step()  # the torch backend's sparse step
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        logits, labels = [], []
        for b in self.eval_batches:
            logits.append(self.model(b.dense, b.keys, b.values, b.lengths).double().numpy())
            labels.append(b.labels.double().numpy())
        x, y = np.concatenate(logits), np.concatenate(labels)
        ll = metrics.logloss_from_logits(x, y)
        return {"step": self.step, "logloss": ll, "ne": metrics.normalized_entropy(ll, y),
                "auc": metrics.auc(x, y)}

    def planted(self) -> dict[str, float] | None:
        """The planted click model's own loss on the evaluation samples (synthetic data)."""
        if not isinstance(self.eval_data, SyntheticDataset):
            return None
        x = np.concatenate([self.eval_data.planted_logit(b) for b in self.eval_batches])
        y = np.concatenate([b.labels.double().numpy() for b in self.eval_batches])
        ll = metrics.logloss_from_logits(x, y)
        return {"logloss": ll, "ne": metrics.normalized_entropy(ll, y), "auc": metrics.auc(x, y)}

    # -- checkpoints ----------------------------------------------------------------------------
    def dense_state(self) -> dict[str, Any]:
        """Model parameters as tensors; the optimizer's state dict as torch.save bytes (its
        integer-keyed nesting does not survive DCP's flattening without a template, and
        Adam's state does not exist before the first step to make one)."""
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        return {"model": dict(self.model.state_dict()), "optimizer": buf.getvalue(),
                "step": self.step}

    def checkpoint(self) -> str:
        """Rows (quantized), dense state and reader position; the stall is timed."""
        t0 = time.perf_counter()
        path = self.backend.checkpoint(self.ckpt_root, self.step, self.dense_state(),
                                       self.reader.state_dict(), self.cfg.checkpoint_bits)
        self.checkpoint_seconds.append(time.perf_counter() - t0)
        return path

    def resume(self, path: str) -> None:
        """Tables, dense state, optimizer state, step and reader position from ``path``."""
        info = self.backend.restore(path)
        state = info.get("extra_state")
        if not state:
            raise ValueError(f"checkpoint {path} holds no dense state to resume a run from")
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(torch.load(io.BytesIO(state["optimizer"]),
                                                  weights_only=True))
        self.step = int(state["step"])
        if info.get("reader"):
            self.reader.load_state_dict(info["reader"])

    def checkpoint_summary(self) -> dict[str, Any] | None:
        if not self.ckpt_root or not os.path.isdir(self.ckpt_root):
            return None
        from tierstore.ckpt import list_checkpoints
        self.backend.wait_checkpoints()
        cks = list_checkpoints(self.ckpt_root)
        if not cks:
            return None
        full = sum(s.num_rows * (s.dim + s.layout.state_dim) * 4 for s in self.specs.values())
        return {"root": self.ckpt_root, "taken": len(self.checkpoint_seconds),
                "count": len(cks),  # kept on disk (retention deletes older chains)
                "bytes_written": int(sum(c["bytes"] for c in cks)),  # of those kept
                "newest": cks[-1]["path"], "newest_restore_bytes": cks[-1]["restore_bytes"],
                "full_fp32_bytes": full * len(cks), "one_full_fp32_bytes": full,
                "stall_seconds_median": float(np.median(self.checkpoint_seconds))
                if self.checkpoint_seconds else None}

    def close(self) -> None:
        self.backend.close()


def run(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the summary (see docs/training.md)."""
    from tqdm import tqdm
    r = Run(cfg)
    interrupted = False
    bar = tqdm(total=cfg.steps if cfg.time_limit is None else None, disable=not progress,
               unit="step", dynamic_ncols=True, mininterval=1.0,
               desc=f"train {cfg.model}/{cfg.backend}")
    hits0, look0 = r.backend.hit_counts()
    last_hits, last_look = hits0, look0
    train_time, t_start = 0.0, time.perf_counter()
    try:
        while r.step < cfg.steps:
            if cfg.time_limit is not None and time.perf_counter() - t_start > cfg.time_limit:
                break
            t0 = time.perf_counter()
            loss = r.train_step()
            train_time += time.perf_counter() - t0
            if r.step % cfg.log_every == 0 or r.step == 1:
                hits, look = r.backend.hit_counts()
                rate = (hits - last_hits) / (look - last_look) if look > last_look else None
                last_hits, last_look = hits, look
                r.log["train_loss"].append({"step": r.step, "loss": loss})
                r.log["hit_rate"].append({"step": r.step, "hit_rate": rate})
                bar.set_postfix(loss=f"{loss:.4f}",
                                hit=f"{rate:.3f}" if rate is not None else "-",
                                sps=f"{r.step * cfg.batch_size / max(train_time, 1e-9):,.0f}")
            bar.update(1)
            if cfg.eval_every and r.step % cfg.eval_every == 0:
                r.log["eval"].append(r.evaluate())
            if cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0:
                r.checkpoint()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    try:
        final = r.evaluate()
        if not r.log["eval"] or r.log["eval"][-1]["step"] != r.step:
            r.log["eval"].append(final)
        hits, look = r.backend.hit_counts()
        r.backend.flush()
        summary = {
            "model": cfg.model, "backend": cfg.backend, "data": cfg.data,
            "steps": r.step, "batch_size": cfg.batch_size, "interrupted": interrupted,
            "train_loss": r.log["train_loss"], "eval": r.log["eval"],
            "eval_logloss": final["logloss"], "ne": final["ne"], "auc": final["auc"],
            "planted": r.planted(),
            "samples_per_s": r.step * cfg.batch_size / train_time if train_time else None,
            "train_seconds": train_time, "wall_seconds": time.perf_counter() - t_start,
            "hit_rate": (hits - hits0) / (look - look0) if look > look0 else None,
            "hit_rate_log": r.log["hit_rate"],
            "dram_fraction": cfg.dram_fraction if cfg.backend != "torch" else 1.0,
            "tables": len(r.specs), "rows": int(sum(r.rows)),
            "checkpoints": r.checkpoint_summary(),
        }
    finally:
        r.close()
    if cfg.plot:
        from tierstore.train.plot import plot_run
        plot_run(summary, cfg.plot)
        summary["plot"] = os.path.abspath(cfg.plot)
    return summary
