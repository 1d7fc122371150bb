"""Triton kernels of the weight-only matmul y = x W^T (+ bias), W packed by
``packing.pack_weight`` (see its docstring for the layout).

Private: ``weight_only.py`` is the public op. This module imports triton at the
top; import it only where triton is wanted.

One kernel covers every supported format (constexpr switches) and two
orientations:

- ``SWAP=False``: acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, k] @ w[k, BLOCK_N], the
  tiled GEMM for larger M.
- ``SWAP=True``: acc[BLOCK_N, BLOCK_M] += w[BLOCK_N, k] @ x^T[k, BLOCK_M]
  (computes y^T), for small M: the dequantized weight is the left operand
  (it can stay in registers on Hopper's wgmma) and the token count is the
  narrow side of the MMA (16 at least).

K is walked in tiles of NSUB sub-blocks of KS elements; each sub-block has one
scale row (one group); a 4-bit sub-block is two contiguous halves (low and high
nibbles), one dot each. Split-K (a second grid axis of `split` programs) gives
each program a contiguous range of K tiles and writes float32 partials to a
workspace [split, M, N] that a second kernel sums (adding the bias and
casting): deterministic, no atomics, no host synchronisation, so the pair is
safe to capture in a CUDA graph.

Dequantization matches the reference bit for bit: (q - z) * s or q * s in
float32 for ints, e2m1 value * 2^(e - 127) for MXFP4, then one cast to x's
dtype; the dot accumulates in float32. Codes become floats by bit tricks (an
OR with the bits of 2^23 and one subtraction for ints, the float32 bit pattern
assembled directly for e2m1), not by the quarter-rate int-to-float
instruction. Bit operations run on int32 (the interpreter and the GPU agree
there).

The kernels are wrapped by ``triton.jit`` lazily, once per interpreter mode
(TRITON_INTERPRET is read when a function is wrapped): whoever imports this
module first cannot lock the other mode out.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_E8M0_NAN_BITS = tl.constexpr(0x7FC00000)  # float32 quiet NaN
_F32_HALF_EXP = tl.constexpr(126 << 23)  # e2m1 with exponent field e > 0: bits (mag << 22) + (126 << 23)
# 0x3F000000 = float32 0.5, 0x4B000000 = float32 2^23: literals in the kernel


def _wo_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr,
    M, N, K, NKS, T, TPS, NPAD,
    stride_xm, stride_ym,
    FAMILY: tl.constexpr,  # 0: int, 1: mxfp4
    BITS: tl.constexpr,  # 4 or 8
    SYMMETRIC: tl.constexpr,  # int: codes stored as q + 2^(BITS-1)
    HAS_ZERO: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    SUBS_PER_GROUP: tl.constexpr,
    KS: tl.constexpr,  # K elements per sub-block
    KH: tl.constexpr,  # codes rows per sub-block: KS // 2 for 4-bit, KS for 8-bit
    NSUB: tl.constexpr,  # sub-blocks per K tile
    EVEN_T: tl.constexpr,  # NKS % NSUB == 0: no sub-block past the end
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    PARTIAL: tl.constexpr,  # split-K: write float32 partials to ws[pid_k] (no bias, no cast)
    SWAP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_TY: tl.constexpr,  # x's dtype; float32 under the interpreter for bf16 (see _dot_type)
    RNE_BF16: tl.constexpr,  # interpreter with bf16: round float32 -> bf16 by bits (see _dot_type)
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-blocks share each weight tile while it is in L2
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    x_row = offs_m.to(tl.int64) * stride_xm
    offs_h = tl.arange(0, KH)

    if PER_CHANNEL:
        s_pc = tl.load(s_ptr + offs_n).to(tl.float32)
        if SWAP:
            s_pc = s_pc[:, None]
        else:
            s_pc = s_pc[None, :]
        if HAS_ZERO:
            z_pc = tl.load(z_ptr + offs_n).to(tl.float32)
            if SWAP:
                z_pc = z_pc[:, None]
            else:
                z_pc = z_pc[None, :]

    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    t_begin = pid_k * TPS
    t_end = tl.minimum(t_begin + TPS, T)
    for t in range(t_begin, t_end):
        for i in tl.static_range(NSUB):
            sb = t * NSUB + i
            # ---- packed codes of this sub-block: rows [sb*KH, sb*KH + KH) of [kpad/epb, NPAD]
            rows = (sb * KH + offs_h).to(tl.int64) * NPAD
            if SWAP:
                w_ptrs = w_ptr + offs_n[:, None] + rows[None, :]
            else:
                w_ptrs = w_ptr + rows[:, None] + offs_n[None, :]
            if EVEN_T:
                p = tl.load(w_ptrs)
            else:
                row_ok = (sb * KH + offs_h) < NKS * KH  # sub-blocks past the end read zeros
                if SWAP:
                    p = tl.load(w_ptrs, mask=row_ok[None, :], other=0)
                else:
                    p = tl.load(w_ptrs, mask=row_ok[:, None], other=0)
            if not EVEN_T:
                col_ok = (offs_n * 0 + sb) < NKS
            # ---- scales (and zeros) of this sub-block's group
            if FAMILY == 1:
                if EVEN_T:
                    e = tl.load(s_ptr + sb.to(tl.int64) * NPAD + offs_n)
                else:
                    e = tl.load(s_ptr + sb.to(tl.int64) * NPAD + offs_n, mask=col_ok, other=127)
                e = e.to(tl.int32)
                sbits = tl.where(e == 0, 1 << 22, e << 23)  # 2^(e-127); e = 0 is subnormal 2^-127
                sbits = tl.where(e == 255, _E8M0_NAN_BITS, sbits)
                s = sbits.to(tl.float32, bitcast=True)
            elif PER_CHANNEL:
                s = s_pc
                if HAS_ZERO:
                    z = z_pc
            else:
                g = (sb // SUBS_PER_GROUP).to(tl.int64) * NPAD
                if EVEN_T:
                    s = tl.load(s_ptr + g + offs_n).to(tl.float32)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g + offs_n).to(tl.float32)
                else:
                    s = tl.load(s_ptr + g + offs_n, mask=col_ok, other=0).to(tl.float32)
                    if HAS_ZERO:
                        z = tl.load(z_ptr + g + offs_n, mask=col_ok, other=0).to(tl.float32)
            if not PER_CHANNEL:
                if SWAP:
                    s = s[:, None]
                    if HAS_ZERO:
                        z = z[:, None]
                else:
                    s = s[None, :]
                    if HAS_ZERO:
                        z = z[None, :]

            k_lo = sb * KS + offs_h  # K index of the first (or only) half
            # Codes are unsigned (symmetric ints biased by 2^(b-1) at packing). An
            # integer u < 2^23 becomes float exactly and cheaply as
            # bits(0x4B000000 | u) - 2^23 (no int-to-float conversion instruction);
            # subtracting 2^23 + bias instead gives the signed code q.
            if SYMMETRIC:
                if BITS == 4:
                    off = 8388616.0  # 2^23 + 8
                else:
                    off = 8388736.0  # 2^23 + 128
            else:
                off = 8388608.0  # 2^23
            if BITS == 4:
                p = p.to(tl.int32)
                lo = p & 15
                hi = p >> 4
                if FAMILY == 1:
                    # e2m1 (s ee m) -> float32 bits: |v| = (1 + m/2) 2^(e-1) for e > 0 is
                    # bits (mag << 22) + (126 << 23); mag = 1 is 0.5; mag = 0 is +-0
                    mag_lo = lo & 7
                    b_lo = tl.where(mag_lo >= 2, (mag_lo << 22) + _F32_HALF_EXP, mag_lo * 0x3F000000)
                    f_lo = (b_lo | ((lo & 8) << 28)).to(tl.float32, bitcast=True)
                    mag_hi = hi & 7
                    b_hi = tl.where(mag_hi >= 2, (mag_hi << 22) + _F32_HALF_EXP, mag_hi * 0x3F000000)
                    f_hi = (b_hi | ((hi & 8) << 28)).to(tl.float32, bitcast=True)
                    w_lo = f_lo * s
                    w_hi = f_hi * s
                else:
                    q_lo = (lo | 0x4B000000).to(tl.float32, bitcast=True) - off
                    q_hi = (hi | 0x4B000000).to(tl.float32, bitcast=True) - off
                    if HAS_ZERO:
                        w_lo = (q_lo - z) * s
                        w_hi = (q_hi - z) * s
                    else:
                        w_lo = q_lo * s
                        w_hi = q_hi * s
                if RNE_BF16:  # interpreter: round to bf16 by bits (its cast truncates)
                    w_lo_u = w_lo.to(tl.int32, bitcast=True)
                    w_lo = ((w_lo_u + 0x7FFF + ((w_lo_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                if RNE_BF16:  # interpreter: round to bf16 by bits (its cast truncates)
                    w_hi_u = w_hi.to(tl.int32, bitcast=True)
                    w_hi = ((w_hi_u + 0x7FFF + ((w_hi_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                k_hi = k_lo + KH
                if SWAP:
                    x_lo = tl.load(x_ptr + x_row[None, :] + k_lo[:, None],
                                   mask=m_ok[None, :] & (k_lo[:, None] < K), other=0.0)
                    x_hi = tl.load(x_ptr + x_row[None, :] + k_hi[:, None],
                                   mask=m_ok[None, :] & (k_hi[:, None] < K), other=0.0)
                    acc = tl.dot(w_lo.to(x_lo.dtype).to(DOT_TY), x_lo.to(DOT_TY), acc)
                    acc = tl.dot(w_hi.to(x_hi.dtype).to(DOT_TY), x_hi.to(DOT_TY), acc)
                else:
                    x_lo = tl.load(x_ptr + x_row[:, None] + k_lo[None, :],
                                   mask=m_ok[:, None] & (k_lo[None, :] < K), other=0.0)
                    x_hi = tl.load(x_ptr + x_row[:, None] + k_hi[None, :],
                                   mask=m_ok[:, None] & (k_hi[None, :] < K), other=0.0)
                    acc = tl.dot(x_lo.to(DOT_TY), w_lo.to(x_lo.dtype).to(DOT_TY), acc)
                    acc = tl.dot(x_hi.to(DOT_TY), w_hi.to(x_hi.dtype).to(DOT_TY), acc)
            else:
                q = (p.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - off
                if HAS_ZERO:
                    w = (q - z) * s
                else:
                    w = q * s
                if RNE_BF16:  # interpreter: round to bf16 by bits (its cast truncates)
                    w_u = w.to(tl.int32, bitcast=True)
                    w = ((w_u + 0x7FFF + ((w_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                if SWAP:
                    xt = tl.load(x_ptr + x_row[None, :] + k_lo[:, None],
                                 mask=m_ok[None, :] & (k_lo[:, None] < K), other=0.0)
                    acc = tl.dot(w.to(xt.dtype).to(DOT_TY), xt.to(DOT_TY), acc)
                else:
                    xt = tl.load(x_ptr + x_row[:, None] + k_lo[None, :],
                                 mask=m_ok[:, None] & (k_lo[None, :] < K), other=0.0)
                    acc = tl.dot(xt.to(DOT_TY), w.to(xt.dtype).to(DOT_TY), acc)

    # ---- epilogue: partials, or bias + cast + store
    n_ok = offs_n < N
    if SWAP:
        mask = n_ok[:, None] & m_ok[None, :]
        if PARTIAL:
            ws_ptrs = ws_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
            tl.store(ws_ptrs, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if RNE_BF16:
                acc_u = acc.to(tl.int32, bitcast=True)
                acc = ((acc_u + 0x7FFF + ((acc_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            y_ptrs = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mask = m_ok[:, None] & n_ok[None, :]
        if PARTIAL:
            ws_ptrs = ws_ptr + pid_k.to(tl.int64) * M * N + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(ws_ptrs, acc, mask=mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if RNE_BF16:
                acc_u = acc.to(tl.int32, bitcast=True)
                acc = ((acc_u + 0x7FFF + ((acc_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
            y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _splitk_reduce_kernel(
    ws_ptr, b_ptr, y_ptr, MN, N, SPLIT_K,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """y[i] = sum_s ws[s, i] (+ bias[i % N]), cast to y's dtype; y contiguous [M, N]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(SPLIT_K):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += MN
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    if RNE_BF16:
        acc_u = acc.to(tl.int32, bitcast=True)
        acc = ((acc_u + 0x7FFF + ((acc_u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_JITTED: dict[bool, tuple] = {}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernels():
    mode = interpret_mode()
    if mode not in _JITTED:
        # M and the K-tile counts change from call to call: one compiled variant
        # serves every value (no M == 1 specialisation)
        _JITTED[mode] = (
            triton.jit(_wo_matmul_kernel, do_not_specialize=["M", "NKS", "T", "TPS"]),
            triton.jit(_splitk_reduce_kernel, do_not_specialize=["MN", "SPLIT_K"]),
        )
    return _JITTED[mode]


_REDUCE_BLOCK = 1024


def _dot_type(dtype: torch.dtype):
    """The dot's operand type: x's dtype on the GPU.

    Two workarounds for Triton's CPU interpreter (3.9) with bfloat16, both
    active only under TRITON_INTERPRET: its dot multiplies bfloat16 operands as
    their raw uint16 bits, so both operands are widened to float32 after the
    weight's rounding to bfloat16 (the same products: a bf16 value is exact in
    float32; float32 accumulation either way); and its float32 -> bfloat16 cast
    truncates, so the kernels round to nearest even by bits first (RNE_BF16),
    which is what the GPU's cast does.
    """
    if dtype == torch.bfloat16:
        return tl.float32 if interpret_mode() else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def launch(x2: torch.Tensor, pw, bias: torch.Tensor | None, y: torch.Tensor, cfg) -> None:
    """y[M, N] = x2[M, K] @ W^T (+ bias) with the config ``cfg`` (a WeightOnlyConfig
    already validated for ``pw``). x2 has unit stride along K, y is contiguous."""
    matmul, reduce = _kernels()
    rne = x2.dtype == torch.bfloat16 and interpret_mode()
    lay = pw.layout
    m, k = x2.shape
    n = pw.n
    nsub = cfg.block_k // lay.ks
    n_sub_total = lay.n_sub
    t_total = -(-n_sub_total // nsub)
    split = max(1, min(cfg.split_k, t_total))
    tps = -(-t_total // split)
    split = -(-t_total // tps)  # no empty split
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else y
    dummy = pw.scales
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    matmul[grid](
        x2, pw.codes, pw.scales, pw.zeros if pw.zeros is not None else dummy,
        bias if bias is not None else dummy, y, ws,
        m, n, k, n_sub_total, t_total, tps, lay.npad,
        x2.stride(0), y.stride(0),
        FAMILY=1 if lay.family == "mx" else 0,
        BITS=lay.bits,
        SYMMETRIC=lay.symmetric,
        HAS_ZERO=lay.has_zeros,
        PER_CHANNEL=lay.per_channel,
        SUBS_PER_GROUP=lay.subs_per_group,
        KS=lay.ks,
        KH=lay.rows_per_sub,
        NSUB=nsub,
        EVEN_T=n_sub_total % nsub == 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m,
        PARTIAL=split > 1,
        SWAP=cfg.swap_ab,
        HAS_BIAS=bias is not None,
        DOT_TY=_dot_type(x2.dtype),
        RNE_BF16=rne,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split > 1:
        mn = m * n
        reduce[(triton.cdiv(mn, _REDUCE_BLOCK),)](
            ws, bias if bias is not None else dummy, y, mn, n, split,
            BLOCK=_REDUCE_BLOCK, HAS_BIAS=bias is not None, RNE_BF16=rne, num_warps=4,
        )
