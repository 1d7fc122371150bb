"""MX matmul: OCP microscaling activations (quantized on the fly) x MX weights.

```python
pm = pack_mx(qt)                                # qt: mxfp4 or mxfp8_e4m3 weight, once
y = mx_matmul(x, pm, "mxfp8_e4m3", bias=None)   # a8w4-mxfp4; "mxfp4" for a4w4-mxfp4
```

Recipes: ``a8w8-mxfp8`` (MXFP8 x MXFP8), ``a8w4-mxfp4`` (MXFP8 activations x MXFP4
weights), ``a4w4-mxfp4`` (MXFP4 x MXFP4). What runs: ``act_quant.quantize_activation_mx``
(the spec's floor rule, bit for bit the reference's), then ``tl.dot_scaled``
(``_mx_gemm_triton``): native block-scaled MMA on Blackwell (not run here: no such
GPU), upcast to bf16 and the bf16 MMA on Hopper, where it measured 0.66-0.70x bf16
at M = 1-16 and 0.11-0.21x from M = 128 on 28672x4096 (H200, docs/perf/experiments/
a8w8-h200.md). Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET),
"reference" (fake-quantized activations times the dequantized weight, float32,
dequantizing on every call), "auto" (triton on Blackwell and under the interpreter,
else the reference; QuantLinear's own reference caches the dequantized weight).
NVFP4 x NVFP4 (``a4w4-nvfp4``: E4M3 scales per 16 and a tensor scale per operand):
``nvfp4_matmul`` quantizes the activations to codes (``act_quant.quantize_activation_nvfp4``)
and runs the same kernel with ``tl.dot_scaled`` on E4M3 scales, the tensor scales' product
on the float32 sums: for Blackwell, where it compiles to the block-scaled FP4 MMA
(UTCOMMA in sm_100 SASS, compiled offline with Triton 3.6; not run here). Triton 3.6 does
not compile it for sm_90, and its interpreter checks the kernel's data path with the
products computed in float32 (``_mx_gemm_triton``).

Without block-scaled MMA (Hopper) ``mx_upcast_matmul`` runs the MX recipes (a8w8-mxfp8,
a8w4-mxfp4, a4w4-mxfp4) faster than that emulation: one pass writes the MX-quantized
activations dequantized in x's dtype (exact: ``act_quant.fake_quantize_activation_mx``),
then the weight-only kernels multiply them with the MXFP4 weight (exact in bf16/fp16) or
the MXFP8 weight (each value rounded once to x's dtype), float32 sums, the dispatcher
choosing GEMV, swapped MMA, tiled GEMM or dequantize + cuBLAS per shape: the recipe's
product, at the weight-only kernels' speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import act_quant
from .a8w8 import A8W8Config
from .act_quant import check_matmul_args, packing_shape, pad_columns

WEIGHT_FORMATS = ("mxfp8_e4m3", "mxfp4")
ACT_FORMATS = act_quant.MX_FORMATS


@dataclass(frozen=True, repr=False)
class PackedMX:
    """An MX weight in the kernel's layout: codes uint8 [N, KQ] (E4M3) or [N, KQ / 2]
    (E2M1 pairs), E8M0 scales uint8 [N, KQ / 32], KQ = K rounded up to 128 (zero codes)."""

    fmt: str
    n: int
    k: int
    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def kq(self) -> int:
        return self.scales.shape[1] * 32

    def __repr__(self) -> str:
        return f"PackedMX({self.fmt}, N={self.n}, K={self.k}, {self.codes.device})"


def mx_native(device: torch.device) -> bool:
    """Whether the GPU has block-scaled MMA (Blackwell, compute capability 10+), where
    tl.dot_scaled is one instruction; elsewhere Triton emulates it (slower than bf16)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def mx_unsupported(qt) -> str | None:
    if qt.fmt not in WEIGHT_FORMATS:
        return f"{qt.fmt} weights (the MX kernel takes {', '.join(WEIGHT_FORMATS)})"
    if len(qt.shape) != 2 or qt.axis != 1:
        return f"a weight of shape {tuple(qt.shape)} quantized along axis {qt.axis} (a 2-D [N, K] along K)"
    if qt.options.get("scale_rule", "floor") != "floor":
        return "the ceil scale rule (the kernel's activations use the spec's floor rule)"
    return None


def pack_mx(qt, device=None) -> PackedMX:
    n, k, kq, device = packing_shape(qt, mx_unsupported(qt), "MX kernel", device)
    per_byte = 2 if qt.fmt == "mxfp4" else 1
    codes = pad_columns(qt.codes, kq // per_byte, device=device)
    return PackedMX(qt.fmt, n, k, codes, pad_columns(qt.scales, kq // 32, device=device))


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    """float32 [R, K] from the padded codes and scales (via lowbit.formats)."""
    from ..formats import QTensor

    r = codes.shape[0]
    per_byte = 2 if fmt == "mxfp4" else 1
    qt = QTensor(fmt=fmt, shape=torch.Size((r, k)), axis=1, codes=codes[:, : -(-k // per_byte)].contiguous(),
                 scales=scales[:, : -(-k // 32)].contiguous(), tile=(1, 32), options={"scale_rule": "floor"})
    return qt.dequantize()


def mx_reference(x2: torch.Tensor, pm: PackedMX, act_fmt: str, bias=None) -> torch.Tensor:
    codes, scales = act_quant.quantize_activation_mx_reference(x2, act_fmt)
    a = _dequantize(codes, scales, act_fmt, pm.k)
    y = a @ _dequantize(pm.codes, pm.scales, pm.fmt, pm.k).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def default_mx_config(m: int, n: int, kq: int, num_sms: int = 132) -> A8W8Config:
    """Tiled (the upcast operands go through shared memory either way): 16-row tiles
    with split-K for few tokens, 128 x 128 above."""
    n_k = kq // 128
    if m <= 64:
        bm = 16 if m <= 16 else 64
        tiles = -(-m // bm) * -(-n // 128)
        split = max(1, min(8, n_k // 2, -(-(2 * num_sms) // tiles)))
        return A8W8Config(bm, 128, 128, split, 4, 3)
    tiles = -(-m // 128) * -(-n // 128)
    split = 1 if tiles >= num_sms else max(1, min(4, n_k // 4, -(-num_sms // tiles)))
    return A8W8Config(128, 128, 128, split, 8, 3)


def _backend(x: torch.Tensor, packed, bias, backend: str, kernel: str) -> str:
    """The arguments checked and backend "auto" resolved: the block-scaled kernel on GPUs
    with block-scaled MMA and under the interpreter, else the reference."""
    return act_quant.resolve_backend(x, packed.n, packed.k, bias, backend, kernel,
                                     native=x.is_cuda and mx_native(x.device))


def mx_matmul(x: torch.Tensor, pm: PackedMX, act_fmt: str, bias: torch.Tensor | None = None,
              backend: str = "auto", config: A8W8Config | None = None) -> torch.Tensor:
    """y = mx_quantize(x) @ W^T (+ bias), in x's dtype (bf16 or fp16)."""
    if act_fmt not in ACT_FORMATS:
        raise ValueError(f"activation format {act_fmt!r}: the MX kernel takes {', '.join(ACT_FORMATS)}")
    backend = _backend(x, pm, bias, backend, "MX")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pm.k)
    if backend == "reference":
        return mx_reference(x2, pm, act_fmt, bias).reshape(*lead, pm.n)
    m = x2.shape[0]
    y = torch.empty((m, pm.n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, pm.n)
    from . import dispatch

    cfg = (config or default_mx_config(m, pm.n, pm.kq, dispatch.num_sms(x.device))).check()
    if cfg.swap or cfg.tma or cfg.block_k % 32:
        raise ValueError(f"{cfg}: the MX kernel is tiled (swap=False, tma=False) with block_k a multiple of 32")
    codes, scales = act_quant.quantize_activation_mx(x2, act_fmt)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    _launch(codes, scales, act_fmt, pm, bias, y, cfg)
    return y.reshape(*lead, pm.n)


def _launch(codes, scales, act_fmt, pm, bias, y, cfg: A8W8Config, tensor_scale=None) -> None:
    import triton

    from . import _mx_gemm_triton as kmx
    from ._weight_only_triton import interpret_mode, reduce_split, split_k_plan

    matmul = kmx.kernel()
    rne = interpret_mode() and y.dtype == torch.bfloat16
    m, n, kq = codes.shape[0], pm.n, pm.kq
    nt = kq // cfg.block_k
    split, tps, ws = split_k_plan(nt, cfg.split_k, y)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    matmul[grid](
        codes, scales, pm.codes, pm.scales, bias if bias is not None else pm.scales, y, ws,
        m, n, kq, nt, tps, y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        A_FP4=act_fmt in ("mxfp4", "nvfp4"), W_FP4=pm.fmt in ("mxfp4", "nvfp4"), PARTIAL=split > 1,
        HAS_BIAS=bias is not None, RNE_BF16=rne, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **(dict(NV=True, EMULATE=interpret_mode(), ts_ptr=tensor_scale) if pm.fmt == "nvfp4" else {}),
    )
    reduce_split(ws, split, bias, y, rne)


@dataclass(frozen=True, repr=False)
class PackedNVFP4:
    """An NVFP4 weight in the kernel's layout: E2M1 codes uint8 [N, KQ / 2] (two per byte,
    even element low), E4M3 scale bytes uint8 [N, KQ / 16], the tensor scale float32 [1];
    KQ = K rounded up to 128 (zero codes and scales)."""

    n: int
    k: int
    codes: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor
    fmt: str = "nvfp4"

    @property
    def kq(self) -> int:
        return self.scales.shape[1] * 16

    def __repr__(self) -> str:
        return f"PackedNVFP4(N={self.n}, K={self.k}, {self.codes.device})"


def pack_nvfp4(qt, device=None) -> PackedNVFP4:
    why = None if qt.fmt == "nvfp4" else f"{qt.fmt} weights (the NVFP4 kernel takes nvfp4)"
    n, k, kq, device = packing_shape(qt, why, "NVFP4 kernel", device)
    ts = qt.global_scale.to(device=device, dtype=torch.float32).reshape(1)
    return PackedNVFP4(n, k, pad_columns(qt.codes, kq // 2, device=device), pad_columns(qt.scales, kq // 16, device=device),
                       ts)


def _nvfp4_weight(pn: PackedNVFP4) -> torch.Tensor:
    """float32 [N, K]: the weight's values (via lowbit.formats)."""
    from ..formats import QTensor

    qt = QTensor(fmt="nvfp4", shape=torch.Size((pn.n, pn.k)), axis=1, codes=pn.codes[:, : -(-pn.k // 2)].contiguous(),
                 scales=pn.scales[:, : -(-pn.k // 16)].contiguous(), tile=(1, 16), global_scale=pn.tensor_scale[0])
    return qt.dequantize()


def nvfp4_reference(x2: torch.Tensor, pn: PackedNVFP4, bias=None) -> torch.Tensor:
    """NVFP4-quantized x (float32) @ the weight's values^T (+ bias), in x's dtype."""
    from ..formats import fake_quantize

    y = fake_quantize(x2.float(), "nvfp4") @ _nvfp4_weight(pn).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def nvfp4_matmul(x: torch.Tensor, pn: PackedNVFP4, bias: torch.Tensor | None = None, backend: str = "auto",
                 config: A8W8Config | None = None) -> torch.Tensor:
    """y = nvfp4_quantize(x) @ W^T (+ bias), in x's dtype (bf16 or fp16), W NVFP4:
    ``tl.dot_scaled`` on E2M1 codes with E4M3 scales per 16, the two tensor scales on
    the float32 sums. backend "auto": the kernel on GPUs with block-scaled MMA (Blackwell)
    and under the interpreter, else the reference (Hopper runs a4w4-nvfp4 through
    ``nvfp4_upcast_matmul``)."""
    backend = _backend(x, pn, bias, backend, "NVFP4")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pn.k)
    if backend == "reference":
        return nvfp4_reference(x2, pn, bias).reshape(*lead, pn.n)
    if x.is_cuda and not mx_native(x.device):
        raise ValueError("the NVFP4 kernel needs block-scaled MMA (Blackwell, compute capability 10+): Triton 3.6 "
                         "does not compile tl.dot_scaled with E4M3 scales for sm_90; on Hopper use "
                         "nvfp4_upcast_matmul (QuantLinear does) or backend='reference'")
    m = x2.shape[0]
    y = torch.empty((m, pn.n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, pn.n)
    from . import dispatch

    cfg = (config or default_mx_config(m, pn.n, pn.kq, dispatch.num_sms(x.device))).check()
    if cfg.swap or cfg.tma or cfg.row or cfg.block_k % 128:
        raise ValueError(f"{cfg}: the NVFP4 kernel is tiled (swap=False, tma=False) with block_k 128")
    codes, scales, s_t = act_quant.quantize_activation_nvfp4(x2)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    _launch(codes, scales, "nvfp4", pn, bias, y, cfg, tensor_scale=s_t * pn.tensor_scale)
    return y.reshape(*lead, pn.n)


def upcast_activation_applies(act_fmt: str | None, act_options: dict) -> bool:
    """Whether activations of this spec can be MX-quantized by the upcast kernel: an MX
    format with the spec's floor rule and no other option."""
    return (act_fmt in ACT_FORMATS and set(act_options) <= {"scale_rule"}
            and act_options.get("scale_rule", "floor") == "floor")


def mx_upcast_matmul(x: torch.Tensor, pw, act_fmt: str, bias: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """y = mx_quantize(x) @ W^T (+ bias) for a weight packed for the weight-only kernels
    (``pack_weight(qt, dtype=x.dtype)``: an MXFP4 weight for a8w4-/a4w4-mxfp4, MXFP8 for
    a8w8-mxfp8): the MX activations, dequantized exactly in x's dtype, through
    ``weight_only_matmul``."""
    from .weight_only import weight_only_matmul

    if act_fmt not in ACT_FORMATS:
        raise ValueError(f"activation format {act_fmt!r}: the MX kernels take {', '.join(ACT_FORMATS)}")
    check_matmul_args(x, pw.n, pw.k, bias, "MX upcast")
    kb = "reference" if backend == "reference" else "triton"
    xq = act_quant.fake_quantize_activation_mx(x.reshape(-1, pw.k), act_fmt, kb)
    return weight_only_matmul(xq.reshape(x.shape), pw, bias, backend=backend)


def nvfp4_upcast_matmul(x: torch.Tensor, pw, bias: torch.Tensor | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """y = nvfp4_quantize(x) @ W^T (+ bias) for an NVFP4 weight packed for the weight-only
    kernels (``pack_weight(qt, dtype=x.dtype)``, a4w4-nvfp4) on GPUs without FP4 tensor
    cores: the activations' e2m1 * s_b, exact in x's dtype
    (``act_quant.fake_quantize_activation_nvfp4``), through ``weight_only_matmul`` with the
    activations' tensor scale folded into the weight's (the kernels multiply the float32
    sums by it). Where the Triton kernels cannot run (or backend="reference"): the
    reference, NVFP4-quantized x times the dequantized weight."""
    from ..formats import fake_quantize
    from .packing import times_tensor_scale
    from .weight_only import triton_unsupported, weight_only_matmul

    if pw.fmt != "nvfp4":
        raise ValueError(f"nvfp4_upcast_matmul takes an NVFP4 weight, got {pw.fmt}")
    check_matmul_args(x, pw.n, pw.k, bias, "NVFP4 upcast")
    if backend == "reference" or triton_unsupported(x, pw) is not None:
        xq = fake_quantize(x.reshape(-1, pw.k), "nvfp4").to(x.dtype).reshape(x.shape)
        return weight_only_matmul(xq, pw, bias, backend="reference")
    local, s_t = act_quant.fake_quantize_activation_nvfp4(x.reshape(-1, pw.k))
    return weight_only_matmul(local.reshape(x.shape), times_tensor_scale(pw, s_t), bias, backend=backend)
