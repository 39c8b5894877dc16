"""Incremental, quantized checkpoints (Check-N-Run): modified-row tracking, policies, writer,
reader."""
