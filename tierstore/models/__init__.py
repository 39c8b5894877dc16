"""Recommendation models over tierstore tables (DLRM first)."""

from tierstore.models.dlrm import DLRM
from tierstore.models.embeddings import StoreEmbeddings, TorchEmbeddings
from tierstore.models.logreg import LogReg

__all__ = ["DLRM", "LogReg", "StoreEmbeddings", "TorchEmbeddings"]
