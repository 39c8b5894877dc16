"""The client side of tierstore: a connection to ``tierstored`` (or an embedded store behind the
same API) and the PyTorch modules on top of it."""

from tierstore.client.connection import Connection, connect
from tierstore.client.embedded import embedded
from tierstore.client.modules import TierEmbeddingBag, TierEmbeddingBagCollection

__all__ = ["Connection", "connect", "embedded", "TierEmbeddingBag", "TierEmbeddingBagCollection"]
