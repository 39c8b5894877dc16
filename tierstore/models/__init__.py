"""Recommendation models over tierstore tables (DLRM first)."""

from tierstore.models.dlrm import DLRM
from tierstore.models.embeddings import StoreEmbeddings, TorchEmbeddings

__all__ = ["DLRM", "StoreEmbeddings", "TorchEmbeddings"]
