"""Kernels: one public op per module, its Triton kernels in a private module
beside it, the pure-torch references in ref.py.

Importing this package needs torch alone; triton is imported when a Triton
kernel first runs.
"""

from .packing import PackedWeight, pack_weight
from .ref import weight_only_matmul_reference
from .weight_only import WeightOnlyConfig, choose_backend, default_config, weight_only_matmul

__all__ = [
    "PackedWeight",
    "WeightOnlyConfig",
    "choose_backend",
    "default_config",
    "pack_weight",
    "weight_only_matmul",
    "weight_only_matmul_reference",
]
