"""``torch.ops.lowbit.weight_only_linear``: the weight-only matmul as a torch
custom op, so that ``torch.compile`` treats it as one opaque call (with a fake
implementation for shapes) instead of tracing into Triton launches.

    y = torch.ops.lowbit.weight_only_linear(x, codes, scales, biases, bias, fmt,
                                            n, k, family, bits, group, kpad, npad, row_codes=None)

The arguments are a ``PackedWeight``'s kernel tensors and layout fields
(``weight_only_linear(x, pw, bias)`` below assembles them); on CUDA the op runs
``weight_only_matmul(..., backend="auto")``, so the dispatcher picks the kernel
(CPU tensors, for tests: the Triton interpreter).
"""

from __future__ import annotations

import torch

from .packing import Layout, PackedWeight
from .weight_only import weight_only_matmul


@torch.library.custom_op("lowbit::weight_only_linear", mutates_args=())
def _weight_only_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    family: str,
    bits: int,
    group: int,
    kpad: int,
    npad: int,
    row_codes: torch.Tensor | None = None,
) -> torch.Tensor:
    pw = PackedWeight(fmt, n, k, None, x.dtype, codes, scales, biases, Layout(family, bits, group, kpad, npad),
                      row_codes=row_codes)
    # CUDA: the dispatcher's choice; CPU tensors: the Triton interpreter (tests)
    return weight_only_matmul(x, pw, bias, backend="auto" if x.is_cuda else "triton")


@_weight_only_linear.register_fake
def _(x, codes, scales, biases, bias, fmt, n, k, family, bits, group, kpad, npad, row_codes=None):
    return x.new_empty((*x.shape[:-1], n))


def weight_only_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight_only_matmul(x, pw, bias)`` through the custom op (Triton-supported weights only)."""
    lay = pw.layout
    if lay is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported}); use weight_only_matmul")
    return torch.ops.lowbit.weight_only_linear(
        x, pw.codes, pw.scales, pw.biases, bias, pw.fmt, pw.n, pw.k, lay.family, lay.bits, lay.group, lay.kpad, lay.npad,
        pw.row_codes,
    )


@torch.library.custom_op("lowbit::a8w8_linear", mutates_args=())
def _a8w8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    blockwise: bool,
) -> torch.Tensor:
    from .a8w8 import PackedA8W8, a8w8_matmul

    pa = PackedA8W8(fmt, n, k, codes, scales, blockwise)
    return a8w8_matmul(x, pa, bias, input_scale, backend="auto" if x.is_cuda else "triton")


@_a8w8_linear.register_fake
def _(x, codes, scales, input_scale, bias, fmt, n, k, blockwise):
    return x.new_empty((*x.shape[:-1], n))


def a8w8_linear(x: torch.Tensor, pa, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``a8w8_matmul(x, pa, bias, input_scale)`` through the custom op."""
    return torch.ops.lowbit.a8w8_linear(x, pa.codes, pa.scales, input_scale, bias, pa.fmt, pa.n, pa.k, pa.blockwise)


@torch.library.custom_op("lowbit::mx_linear", mutates_args=())
def _mx_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    n: int,
    k: int,
    act_fmt: str,
) -> torch.Tensor:
    from .mx import PackedMX, mx_matmul

    return mx_matmul(x, PackedMX(fmt, n, k, codes, scales), act_fmt, bias, backend="auto" if x.is_cuda else "triton")


@_mx_linear.register_fake
def _(x, codes, scales, bias, fmt, n, k, act_fmt):
    return x.new_empty((*x.shape[:-1], n))


def mx_linear(x: torch.Tensor, pm, act_fmt: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``mx_matmul(x, pm, act_fmt, bias)`` through the custom op."""
    return torch.ops.lowbit.mx_linear(x, pm.codes, pm.scales, bias, pm.fmt, pm.n, pm.k, act_fmt)


@torch.library.custom_op("lowbit::nvfp4_linear", mutates_args=())
def _nvfp4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    k: int,
) -> torch.Tensor:
    from .mx import PackedNVFP4, nvfp4_matmul

    pn = PackedNVFP4(n, k, codes, scales, tensor_scale)
    return nvfp4_matmul(x, pn, bias, backend="auto" if x.is_cuda else "triton")


@_nvfp4_linear.register_fake
def _(x, codes, scales, tensor_scale, bias, n, k):
    return x.new_empty((*x.shape[:-1], n))


def nvfp4_linear(x: torch.Tensor, pn, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``mx.nvfp4_matmul(x, pn, bias)`` through the custom op (GPUs with FP4 tensor cores)."""
    return torch.ops.lowbit.nvfp4_linear(x, pn.codes, pn.scales, pn.tensor_scale, bias, pn.n, pn.k)


@torch.library.custom_op("lowbit::mx_fake_quantize", mutates_args=())
def _mx_fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    from .act_quant import fake_quantize_activation_mx

    return fake_quantize_activation_mx(x.reshape(-1, x.shape[-1]), fmt).reshape(x.shape)


@_mx_fake_quantize.register_fake
def _(x, fmt):
    return torch.empty_like(x)


def mx_fake_quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x's MX-quantized values (floor rule), dequantized in x's dtype, through the custom op."""
    return torch.ops.lowbit.mx_fake_quantize(x, fmt)


@torch.library.custom_op("lowbit::nvfp4_fake_quantize", mutates_args=())
def _nvfp4_fake_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .act_quant import fake_quantize_activation_nvfp4

    local, s_t = fake_quantize_activation_nvfp4(x.reshape(-1, x.shape[-1]))
    return local.reshape(x.shape), s_t


@_nvfp4_fake_quantize.register_fake
def _(x):
    return torch.empty_like(x), x.new_empty((1,), dtype=torch.float32)


def nvfp4_fake_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's NVFP4 values with the tensor scale factored out, in x's dtype, and that scale
    (float32 [1]): ``act_quant.fake_quantize_activation_nvfp4`` through the custom op."""
    return torch.ops.lowbit.nvfp4_fake_quantize(x)


@torch.library.custom_op("lowbit::w4a8_linear", mutates_args=())
def _w4a8_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    emax: torch.Tensor,
    row_scales: torch.Tensor,
    wo_codes: torch.Tensor,
    wo_scales: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    k: int,
    fold_unsupported: str,
    family: str,
    bits: int,
    group: int,
    kpad: int,
    npad: int,
) -> torch.Tensor:
    from .w4a8 import PackedW4A8, w4a8_matmul

    wo = PackedWeight("mxfp4", n, k, None, x.dtype, wo_codes, wo_scales, None, Layout(family, bits, group, kpad, npad))
    pw = PackedW4A8(n, k, codes, scales, emax, row_scales, fold_unsupported or None, wo)
    return w4a8_matmul(x, pw, bias, backend="auto" if x.is_cuda else "triton")


@_w4a8_linear.register_fake
def _(x, codes, scales, emax, row_scales, wo_codes, wo_scales, bias, n, k, fold_unsupported, family, bits, group,
      kpad, npad):
    return x.new_empty((*x.shape[:-1], n))


def w4a8_linear(x: torch.Tensor, pw, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w4a8.w4a8_matmul(x, pw, bias)`` through the custom op (``pw`` packed for x's dtype)."""
    wo = pw.weight
    if wo is None or wo.layout is None or wo.biases is not None:
        raise ValueError(f"{pw}: needs its weight-only layout (pack_w4a8(qt, dtype=x.dtype))")
    lay = wo.layout
    return torch.ops.lowbit.w4a8_linear(
        x, pw.codes, pw.scales, pw.emax, pw.row_scales, wo.codes, wo.scales, bias, pw.n, pw.k,
        pw.fold_unsupported or "", lay.family, lay.bits, lay.group, lay.kpad, lay.npad,
    )
