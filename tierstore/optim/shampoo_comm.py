"""Data-parallel exchange of DistributedShampoo's search directions over torch.distributed.

Every rank computes the search directions of the blocks it owns, packs them into one flat buffer
of ``communication_dtype`` and all-gathers the buffers; every rank then reads every block's
direction from the gathered buffer (its own blocks included, so the rounding to
``communication_dtype`` is the same everywhere and replicas stay identical).

Buffers live on the parameters' device, so the same code runs over gloo (CPU) and NCCL (GPU).
The last element of each rank's buffer is a failure flag, so that a rank that hit a non-finite
factor still joins the collective and all ranks can raise together instead of deadlocking.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from tierstore.optim.shampoo_blocks import Block

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DirectionExchange:
    """All-gathers per-block directions among the ranks of ``process_group``."""

    def __init__(self, process_group: dist.ProcessGroup, dtype: torch.dtype) -> None:
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.dtype = dtype

    def exchange(
        self,
        blocks: Sequence[Block],
        owners: Sequence[int],
        local: dict[int, torch.Tensor],
        failed: bool,
        device: torch.device,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Gather the directions of ``blocks`` (all ranks pass the same list, in the same order).

        ``owners[block.uid]`` is the owning rank; ``local`` maps the uids of this rank's blocks to
        their directions. Returns the directions of all blocks (flat views in the communication
        dtype, keyed by uid) and the per-rank failure flags (call ``.tolist()`` only when needed,
        it synchronises with the device).
        """
        per_rank: list[list[Block]] = [[] for _ in range(self.world_size)]
        for block in blocks:
            per_rank[owners[block.uid]].append(block)
        length = max(sum(b.numel for b in rank_blocks) for rank_blocks in per_rank) + 1

        send = torch.zeros(length, dtype=self.dtype, device=device)
        offset = 0
        for block in per_rank[self.rank]:
            if not failed:  # a failed rank may lack some directions; it only sends its flag
                send[offset : offset + block.numel].copy_(local[block.uid].reshape(-1))
            offset += block.numel
        send[-1] = float(failed)

        received = torch.empty(self.world_size * length, dtype=self.dtype, device=device)
        _all_gather(received, send, group=self.group)
        chunks = received.view(self.world_size, length)

        gathered: dict[int, torch.Tensor] = {}
        for rank, rank_blocks in enumerate(per_rank):
            offset = 0
            for block in rank_blocks:
                gathered[block.uid] = chunks[rank, offset : offset + block.numel]
                offset += block.numel
        return gathered, chunks[:, -1]
