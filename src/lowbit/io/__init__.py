"""Checkpoints: save/load in safetensors + JSON metadata (canonical layout); the
compressed-tensors format that vLLM and transformers read (export, and load reads
it); layer-by-layer quantization from disk (streaming); tensor-parallel checks (tp)."""

from .checkpoint import CheckpointError, load, save
from .compressed_tensors import ExportError, ExportReport, export
from .streaming import QuantizeError, quantize_checkpoint

__all__ = ["CheckpointError", "ExportError", "ExportReport", "QuantizeError", "export", "load",
           "quantize_checkpoint", "save"]
