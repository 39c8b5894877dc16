"""Optimizers: sparse row optimizers for tables (applied where rows live) and Distributed
Shampoo for dense parameters."""

from tierstore.optim.shampoo import DistributedShampoo, NonFiniteFactorError
from tierstore.optim.sparse import SGD, Adagrad, RowWiseAdagrad, SparseOptimizer

__all__ = ["SGD", "Adagrad", "RowWiseAdagrad", "SparseOptimizer", "DistributedShampoo",
           "NonFiniteFactorError"]
