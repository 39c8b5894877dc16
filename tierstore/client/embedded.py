"""``tierstore.client.embedded(path, ...)``: the in-process engine behind the client API.

For notebooks, tests and single-process jobs: no service to start. The returned
:class:`tierstore.Store` has the connection's methods (``create_table``, ``tables``, ``stats``,
``flush``, ``close``, ``lookup``, ``pooled``, ``apply_gradients``, ``apply_pooled_gradients``)
with the same signatures, so :class:`TierEmbeddingBag` and the training code take either.
"""

from __future__ import annotations

import os
from typing import Any

from tierstore.store import Store


def embedded(path: str | os.PathLike, ddr_bytes: int = 1 << 30, policy: str = "adaptive",
             **kw: Any) -> Store:
    """Open (or create) the store at ``path`` in this process. Raises StoreLocked if another
    process (a running tierstored, say) has it open."""
    return Store(path, ddr_bytes=ddr_bytes, policy=policy, **kw)
