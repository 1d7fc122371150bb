"""Triton kernel of the weight-only matmul with K-major 4-bit codes (one byte =
two neighbours along K), for the MMA paths (M >= 2).

Private: ``weight_only.py`` is the public op. Computes y^T = W x^T tile by tile:
the weight tile [BLOCK_N, 128] is the MMA's register operand and x^T [128,
BLOCK_M] the shared-memory one. Loading the bytes [BLOCK_N, 64] and splitting
each into its two codes (``tl.join`` of the low and high nibble, reshaped to
[BLOCK_N, 128]) lets Triton read the bytes straight into the MMA operand's
register layout (pipelined global -> shared copies, then one shared load per
byte), dequantize them there and issue register-operand wgmma: no shared-memory
round trip of the dequantized tile, which the word layout of
``_weight_only_triton`` needs (its decoded pairs are 64 apart along K).

Numerics: those of ``packing.kernel_weight`` for 4-bit ints, round(q * scale +
bias) with one rounding in x's dtype (two ``fma.rn.bf16x2``: the code exactly,
then scale and bias). Groups: one scale per row or a multiple of 128 (one per
K tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._weight_only_triton import _dot_type, interpret_mode, reduce_split, split_k_plan

# One byte (in the low 8 bits of $2) -> its two codes' values, as the bf16x2 / f16x2
# pair (low nibble, high nibble): byte * 0x1001 puts the high nibble at bits 16-19,
# LOP3 keeps both nibbles and ORs in the magic 128.0 (1024.0) pair, the first FMA
# removes the magic exactly, the second applies scale ($3) and bias ($4).
_PAIR_BODY = """
{{
.reg .b32 v, sb, bb, one, off;
mov.b32 one, {one};
mov.b32 off, {off};
mul.lo.u32 v, $2, 4097;
lop3.b32 v, v, 0x000F000F, {magic}, 0xEA;
fma.rn.{ty} v, v, one, off;
mov.b32 sb, {{$3, $3}};
mov.b32 bb, {{$4, $4}};
fma.rn.{ty} v, v, sb, bb;
mov.b32 {{$0, $1}}, v;
}}
"""
_PAIR_BF16 = tl.constexpr(_PAIR_BODY.format(ty="bf16x2", one="0x3F803F80", off="0xC300C300", magic="0x43004300"))
_PAIR_FP16 = tl.constexpr(_PAIR_BODY.format(ty="f16x2", one="0x3C003C00", off="0xE400E400", magic="0x64006400"))


def _dequant_bytes(c, s, b, ASM: tl.constexpr, FP16: tl.constexpr, DOT_TY: tl.constexpr, RNE_BF16: tl.constexpr):
    """Bytes c [BN, 64] (uint8), scale and bias [BN, 1] -> the values [BN, 128] in DOT_TY."""
    if ASM:
        ci = c.to(tl.int32)
        sv = tl.broadcast_to(s, c.shape)
        bv = tl.broadcast_to(b, c.shape)
        if FP16:
            lo, hi = tl.inline_asm_elementwise(_PAIR_FP16, "=h,=h,r,h,h", [ci, sv, bv],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(_PAIR_BF16, "=h,=h,r,h,h", [ci, sv, bv],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
    else:
        ci = c.to(tl.int32)
        lo = tl.fma((ci & 15).to(tl.float32), s, b)
        hi = tl.fma((ci >> 4).to(tl.float32), s, b)
        if RNE_BF16:
            lo = _round_to_bf16(lo)
            hi = _round_to_bf16(hi)
        lo = lo.to(DOT_TY)
        hi = hi.to(DOT_TY)
    return tl.reshape(tl.join(lo, hi), (c.shape[0], 2 * c.shape[1]))


def _km_kernel(
    x_ptr, c_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NT, TPS, NPAD, KB,
    stride_xm, stride_ym,
    GROUP: tl.constexpr,  # 0: one scale per row; else a multiple of 128
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ASM: tl.constexpr,
    FP16: tl.constexpr,
    DOT_TY: tl.constexpr,
    RNE_BF16: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_b = tl.arange(0, 64)
    offs_k = tl.arange(0, 128)
    c_base = c_ptr + offs_n.to(tl.int64)[:, None] * KB + offs_b[None, :]
    x_base = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + offs_k[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    t_begin = pid_k * TPS
    t_end = tl.minimum(t_begin + TPS, NT)
    for t in range(t_begin, t_end):
        c = tl.load(c_base + t * 64)
        if GROUP == 0:
            g = t * 0
        else:
            g = (t * 128) // GROUP
        s = tl.load(s_ptr + g * NPAD + offs_n)[:, None]
        b = tl.load(b_ptr + g * NPAD + offs_n)[:, None]
        if not ASM:
            s = s.to(tl.float32)
            b = b.to(tl.float32)
        w = _dequant_bytes(c, s, b, ASM, FP16, DOT_TY, RNE_BF16)
        if EVEN_K:
            xt = tl.load(x_base + t * 128, mask=m_ok[None, :], other=0.0)
        else:
            xt = tl.load(x_base + t * 128, mask=m_ok[None, :] & ((t * 128 + offs_k)[:, None] < K), other=0.0)
        acc = tl.dot(w, xt.to(DOT_TY), acc)
    _store_tile(acc, offs_m, offs_n, m_ok, offs_n < N, M, N, stride_ym, pid_k, y_ptr, ws_ptr, bias_ptr,
                True, PARTIAL, HAS_BIAS, RNE_BF16)


_JITTED: dict = {}


def _kernel():
    """The kernel for the current mode (compiled, or interpreted); its device
    functions are module globals set to this mode's wrappers (as in
    ``_weight_only_triton``, whose epilogue it shares)."""
    from . import _weight_only_triton as wo

    mode = interpret_mode()
    wo._kernels()  # sets wo's helpers (the epilogue and its rounding) for this mode
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_km_kernel, do_not_specialize=["M", "NT", "TPS"]), triton.jit(_dequant_bytes))
    kern, dequant = _JITTED[mode]
    globals().update(_dequant_bytes=dequant, _store_tile=wo._store_tile, _round_to_bf16=wo._round_to_bf16)
    return kern


def launch(x2: torch.Tensor, pw, bias: torch.Tensor | None, y: torch.Tensor, cfg) -> None:
    """y[M, N] = x2[M, K] @ W^T (+ bias) from pw.kbytes (see the module docstring)."""
    kern = _kernel()
    interp = interpret_mode()
    rne = x2.dtype == torch.bfloat16 and interp
    lay = pw.layout
    m, k = x2.shape
    split, tps, ws = split_k_plan(lay.n_tiles, cfg.split_k, y)
    grid = (triton.cdiv(pw.n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    kern[grid](
        x2, pw.kbytes, pw.scales, pw.biases, bias if bias is not None else pw.scales, y, ws,
        m, pw.n, k, lay.n_tiles, tps, lay.npad, lay.kpad // 2,
        x2.stride(0), y.stride(0),
        GROUP=lay.group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PARTIAL=split > 1, HAS_BIAS=bias is not None,
        ASM=not interp, FP16=x2.dtype == torch.float16, DOT_TY=_dot_type(x2.dtype), RNE_BF16=rne,
        EVEN_K=k % 128 == 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    reduce_split(ws, split, bias, y, rne)
