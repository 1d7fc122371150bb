"""Checkpoints: save/load in safetensors + JSON metadata (canonical layout)."""

from .checkpoint import CheckpointError, load, save

__all__ = ["CheckpointError", "load", "save"]
