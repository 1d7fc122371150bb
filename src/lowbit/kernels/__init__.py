"""Kernels: one public op per module, its Triton kernels in a private module
beside it, the pure-torch references in ref.py, and ``dispatch`` (which kernel
and config runs a call, with the on-disk tuning cache).

Importing this package needs torch alone; triton is imported when a Triton
kernel first runs.
"""

from .config import WeightOnlyConfig
from .dispatch import Plan, default_config, plan
from .packing import PackedWeight, pack_weight
from .ref import weight_only_matmul_reference
from .weight_only import choose_backend, weight_only_matmul

__all__ = [
    "PackedWeight",
    "Plan",
    "WeightOnlyConfig",
    "choose_backend",
    "default_config",
    "pack_weight",
    "plan",
    "weight_only_matmul",
    "weight_only_matmul_reference",
]
