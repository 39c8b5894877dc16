"""Cache policies of the DDR tier (see base.py for the contract and docs/cache.md).

``make_policy(name, capacity, ...)`` builds one by name: ``"lru"``, ``"lfu"``, ``"adaptive"``
(the default of the store) or ``"belady"`` (offline oracle; needs ``future=``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .adaptive import AdaptivePolicy
from .base import Admission, CachePolicy
from .belady import BeladyPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "adaptive": AdaptivePolicy,
    "belady": BeladyPolicy,
}
DEFAULT_POLICY = "adaptive"


def make_policy(
    name: str, capacity: int, *, future: np.ndarray | None = None, **kw: Any
) -> CachePolicy:
    """A new policy ``name`` for ``capacity`` slots.

    ``future`` (the whole id sequence in access order) is required by, and only accepted for,
    ``"belady"``; with batches of more than one id also pass ``batch=``. Other keyword
    arguments go to the policy's constructor. Unknown names raise ValueError.
    """
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown cache policy {name!r}; valid: {', '.join(POLICIES)}")
    if cls is BeladyPolicy:
        if future is None:
            raise ValueError("the belady policy needs future= (the whole trace, in access order)")
        return cls(capacity, future=future, **kw)
    if future is not None:
        raise ValueError(f"future= is only for the belady oracle, not {name!r}")
    return cls(capacity, **kw)


__all__ = [
    "Admission",
    "AdaptivePolicy",
    "BeladyPolicy",
    "CachePolicy",
    "DEFAULT_POLICY",
    "LFUPolicy",
    "LRUPolicy",
    "POLICIES",
    "make_policy",
]
