"""Dense state saved beside the rows through ``torch.distributed.checkpoint`` (DCP).

``extra_state`` is a dict of tensors and state dicts: the model's dense parameters, the dense
optimizer's state (use ``torch.distributed.checkpoint.state_dict.get_state_dict(model, optim)``
so optimizer state is keyed by parameter name), the data reader's position, anything
picklable. It is copied when the checkpoint is taken (the caller may keep training) and written
by the background writer into ``<checkpoint>/dense/`` with ``dcp.save(..., no_dist=True)``:
no process group is needed, and a job that has one can read the files with DCP's own tools.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch



def _quiet() -> None:
    """DCP warns on every single-process save/load, which is the intended use here. The
    filter is (re)installed per call: callers such as pytest reset filters between uses."""
    warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable "
                            r"or uninitialized", category=UserWarning)

DENSE_DIR = "dense"


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that later training cannot change: tensors detached and cloned
    (to CPU), containers rebuilt, anything else deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def save(state: dict[str, Any], ckpt_dir: str) -> list[str]:
    """Write ``state`` under ``<ckpt_dir>/dense``; returns the files written (relative)."""
    import torch.distributed.checkpoint as dcp
    if not isinstance(state, dict):
        raise TypeError(f"extra_state must be a dict, got {type(state).__name__}")
    path = os.path.join(ckpt_dir, DENSE_DIR)
    _quiet()
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return sorted(os.path.join(DENSE_DIR, f) for f in os.listdir(path))


def load(ckpt_dir: str, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The saved dense state. With ``template`` (a state dict of the right shapes, DCP's usual
    way) it is loaded in place and returned; without, everything is read back as saved."""
    import torch.distributed.checkpoint as dcp
    path = os.path.join(ckpt_dir, DENSE_DIR)
    _quiet()
    if template is not None:
        dcp.load(template, checkpoint_id=path, no_dist=True)
        return template
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    return _load_state_dict_from_keys(checkpoint_id=path)
