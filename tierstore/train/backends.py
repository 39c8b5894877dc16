"""Where a training run's embedding rows live: ``torch`` (nn.EmbeddingBag in this process),
``embedded`` (a tierstore.Store in this process) or ``tierstored`` (a running service, or a
private one started for the run). One object per run opens the tables, builds the embedding
module and answers the loop's questions (hit rate, write-back, checkpoints)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import tierstore as ts
from tierstore.config import TableSpec
from tierstore.models.embeddings import StoreEmbeddings, TorchEmbeddings
from tierstore.train.config import TrainConfig


def table_specs(cfg: TrainConfig, rows: list[int], keys: list[str]) -> dict[str, TableSpec]:
    """One table per sparse feature, named after it."""
    opt = (ts.RowWiseAdagrad(lr=cfg.sparse_lr, eps=1e-8) if cfg.sparse_optimizer ==
           "rowwise_adagrad" else ts.SGD(lr=cfg.sparse_lr))
    dim = 1 if cfg.model == "logreg" else cfg.dim
    return {k: TableSpec(k, int(n), dim, optimizer=opt, seed=cfg.seed * 1000 + i,
                         init="zeros" if cfg.model == "logreg" else "uniform")
            for i, (k, n) in enumerate(zip(keys, rows))}


def ddr_bytes_for(specs: dict[str, TableSpec], fraction: float) -> int:
    """DRAM budget holding ``fraction`` of all rows (and at least a few rows per table)."""
    per = {n: ts.Store.cached_row_bytes(s) for n, s in specs.items()}
    total = sum(s.num_rows * per[n] for n, s in specs.items())
    return int(total * fraction) + 16 * sum(per.values())


class Backend:
    """The tables of one run. ``module``: the embedding module for the model."""

    def __init__(self, cfg: TrainConfig, specs: dict[str, TableSpec]) -> None:
        self.cfg = cfg
        self.specs = specs
        self.name = cfg.backend
        self.conn: Any = None
        self.service = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        features = {k: k for k in specs}
        if cfg.backend == "torch":
            self.module = TorchEmbeddings(specs, features)
            return
        ddr = ddr_bytes_for(specs, cfg.dram_fraction)
        if cfg.backend == "embedded":
            self.conn = ts.Store(self._store_dir(), ddr_bytes=ddr, policy=cfg.policy)
        else:
            self.conn = self._connect(ddr)
        existing = set(self.conn.tables())
        for name, spec in specs.items():
            if name not in existing:
                self.conn.create_table(spec)
        self.module = StoreEmbeddings(self.conn, features)

    def _store_dir(self) -> str:
        if self.cfg.store_dir:
            return self.cfg.store_dir
        self._tmp = tempfile.TemporaryDirectory(prefix="tierstore-train-")
        return os.path.join(self._tmp.name, "store")

    def _connect(self, ddr: int) -> Any:
        from tierstore.client import connect
        if self.cfg.run_dir:
            try:
                return connect(self.cfg.run_dir)
            except ts.ConnectionLost as e:
                raise ts.ConnectionLost(f"{e}; start it with `tierstored --run-dir "
                                        f"{self.cfg.run_dir} ...` or leave run_dir unset to "
                                        f"run a private service") from None
        from tierstore.daemon.launch import ServiceProcess
        self._tmp = tempfile.TemporaryDirectory(prefix="tierstore-train-")
        data_dir = self.cfg.store_dir or os.path.join(self._tmp.name, "data")
        self.service = ServiceProcess(self._tmp.name, ddr, self.cfg.policy,
                                      data_dir=data_dir).start()
        return self.service.connect()

    def hit_counts(self) -> tuple[int, int]:
        """(hits, lookups) summed over the run's tables since they were opened; (0, 0) for
        the torch backend (everything is in memory)."""
        if self.conn is None:
            return 0, 0
        tables = self.conn.stats()["tables"]
        mine = [tables[n] for n in self.specs if n in tables]
        return sum(t["hits"] for t in mine), sum(t["lookups"] for t in mine)

    def checkpoint(self, root: str, step: int, extra_state: dict[str, Any],
                   reader: dict[str, Any], bits: int) -> str:
        """The next checkpoint of the run's chain under ``root`` (rows quantized to ``bits``,
        their optimizer state kept at fp32 so a resumed run continues exactly when bits=32;
        dense state and reader position alongside); returns its path."""
        quant = "adaptive" if bits < 16 else "none"
        return self.conn.checkpoint(root, bits=bits, quant=quant, step=step, reader=reader,
                                    extra_state=extra_state, state_dtype="fp32")

    def restore(self, path: str) -> dict[str, Any]:
        """Bring the tables back to checkpoint ``path``; its summary with ``extra_state``."""
        return self.conn.restore(path)

    def wait_checkpoints(self) -> None:
        """Until the checkpoint write in flight (if any) is on disk."""
        if self.cfg.backend == "tierstored":
            self.conn.wait_checkpoint()
        elif self.conn is not None:
            from tierstore import ckpt
            ckpt.wait(self.conn)

    def flush(self) -> None:
        if self.conn is not None:
            self.conn.flush()

    def close(self) -> None:
        """Write back and release everything (a private service is stopped with SIGTERM)."""
        try:
            if self.conn is not None:
                self.conn.close()
        finally:
            if self.service is not None:
                self.service.stop()
            if self._tmp is not None:
                self._tmp.cleanup()
