"""Incremental, quantized checkpoints (Check-N-Run): modified-row tracking, policies, writer,
reader."""

from tierstore.ckpt.format import CheckpointError, CorruptCheckpoint
from tierstore.ckpt.policy import POLICIES
from tierstore.ckpt.reader import list_checkpoints, restore, verify, verify_root
from tierstore.ckpt.writer import CheckpointHandle, apply_retention, checkpoint, wait

__all__ = ["checkpoint", "restore", "wait", "verify", "verify_root", "list_checkpoints",
           "apply_retention", "CheckpointHandle", "CheckpointError", "CorruptCheckpoint",
           "POLICIES"]
