"""Optimizers: sparse row optimizers for tables (applied where rows live)."""

from tierstore.optim.sparse import SGD, Adagrad, RowWiseAdagrad, SparseOptimizer

__all__ = ["SGD", "Adagrad", "RowWiseAdagrad", "SparseOptimizer"]
