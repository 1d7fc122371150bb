"""Dynamic activation quantization for the A8W8 matmul: x [M, K] -> codes and scales.

```python
codes, scales = quantize_activation(x, "fp8_e4m3")                   # per token
codes, scales = quantize_activation(x, "int8", group_size=128)       # 1 x 128 blocks
```

codes [M, KQ] (KQ = K rounded up to 128, zero-padded: the GEMM's K) are FP8
E4M3 bit patterns (uint8) or INT8; scales float32 [M] (per token) or
[M, KQ / 128]. ``input_scale`` (a SmoothQuant/AWQ factor kept on a QuantLinear)
divides x first, rounded to x's dtype, exactly as QuantLinear's reference path
does. The Triton kernel and the reference (``lowbit.formats.quantize_tensor``)
give the same codes and scales bit for bit.

MX activations (``quantize_activation_mx``: codes and E8M0 scales for tl.dot_scaled;
``fake_quantize_activation_mx``: the dequantized values in x's dtype, for GPUs without
block-scaled MMA). A dequantized MX value is a code of at most 4 significant bits
times 2^E: exact in bfloat16 unless below 2^-133 (a block of float32-subnormal x).
For a float16 x, E <= 7 (its amax is below 2^16), so no value overflows, and a value
below float16's 2^-24 grid comes only from a block whose values all lie on that grid
and are reproduced exactly; so the float16 result is exact too.
"""

from __future__ import annotations

import torch

from ..formats import fake_quantize, quantize_tensor

FORMATS = ("fp8_e4m3", "int8")
GROUPS = (None, 128)
K_ALIGN = 128  # the GEMM's K padding


def padded_k(k: int) -> int:
    return -(-k // K_ALIGN) * K_ALIGN


def packing_shape(qt, why: str | None, kernel: str, device=None) -> tuple[int, int, int, torch.device]:
    """(N, K, KQ, device) of a weight being packed for ``kernel``; ``why`` (the kernel's
    reason not to take it, or None) raises first."""
    if why is not None:
        raise ValueError(f"no {kernel} layout for {why}")
    n, k = qt.shape
    return n, k, padded_k(k), torch.device(device) if device is not None else qt.codes.device


def check_matmul_args(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, kernel: str) -> None:
    """The activation-quantized matmuls' input checks: x [..., k] in bf16/fp16, bias [n]."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {k}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"the {kernel} matmul takes bfloat16 or float16 x, got {x.dtype} (cast it first)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},)")


def resolve_backend(x: torch.Tensor, n: int, k: int, bias: torch.Tensor | None, backend: str, kernel: str,
                    weight_device: torch.device | None = None, native: bool = True) -> str:
    """The activation-quantized matmuls' argument checks (``check_matmul_args``, x on the
    weight's device), then backend "auto" resolved: "triton" on CUDA where ``native`` (the
    GPU runs the kernel) or under TRITON_INTERPRET, else "reference"."""
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend={backend!r}: 'auto', 'triton' or 'reference'")
    check_matmul_args(x, n, k, bias, kernel)
    if weight_device is not None and x.device != weight_device:
        raise ValueError(f"x is on {x.device}, the weight on {weight_device}")
    if backend == "auto":
        from .weight_only import _interpret

        backend = "triton" if ((x.is_cuda and native) or _interpret()) else "reference"
    return backend


def pad_columns(t: torch.Tensor, width: int, fill: float = 0, device=None) -> torch.Tensor:
    """t [R, C] (C <= width) copied into a new [R, width] tensor filled with ``fill``:
    the kernels' K padding of codes and scales."""
    out = torch.full((t.shape[0], width), fill, dtype=t.dtype, device=device if device is not None else t.device)
    out[:, : t.shape[1]] = t.to(out.device)
    return out


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)} (flatten the leading dimensions)")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bfloat16 or float16, got {x.dtype}")


def _check(x: torch.Tensor, fmt: str, group_size: int | None, input_scale: torch.Tensor | None) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"activation format {fmt!r}: the A8W8 kernels take {', '.join(FORMATS)}")
    if group_size not in GROUPS:
        raise ValueError(f"group_size={group_size}: per token (None) or 1 x 128 blocks (128)")
    _check_x(x)
    if input_scale is not None and input_scale.shape != (x.shape[1],):
        raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}, expected ({x.shape[1]},)")


def quantize_activation_reference(x: torch.Tensor, fmt: str, group_size: int | None = None,
                                  input_scale: torch.Tensor | None = None):
    """The reference: lowbit.formats on x (after the input scale), codes padded to KQ."""
    _check(x, fmt, group_size, input_scale)
    m, k = x.shape
    if input_scale is not None:
        x = (x.float() / input_scale.float()).to(x.dtype)
    opts = {"granularity": "token"} if group_size is None else {"group_size": group_size}
    qt = quantize_tensor(x, fmt, **opts)
    kq = padded_k(k)
    codes = pad_columns(qt.codes.view(torch.int8 if fmt == "int8" else torch.uint8), kq)
    scales = qt.scales.float()
    scales = scales.reshape(m) if group_size is None else pad_columns(scales, kq // 128, fill=1)
    return codes, scales


def quantize_activation(x: torch.Tensor, fmt: str, group_size: int | None = None,
                        input_scale: torch.Tensor | None = None, backend: str = "triton", pdl: bool = False):
    """x [M, K] bf16/fp16 -> (codes [M, KQ], scales float32 [M] or [M, KQ/128]).
    backend "triton" (CUDA, or CPU tensors under TRITON_INTERPRET) or "reference".
    pdl: the next kernel is launched with programmatic dependent launch (the A8W8 GEMM):
    the quantization kernel lets it start early (it waits for the codes itself)."""
    if backend == "reference":
        return quantize_activation_reference(x, fmt, group_size, input_scale)
    if backend != "triton":
        raise ValueError(f"backend={backend!r}: 'triton' or 'reference'")
    _check(x, fmt, group_size, input_scale)
    from . import _act_quant_triton as aq
    from ._weight_only_triton import interpret_mode

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    kq = padded_k(k)
    int8 = fmt == "int8"
    codes = torch.empty((m, kq), dtype=torch.int8 if int8 else torch.uint8, device=x.device)
    n_groups = kq // 128
    scales = torch.empty((m,) if group_size is None else (m, n_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return codes, scales
    interp = interpret_mode()
    iscale = input_scale.to(device=x.device, dtype=torch.float32).contiguous() if input_scale is not None else x
    quant, chunk_amax = aq.kernel()[:2]
    flags = dict(HAS_ISCALE=input_scale is not None, FP16=x.dtype == torch.float16,
                 RNE_BF16=interp and x.dtype == torch.bfloat16, EMULATE=interp)
    pdl = dict(PDL=True) if pdl and not interp else {}
    split = group_size is None and split_rows(m, kq)
    if split:
        chunks = -(-kq // CHUNK)
        parts = torch.empty((m, chunks), dtype=torch.float32, device=x.device)
        chunk_amax[(m, chunks)](x, iscale, parts, k, x.stride(0), chunks, BLOCK_K=CHUNK, num_warps=4, **flags)
        quant[(m, chunks)](x, iscale, codes, scales, parts, k, kq, x.stride(0), chunks, GROUP=0, BLOCK_K=CHUNK,
                           INT8=int8, SPLIT=True, NP=max(2, 1 << (chunks - 1).bit_length()), num_warps=4, **flags,
                           **pdl)
    elif group_size is None and kq <= ONE_PASS_MAX_K:
        block = 1 << (kq - 1).bit_length()
        quant[(m,)](x, iscale, codes, scales, scales, k, kq, x.stride(0), n_groups, GROUP=0, BLOCK_K=block,
                    INT8=int8, ONE_PASS=True, num_warps=max(4, min(16, block // 512)), **flags, **pdl)
    else:
        quant[(m,)](x, iscale, codes, scales, scales, k, kq, x.stride(0), n_groups,
                    GROUP=0 if group_size is None else 128, BLOCK_K=CHUNK if group_size is None else 128,
                    INT8=int8, num_warps=4, **flags, **pdl)
    return codes, scales


ONE_PASS_MAX_K = 16384  # per-token rows up to this padded length are read once (kept in registers)


CHUNK = 1024  # elements per program when per-token rows are split


SPLIT_MAX_M = 64  # per-token rows split over programs up to this many rows ...
SPLIT_MIN_K = 4097  # ... of at least this padded length
SPLIT_LONG_MAX_M = 512  # rows too long for one pass: split up to this many (4 programs per SM)


def split_rows(m: int, kq: int) -> bool:
    """Per-token scales of few long rows: spread each row over programs (two launches)
    rather than one program walking it twice. A row longer than ONE_PASS_MAX_K walked
    twice by one program is latency-bound: 128 rows of 28672 took ~20 us on the H200
    (Llama-3-70B down at M=128), so such rows are split up to SPLIT_LONG_MAX_M rows."""
    if kq < SPLIT_MIN_K:
        return False
    return m <= SPLIT_MAX_M or (m <= SPLIT_LONG_MAX_M and kq > ONE_PASS_MAX_K)


__all__ = ["quantize_activation", "quantize_activation_reference", "padded_k"]


MX_FORMATS = ("mxfp8_e4m3", "mxfp4")


def quantize_activation_mx_reference(x: torch.Tensor, fmt: str):
    """lowbit.formats' MX quantization (floor rule), codes and scales padded to KQ."""
    _check_mx(x, fmt)
    m, k = x.shape
    kq = padded_k(k)
    qt = quantize_tensor(x, fmt)
    per_byte = 2 if fmt == "mxfp4" else 1
    return pad_columns(qt.codes, kq // per_byte), pad_columns(qt.scales, kq // 32)


def _check_mx(x: torch.Tensor, fmt: str) -> None:
    if fmt not in MX_FORMATS:
        raise ValueError(f"MX activation format {fmt!r}: the kernels take {', '.join(MX_FORMATS)}")
    _check_x(x)


def quantize_activation_mx(x: torch.Tensor, fmt: str, backend: str = "triton"):
    """x [M, K] bf16/fp16 -> (codes uint8 [M, KQ] (MXFP8) or [M, KQ / 2] (MXFP4, two per
    byte, even element in the low nibble), E8M0 scales uint8 [M, KQ / 32]): the MX
    spec's floor rule, bit for bit lowbit.formats' (FORMATS.md)."""
    if backend == "reference":
        return quantize_activation_mx_reference(x, fmt)
    _check_mx(x, fmt)
    from . import _act_quant_triton as aq
    from ._weight_only_triton import interpret_mode

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    kq = padded_k(k)
    fp4 = fmt == "mxfp4"
    codes = torch.empty((m, kq // 2 if fp4 else kq), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, kq // 32), dtype=torch.uint8, device=x.device)
    if m:
        blocks = 4  # 128 elements per program
        aq.kernel()[2][(m, kq // 32 // blocks)](x, codes, scales, x, k, kq, x.stride(0), kq // 32, FP4=fp4, BLOCKS=blocks,
                                                EMULATE=interpret_mode(), num_warps=1)
    return codes, scales


def fake_quantize_activation_mx(x: torch.Tensor, fmt: str, backend: str = "triton") -> torch.Tensor:
    """x [M, K] bf16/fp16 -> the MX-quantized values, dequantized, in x's dtype [M, K]:
    ``lowbit.formats.fake_quantize(x, fmt)`` (the floor rule) in one Triton pass. An
    MXFP8/MXFP4 value (a 4- or 2-bit significand times a power of two) is exact in
    bfloat16 (down to 2^-133) and, for a float16 x, in float16 (module note), so a
    16-bit matmul of these values with a weight is the MX recipe's product: how MX
    activations run on GPUs without block-scaled MMA (QuantLinear, Hopper)."""
    if backend == "reference":
        _check_mx(x, fmt)
        return fake_quantize(x, fmt).to(x.dtype)
    _check_mx(x, fmt)
    from . import _act_quant_triton as aq
    from ._weight_only_triton import interpret_mode

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m and k:
        blocks = 4
        interp = interpret_mode()
        aq.kernel()[2][(m, -(-k // (32 * blocks)))](
            x, out, out, out, k, k, x.stride(0), -(-k // 32), FP4=fmt == "mxfp4", BLOCKS=blocks,
            EMULATE=interp, DEQUANT=True, RNE_BF16=interp and x.dtype == torch.bfloat16, num_warps=1)
    return out


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's tensor scale of x: amax(|x|) / (6 * 448), float32 [1], on x's device
    (torch ops, no host synchronisation)."""
    amax = x.abs().amax().float().reshape(1) if x.numel() else torch.zeros(1, device=x.device)
    return amax / torch.full_like(amax, 6.0 * 448.0)  # a tensor divisor: correctly rounded on CUDA too


def fake_quantize_activation_nvfp4(x: torch.Tensor, backend: str = "triton") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16 (finite) -> (e2m1 * s_b in x's dtype [M, K], s_t float32 [1]):
    NVFP4 with the tensor scale factored out. e2m1 * s_b (at most 6 significant bits,
    between 2^-10 and 2688) is exact in bf16 and fp16, and (e2m1 * s_b) * s_t in float32
    is ``lowbit.formats.fake_quantize(x, "nvfp4")`` bit for bit, so a 16-bit matmul of the
    first with a weight, times s_t, is the a4w4-nvfp4 product (how NVFP4 activations run
    without FP4 tensor cores: QuantLinear, Hopper)."""
    _check_x(x)
    s_t = nvfp4_tensor_scale(x)
    if backend == "reference":
        from ..formats import elements, nvfp4, tiles

        values, codes, _ = nvfp4.quantize(x.float())
        r, k = x.shape
        s_b = tiles.expand(elements.decode(codes, "fp8_e4m3"), (1, nvfp4.BLOCK), r, k)
        return (values * s_b).to(x.dtype), s_t
    from . import _act_quant_triton as aq
    from ._weight_only_triton import interpret_mode

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m and k:
        blocks = 8  # 128 elements per program
        interp = interpret_mode()
        aq.kernel()[3][(m, -(-k // (16 * blocks)))](
            x, s_t, out, out, out, k, k, x.stride(0), BLOCKS=blocks, EMULATE=interp,
            RNE_BF16=interp and x.dtype == torch.bfloat16, num_warps=1)
    return out, s_t


def quantize_activation_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16 (finite) -> (E2M1 codes uint8 [M, KQ / 2], two per byte with the
    even element low; E4M3 block scales uint8 [M, KQ / 16]; the tensor scale s_t float32
    [1]), KQ = K rounded up to 128 with zero codes and scales: ``lowbit.formats``' NVFP4
    bit for bit (the codes and scales of ``quantize_tensor(x, "nvfp4")``), for a kernel
    with FP4 tensor cores (``mx.nvfp4_matmul``)."""
    _check_x(x)
    from . import _act_quant_triton as aq
    from ._weight_only_triton import interpret_mode

    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    kq = padded_k(k)
    s_t = nvfp4_tensor_scale(x)
    codes = torch.empty((m, kq // 2), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, kq // 16), dtype=torch.uint8, device=x.device)
    if m:
        blocks = 8  # 128 elements per program: the grid covers KQ exactly
        aq.kernel()[3][(m, kq // (16 * blocks))](
            x, s_t, codes, codes, scales, k, kq, x.stride(0), BLOCKS=blocks, EMULATE=interpret_mode(),
            CODES=True, num_warps=1)
    return codes, scales, s_t
