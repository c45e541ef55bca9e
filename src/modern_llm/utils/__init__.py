"""Shared utilities: ``checkpointing`` (atomic safetensors checkpoints), ``records`` (result JSON + experiment
log), ``logging`` (metrics.csv + TensorBoard) and ``hardware`` (device/dtype/autocast, peak FLOP/s for MFU).

Import the submodule you need; this package imports nothing so that ``records`` stays cheap to load.
"""
