"""Pure-torch references of the kernels' ops (any device, any float dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedWeight


def check_weight_only_args(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None) -> None:
    """The argument checks shared by every backend of weight_only_matmul."""
    if not isinstance(pw, PackedWeight):
        raise TypeError(f"expected a PackedWeight (lowbit.kernels.pack_weight(qtensor)), got {type(pw).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != pw.k:
        raise ValueError(f"x has shape {list(x.shape)}: its last dimension must be K={pw.k} (weight [{pw.n}, {pw.k}])")
    if bias is not None:
        if tuple(bias.shape) != (pw.n,):
            raise ValueError(f"bias has shape {list(bias.shape)}, expected [{pw.n}]")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")


def weight_only_matmul_reference(
    x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = F.linear(x, W.to(x.dtype), bias.to(x.dtype)) with W the canonical
    QTensor dequantized in float32: the reference of ``weight_only_matmul``.
    x [..., K] -> [..., N] in x.dtype, on x's device. With ``out_dtype`` float32: W rounded
    to x's dtype as above, then the product, bias and result in float32."""
    check_weight_only_args(x, pw, bias)
    w = pw.qtensor.dequantize().to(device=x.device, dtype=x.dtype)
    dt = out_dtype or x.dtype
    b = None if bias is None else bias.to(dt)
    return F.linear(x.to(dt), w.to(dt), b)
