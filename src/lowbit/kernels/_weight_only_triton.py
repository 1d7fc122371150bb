"""Triton kernels of the weight-only matmul y = x W^T (+ bias), W packed by
``packing.pack_weight`` (see its docstring for the layout).

Private: ``weight_only.py`` is the public op. This module imports triton at the
top; import it only where triton is wanted.

One kernel covers every supported format (constexpr switches) and three
orientations (MODE):

- 0, GEMM: acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, k] @ w[k, BLOCK_N], for larger M.
- 1, SWAP: acc[BLOCK_N, BLOCK_M] += w^T[BLOCK_N, k] @ x^T[k, BLOCK_M] (computes
  y^T) for small M: the weight is the MMA's wide side and the tokens its
  narrow side (16 at least).
- 2, GEMV: no MMA; products summed in float32 on the CUDA cores, for M of 1
  to a few.

K is walked one tile (128 elements, R word rows) at a time. Each 32-bit word
holds 8 (or 4) codes, position j of the word belonging to the K chunk
[j*R, (j+1)*R) of the tile, so the values of one word feed 8 (or 4) separate
dots of depth R. Split-K (a second grid axis) gives each program a range of
K tiles and writes float32 partials to a workspace [split, M, N] that a
second kernel sums (adding the bias and casting): deterministic, no atomics,
no host synchronisation, so the pair is safe to capture in a CUDA graph.

Dequantization on the GPU is inline PTX (``_dequant_ptx``) that converts two
codes per instruction (the packed bf16x2/f16x2 forms): a 2- or 4-bit int code
is OR-ed into the mantissa of 128.0 (bf16) or 1024.0 (fp16), the offset
subtracted exactly, then one fused multiply-add applies scale and bias in the
activation dtype; an e2m1 code's bits (mxfp4, nvfp4) are moved into a
bf16/fp16 (subnormal for e = 0) and multiplied by the power of two 2^(E-1)
(bf16) or 2^(E-113) (fp16) that carries the MX block scale, or by NVFP4's
stored block scale; 8-bit int codes go through float32 (byte permute into the
mantissa of 2^23, subtract, fma with scale and bias) and one paired
conversion; FP8 bytes through the hardware's exact e4m3x2/e5m2x2 -> f16x2
conversion, float32 and the scale. ``packing.kernel_weight`` computes the same
values in torch. Triton's CPU interpreter cannot run PTX: under
TRITON_INTERPRET the same values are computed with plain Triton operations.

The kernels are wrapped by ``triton.jit`` lazily, once per interpreter mode
(TRITON_INTERPRET is read when a function is wrapped).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._dequant_ptx import (  # the PTX strings the jitted code names (module globals)
    _F32_CODES4,
    _F32_CODES8,
    _I4_ASM_BF16,
    _I4_ASM_BF16_F32,
    _I4_ASM_FP16_F32,
    _MX_ASM_BF16_F32,
    _MX_ASM_FP16_F32,
    _I4_ASM_FP16,
    _MX_ASM_BF16,
    _MX_ASM_FP16,
    _F8_F32_E4M3,
    _F8_F32_E5M2,
    _F8_ASM_E4M3_BF16,
    _F8_ASM_E4M3_FP16,
    _F8_ASM_E5M2_BF16,
    _F8_ASM_E5M2_FP16,
    _I8_ASM_BF16,
    _I2_ASM_BF16,
    _I2_ASM_FP16,
    _I8_ASM_FP16,
)
from .packing import has_f32_gemv



def _pair(lo, hi):
    """Two 16-bit floats -> the 32-bit word (lo in the low half)."""
    lo_b = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_b = hi.to(tl.int16, bitcast=True).to(tl.int32)
    return lo_b | (hi_b << 16)


def _mx_scale_bits(e, FP16: tl.constexpr):
    """E8M0 exponent (int32) -> the bits of the bf16 2^(E-1) / fp16 2^(E-113)."""
    if FP16:
        return tl.where(e >= 99, (e - 98) << 10, 1 << tl.maximum(e - 89, 0))
    else:
        return (e + 126) << 7


def _round_to_bf16(v):
    """float32 -> the nearest bf16 value (ties to even) kept in float32: the
    interpreter's cast truncates."""
    u = v.to(tl.int32, bitcast=True)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


def _fp8_value(c, E5M2: tl.constexpr):
    """Interpreter: an E4M3 / E5M2 byte (int32) -> its float32 value, by bits: the
    magnitude bits placed under float32's exponent read as a (sub)normal float32,
    times 2^(127 - bias) (exact), then the specials and the sign."""
    mag = c & 0x7F
    if E5M2:
        v = (mag << 21).to(tl.float32, bitcast=True) * 5.192296858534828e33  # 2^112
        v = tl.where(mag > 0x7C, float("nan"), tl.where(mag == 0x7C, float("inf"), v))
    else:
        v = (mag << 20).to(tl.float32, bitcast=True) * 1.329227995784916e36  # 2^120
        v = tl.where(mag == 0x7F, float("nan"), v)
    return tl.where((c & 0x80) != 0, -v, v)


def _emulate(word, J: tl.constexpr, s, b, FAMILY: tl.constexpr, BITS: tl.constexpr, DOT_TY: tl.constexpr,
             RNE_BF16: tl.constexpr, E5M2: tl.constexpr = False):
    """Interpreter: the value at position J of each word, as the PTX computes it.
    s, b: float32 scale and bias (int); the int32 E8M0 exponent in s (mxfp4); the
    float32 scale in s (fp8, mxfp8, nvfp4: for nvfp4 already times 2^-7, see
    ``_load_group``)."""
    c = (word >> (J * BITS)) & ((1 << BITS) - 1)
    if FAMILY == 1 or FAMILY == 4:
        mag = c & 7
        bits = tl.where(mag >= 2, (mag << 22) + (126 << 23), mag * 0x3F000000) | ((c & 8) << 28)
        if FAMILY == 1:
            scale = tl.where(s == 0, 1 << 22, s << 23).to(tl.float32, bitcast=True)
        else:
            scale = s
        w = bits.to(tl.float32, bitcast=True) * scale
    elif FAMILY == 2 or FAMILY == 3:
        w = _fp8_value(c, E5M2) * s
    else:
        w = tl.fma(c.to(tl.float32), s, b)
    if RNE_BF16:
        w = _round_to_bf16(w)
    return w.to(DOT_TY)


def _acc_chunk(acc, w, x_base, m_ok, k0, offs_r, K, MODE: tl.constexpr, DOT_TY: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += the product of the values w [R, BLOCK_N] of K chunk [k0, k0 + R) with x;
    x_base: pointers to x[m, offs_r] ([R, BLOCK_M] for SWAP, else [BLOCK_M, R])."""
    if MODE == 1:
        if EVEN_K:
            xt = tl.load(x_base + k0, mask=m_ok[None, :], other=0.0)
        else:
            xt = tl.load(x_base + k0, mask=m_ok[None, :] & ((k0 + offs_r)[:, None] < K), other=0.0)
        acc = tl.dot(tl.trans(w), xt.to(DOT_TY), acc)
    else:
        if MODE == 0:
            if EVEN_K:
                xt = tl.load(x_base + k0, mask=m_ok[:, None], other=0.0)
            else:
                xt = tl.load(x_base + k0, mask=m_ok[:, None] & ((k0 + offs_r)[None, :] < K), other=0.0)
            acc = tl.dot(xt.to(DOT_TY), w, acc)
        else:  # GEMV, one token per program (no mask along M): acc [R, BLOCK_N] gathers products (one FMA each)
            if EVEN_K:
                xt = tl.load(x_base + k0)
            else:
                xt = tl.load(x_base + k0, mask=(k0 + offs_r)[None, :] < K, other=0.0)
            acc += w.to(tl.float32) * tl.reshape(xt, (xt.shape[1], 1)).to(tl.float32)
    return acc


def _stack2(a, b):
    """[R, C] and [R, C] -> [2R, C]: a's rows, then b's."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))


def _stack8(w0, w1, w2, w3, w4, w5, w6, w7):
    return _stack2(_stack2(_stack2(w0, w1), _stack2(w2, w3)), _stack2(_stack2(w4, w5), _stack2(w6, w7)))


def _stack4(w0, w1, w2, w3):
    return _stack2(_stack2(w0, w1), _stack2(w2, w3))


def _acc_tile(acc, w, x_base, m_ok, k0, offs_k, K, MODE: tl.constexpr, DOT_TY: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += the product of the values w [128, BLOCK_N] of K tile [k0, k0 + 128) with x;
    x_base: pointers to x[m, offs_k] ([128, BLOCK_M] for SWAP, else [BLOCK_M, 128])."""
    if MODE == 1:
        if EVEN_K:
            xt = tl.load(x_base + k0, mask=m_ok[None, :], other=0.0)
        else:
            xt = tl.load(x_base + k0, mask=m_ok[None, :] & ((k0 + offs_k)[:, None] < K), other=0.0)
        acc = tl.dot(tl.trans(w), xt.to(DOT_TY), acc)
    else:
        if EVEN_K:
            xt = tl.load(x_base + k0, mask=m_ok[:, None], other=0.0)
        else:
            xt = tl.load(x_base + k0, mask=m_ok[:, None] & ((k0 + offs_k)[None, :] < K), other=0.0)
        acc = tl.dot(xt.to(DOT_TY), w, acc)
    return acc


def _gemv_chunk(tacc, xs, xh, f, x_base, m_ok, k0, offs_r, K, EVEN_K: tl.constexpr, FIRST: tl.constexpr,
                HI: tl.constexpr, MASK_M: tl.constexpr):
    """GEMV, integer codes, float32: one position's codes as f = C + q (see
    ``_f32_codes_asm``), accumulated as x * f into tacc [R, BLOCK_N]; xs [R, 1] gathers
    the x values (for the C part), xh those of the 4-bit high-half positions (HI),
    whose C is larger by 67/256. One token per program, so m_ok is all true: MASK_M
    keeps the mask anyway, which makes ptxas keep fewer x loads in flight (the 8-bit
    GEMV then uses fewer registers and ran ~8% faster on the H200)."""
    if MASK_M:
        kmask = m_ok[:, None]
        if not EVEN_K:
            kmask = kmask & ((k0 + offs_r)[None, :] < K)
        xt = tl.load(x_base + k0, mask=kmask, other=0.0)
    elif EVEN_K:
        xt = tl.load(x_base + k0)
    else:
        xt = tl.load(x_base + k0, mask=(k0 + offs_r)[None, :] < K, other=0.0)
    xc = tl.reshape(xt, (xt.shape[1], 1)).to(tl.float32)
    if FIRST:
        if HI:
            return xc * f, xc, xc
        return xc * f, xc, xh * 0.0
    if HI:
        return tacc + xc * f, xs + xc, xh + xc
    return tacc + xc * f, xs + xc, xh


def _gemv_flush(acc, tacc, xs, xh, s, b, BITS: tl.constexpr, MIXED: tl.constexpr, ALL_HI: tl.constexpr):
    """acc += the group's contribution sum x (q s + b) = s sum x f + sum x (b - C s), C the
    positions' offsets (``_f32_codes_asm``): 128 (4-bit, low half), 128 + 67/256 (4-bit,
    high half; MIXED: the group has both, ALL_HI: only these), 1 with f scaled by 256 (8-bit)."""
    sf = s.to(tl.float32)[None, :]
    bf = b.to(tl.float32)[None, :]
    if BITS == 8:
        alpha = sf * 256.0
        return acc + alpha * tacc + (bf - alpha) * xs
    if ALL_HI:
        return acc + sf * tacc + (bf - 128.26171875 * sf) * xs
    if MIXED:
        return acc + sf * tacc + (bf - 128.0 * sf) * xs + (-0.26171875 * sf) * xh
    return acc + sf * tacc + (bf - 128.0 * sf) * xs


def _f32_codes_emulated(word, J: tl.constexpr, BITS: tl.constexpr):
    """Interpreter: the float32 the PTX of ``_f32_codes_asm`` gives for position J, by bits."""
    if BITS == 4:
        lo = (word >> ((J % 4) * 4)) & 0xF
        if J >= 4:
            bits = 0x43004300 | (((word >> (J * 4)) & 0xF) << 16) | lo
        else:
            bits = 0x43000000 | (lo << 16)
    else:
        bits = (((word >> (J * 8)) & 0xFF) << 15) | 0x3F800000
    return bits.to(tl.float32, bitcast=True)


def _sel4(i: tl.constexpr, a0, a1, a2, a3):
    if i == 0:
        return a0
    elif i == 1:
        return a1
    elif i == 2:
        return a2
    else:
        return a3


def _gemv_pos(acc, tacc, xs, xh, f, x_base, m_ok, k0, offs_r, K, J: tl.constexpr, s0, b0, s1, b1, s2, b2, s3, b3,
              BITS: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr):
    """Position J of the integer GEMV's tile: its products into (tacc, xs, xh), and the
    group's flush into acc after the group's last position."""
    R: tl.constexpr = 4 * BITS
    PG: tl.constexpr = GROUP // R if (GROUP > 0 and GROUP < 128) else 32 // BITS  # positions per group
    HI: tl.constexpr = BITS == 4 and J >= 4
    tacc, xs, xh = _gemv_chunk(tacc, xs, xh, f, x_base, m_ok, k0 + J * R, offs_r, K, EVEN_K, J % PG == 0, HI,
                               BITS == 8)
    if J % PG == PG - 1:
        FIRST_HI: tl.constexpr = BITS == 4 and (J - PG + 1) >= 4
        acc = _gemv_flush(acc, tacc, xs, xh, _sel4(J // PG, s0, s1, s2, s3), _sel4(J // PG, b0, b1, b2, b3), BITS,
                          HI and not FIRST_HI, FIRST_HI)
    return acc, tacc, xs, xh


def _gemv_int_tile(acc, word, s0, b0, s1, b1, s2, b2, s3, b3, x_base, m_ok, k0, offs_r, K,
                   BITS: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """One K tile of the integer GEMV: per group, sum x * f in float32, then scale
    and bias applied once per (row, column) of the accumulator."""
    R: tl.constexpr = 4 * BITS
    xs = tl.zeros((R, 1), dtype=tl.float32)  # placeholders: a group's first position starts them
    xh = xs
    tacc = acc
    NPOS: tl.constexpr = 32 // BITS  # codes per word
    if ASM:
        if BITS == 4:
            fs = tl.inline_asm_elementwise(
                _F32_CODES4, "=r,=r,=r,=r,=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            fs = tl.inline_asm_elementwise(
                _F32_CODES8, "=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    for j in tl.static_range(NPOS):
        if ASM:
            f = fs[j]
        else:
            f = _f32_codes_emulated(word, j, BITS)
        acc, tacc, xs, xh = _gemv_pos(acc, tacc, xs, xh, f, x_base, m_ok, k0, offs_r, K, j,
                                      s0, b0, s1, b1, s2, b2, s3, b3, BITS, GROUP, EVEN_K)
    return acc


def _gemv_fp8_tile(acc, word, s0, s1, s2, s3, x_base, k0, offs_r, K, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                   ASM: tl.constexpr, E5M2: tl.constexpr):
    """One K tile of the float32 GEMV of FP8 codes (fp8, mxfp8): the codes' exact values
    times x summed in float32, the scale applied once per group: per tile (per channel,
    128 x 128 blocks, groups of 128 or more), per two positions (groups of 64) or per
    position (groups of 32, mxfp8)."""
    R: tl.constexpr = 32
    if ASM:
        if E5M2:
            f0, f1, f2, f3 = tl.inline_asm_elementwise(
                _F8_F32_E5M2, "=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            f0, f1, f2, f3 = tl.inline_asm_elementwise(
                _F8_F32_E4M3, "=r,=r,=r,=r,r", [word], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        f0 = _fp8_value(word & 0xFF, E5M2)
        f1 = _fp8_value((word >> 8) & 0xFF, E5M2)
        f2 = _fp8_value((word >> 16) & 0xFF, E5M2)
        f3 = _fp8_value((word >> 24) & 0xFF, E5M2)
    x0 = _gemv_x(x_base, k0, offs_r, K, EVEN_K)
    x1 = _gemv_x(x_base, k0 + R, offs_r, K, EVEN_K)
    x2 = _gemv_x(x_base, k0 + 2 * R, offs_r, K, EVEN_K)
    x3 = _gemv_x(x_base, k0 + 3 * R, offs_r, K, EVEN_K)
    if GROUP == 32:
        acc += (x0 * f0) * s0[None, :]
        acc += (x1 * f1) * s1[None, :]
        acc += (x2 * f2) * s2[None, :]
        acc += (x3 * f3) * s3[None, :]
    elif GROUP == 64:  # positions 0, 1 in the tile's first group, 2, 3 in its second
        acc += (x0 * f0 + x1 * f1) * s0[None, :]
        acc += (x2 * f2 + x3 * f3) * s1[None, :]
    else:
        acc += (x0 * f0 + x1 * f1 + x2 * f2 + x3 * f3) * s0[None, :]
    return acc


def _gemv_x(x_base, k0, offs_r, K, EVEN_K: tl.constexpr):
    """GEMV: x[k0 + r] for the R rows of a position, float32 [R, 1] (one token per program)."""
    if EVEN_K:
        xt = tl.load(x_base + k0)
    else:
        xt = tl.load(x_base + k0, mask=(k0 + offs_r)[None, :] < K, other=0.0)
    return tl.reshape(xt, (xt.shape[1], 1)).to(tl.float32)


def _load_group(s_ptr, b_ptr, row, NPAD, offs_n, FAMILY: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr):
    """Scale and bias of one group row for the BLOCK_N columns: the dtype's values
    (int; float32 under the interpreter) / the float32 scale twice (fp8) / the dtype's
    s_b 2^119 (bf16) or s_b 2^7 (fp16) twice (nvfp4; under the interpreter the
    float32 s_b 2^-7, the factor the e2m1 values get). MX formats: ``_tile_scales``."""
    s = tl.load(s_ptr + row * NPAD + offs_n)
    if FAMILY == 2:
        b = s
    elif FAMILY == 4:
        if not ASM:
            s = s.to(tl.float32) * (6.103515625e-05 if FP16 else 1.1754943508222875e-38)  # 2^-14, 2^-126
        b = s
    else:
        b = tl.load(b_ptr + row * NPAD + offs_n)
        if not ASM:
            s = s.to(tl.float32)
            b = b.to(tl.float32)
    return s, b


def _tile_scales(s_ptr, b_ptr, t, NPAD, offs_n, FAMILY: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr,
                 FP16: tl.constexpr):
    """Scale and bias rows of K tile t's groups for the BLOCK_N columns: (s0, b0, ..., s3, b3);
    rows past the tile's group count repeat the last. Groups of 16 (nvfp4, scales only):
    the eight slots hold the scales of the tile's groups 0..7 in that order."""
    NG: tl.constexpr = 128 // GROUP if (GROUP > 0 and GROUP < 128) else 1
    if GROUP == 0:
        g0 = t * 0
    elif NG == 1:
        g0 = (t * 128) // GROUP
    else:
        g0 = t * NG
    if FAMILY == 1 or FAMILY == 3:  # MX: one int32 per column holds the tile's four E8M0 exponents
        ew = tl.load(s_ptr + t * NPAD + offs_n)
        s0 = _mx_scale(ew & 0xFF, FAMILY)
        s1 = _mx_scale((ew >> 8) & 0xFF, FAMILY)
        s2 = _mx_scale((ew >> 16) & 0xFF, FAMILY)
        s3 = _mx_scale((ew >> 24) & 0xFF, FAMILY)
        b0, b1, b2, b3 = s0, s1, s2, s3
    elif NG == 8:  # groups of 16 (nvfp4): eight scale rows, no biases
        s0, _u = _load_group(s_ptr, b_ptr, g0, NPAD, offs_n, FAMILY, ASM, FP16)
        b0, _u = _load_group(s_ptr, b_ptr, g0 + 1, NPAD, offs_n, FAMILY, ASM, FP16)
        s1, _u = _load_group(s_ptr, b_ptr, g0 + 2, NPAD, offs_n, FAMILY, ASM, FP16)
        b1, _u = _load_group(s_ptr, b_ptr, g0 + 3, NPAD, offs_n, FAMILY, ASM, FP16)
        s2, _u = _load_group(s_ptr, b_ptr, g0 + 4, NPAD, offs_n, FAMILY, ASM, FP16)
        b2, _u = _load_group(s_ptr, b_ptr, g0 + 5, NPAD, offs_n, FAMILY, ASM, FP16)
        s3, _u = _load_group(s_ptr, b_ptr, g0 + 6, NPAD, offs_n, FAMILY, ASM, FP16)
        b3, _u = _load_group(s_ptr, b_ptr, g0 + 7, NPAD, offs_n, FAMILY, ASM, FP16)
    else:
        s0, b0 = _load_group(s_ptr, b_ptr, g0, NPAD, offs_n, FAMILY, ASM, FP16)
        s1, b1 = s0, b0
        s2, b2 = s0, b0
        s3, b3 = s0, b0
        if NG >= 2:
            s1, b1 = _load_group(s_ptr, b_ptr, g0 + 1, NPAD, offs_n, FAMILY, ASM, FP16)
            s2, b2 = s1, b1
            s3, b3 = s1, b1
        if NG == 4:
            s2, b2 = _load_group(s_ptr, b_ptr, g0 + 2, NPAD, offs_n, FAMILY, ASM, FP16)
            s3, b3 = _load_group(s_ptr, b_ptr, g0 + 3, NPAD, offs_n, FAMILY, ASM, FP16)
    return s0, b0, s1, b1, s2, b2, s3, b3


def _mx_scale(e, FAMILY: tl.constexpr):
    """An E8M0 exponent (int32): itself (mxfp4, applied in the dtype) or 2^(E-127) as a
    float32 (mxfp8; E = 0: the subnormal 2^-127)."""
    if FAMILY == 3:
        s = tl.where(e == 0, 1 << 22, e << 23).to(tl.float32, bitcast=True)
    else:
        s = e
    return s


def _dequant4(word, s0, b0, s1, b1, s2, b2, s3, b3, FAMILY: tl.constexpr, GROUP: tl.constexpr,
              ASM: tl.constexpr, FP16: tl.constexpr, DOT_TY: tl.constexpr, RNE_BF16: tl.constexpr,
              OUT_F32: tl.constexpr = False):
    """Words [R, BLOCK_N] of 4-bit codes -> the values at positions 0..7 (8 tensors [R, BLOCK_N]);
    OUT_F32: the same values widened to float32 (on the GPU, inside the PTX)."""
    NG: tl.constexpr = 128 // GROUP if (GROUP > 0 and GROUP < 128) else 1
    # position j covers K [16 j, 16 j + 16) of the tile: its group is j (NG=8), j // 2 (NG=4), j // 4 (NG=2) or 0
    if NG == 8:  # the slots hold groups 0..7 in order (``_tile_scales``); scales only
        sa, sb, sc, sd, se, sf, sg, sh = s0, b0, s1, b1, s2, b2, s3, b3
        ba, bb, bc, bd, be, bf, bg, bh = sa, sb, sc, sd, se, sf, sg, sh
    elif NG == 4:
        sa, ba, sb, bb, sc, bc, sd, bd = s0, b0, s0, b0, s1, b1, s1, b1  # j = 0..3
        se, be, sf, bf, sg, bg, sh, bh = s2, b2, s2, b2, s3, b3, s3, b3  # j = 4..7
    else:  # NG 2: s0 for j < 4, s1 after; NG 1: s1 is s0
        sa, ba, sb, bb, sc, bc, sd, bd = s0, b0, s0, b0, s0, b0, s0, b0
        se, be, sf, bf, sg, bg, sh, bh = s1, b1, s1, b1, s1, b1, s1, b1
    if ASM:
        if FAMILY == 1 or FAMILY == 4:
            # e2m1: each pair (positions p, p + 4) times its scale pair: the power of two
            # 2^(E-1) / 2^(E-113) (mxfp4) or the stored s_b 2^119 / s_b 2^7 (nvfp4)
            if FAMILY == 1:
                p0 = tl.broadcast_to((_mx_scale_bits(sa, FP16) | (_mx_scale_bits(se, FP16) << 16))[None, :],
                                     word.shape)
                p2 = tl.broadcast_to((_mx_scale_bits(sc, FP16) | (_mx_scale_bits(sg, FP16) << 16))[None, :],
                                     word.shape)
                p1 = p0
                p3 = p2
            else:
                p0 = tl.broadcast_to(_pair(sa, se)[None, :], word.shape)
                p1 = tl.broadcast_to(_pair(sb, sf)[None, :], word.shape)
                p2 = tl.broadcast_to(_pair(sc, sg)[None, :], word.shape)
                p3 = tl.broadcast_to(_pair(sd, sh)[None, :], word.shape)
            if OUT_F32:
                if FP16:
                    w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                        _MX_ASM_FP16_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [word, p0, p1, p2, p3],
                        dtype=(tl.float32,) * 8, is_pure=True, pack=1)
                else:
                    w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                        _MX_ASM_BF16_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r", [word, p0, p1, p2, p3],
                        dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            elif FP16:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _MX_ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [word, p0, p1, p2, p3],
                    dtype=(tl.float16,) * 8, is_pure=True, pack=1)
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _MX_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r", [word, p0, p1, p2, p3],
                    dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            p0 = tl.broadcast_to(_pair(sa, se)[None, :], word.shape)
            q0 = tl.broadcast_to(_pair(ba, be)[None, :], word.shape)
            p2 = tl.broadcast_to(_pair(sc, sg)[None, :], word.shape)
            q2 = tl.broadcast_to(_pair(bc, bg)[None, :], word.shape)
            if OUT_F32:
                if FP16:
                    w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                        _I4_ASM_FP16_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                        [word, p0, p0, p2, p2, q0, q0, q2, q2], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
                else:
                    w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                        _I4_ASM_BF16_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                        [word, p0, p0, p2, p2, q0, q0, q2, q2], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            elif FP16:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _I4_ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
                    [word, p0, p0, p2, p2, q0, q0, q2, q2], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
            else:
                w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                    _I4_ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
                    [word, p0, p0, p2, p2, q0, q0, q2, q2], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        w0 = _emulate(word, 0, sa[None, :], ba[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w1 = _emulate(word, 1, sb[None, :], bb[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w2 = _emulate(word, 2, sc[None, :], bc[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w3 = _emulate(word, 3, sd[None, :], bd[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w4 = _emulate(word, 4, se[None, :], be[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w5 = _emulate(word, 5, sf[None, :], bf[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w6 = _emulate(word, 6, sg[None, :], bg[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
        w7 = _emulate(word, 7, sh[None, :], bh[None, :], FAMILY, 4, DOT_TY, RNE_BF16)
    return w0, w1, w2, w3, w4, w5, w6, w7


def _dequant2(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP: tl.constexpr, ASM: tl.constexpr, FP16: tl.constexpr,
              DOT_TY: tl.constexpr, RNE_BF16: tl.constexpr):
    """Words [R, BLOCK_N] of 2-bit int codes -> the values of positions 0..15 (a tuple of
    16 tensors [R, BLOCK_N]; ``_stack16`` makes them one [128, BLOCK_N] tile for the MMA,
    a position's 8 rows being below its depth)."""
    NG: tl.constexpr = 128 // GROUP if (GROUP > 0 and GROUP < 128) else 1
    # position j covers K [8 j, 8 j + 8): its group is j // 4 (NG=4), j // 8 (NG=2) or 0;
    # the PTX pairs position p with p + 8: (s0, s2) for p < 4 and (s1, s3) after (NG=4)
    if NG == 4:
        la, ha, lb, hb = s0, s2, s1, s3
        ma, na, mb, nb = b0, b2, b1, b3
    elif NG == 2:
        la, ha, lb, hb = s0, s1, s0, s1
        ma, na, mb, nb = b0, b1, b0, b1
    else:
        la, ha, lb, hb = s0, s0, s0, s0
        ma, na, mb, nb = b0, b0, b0, b0
    if ASM:
        pa = tl.broadcast_to(_pair(la, ha)[None, :], word.shape)
        pb = tl.broadcast_to(_pair(lb, hb)[None, :], word.shape)
        qa = tl.broadcast_to(_pair(ma, na)[None, :], word.shape)
        qb = tl.broadcast_to(_pair(mb, nb)[None, :], word.shape)
        if FP16:
            v = tl.inline_asm_elementwise(_I2_ASM_FP16, "=h," * 16 + "r,r,r,r,r", [word, pa, pb, qa, qb],
                                          dtype=(tl.float16,) * 16, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise(_I2_ASM_BF16, "=h," * 16 + "r,r,r,r,r", [word, pa, pb, qa, qb],
                                          dtype=(tl.bfloat16,) * 16, is_pure=True, pack=1)
    else:
        w0 = _emulate(word, 0, la[None, :], ma[None, :], 0, 2, DOT_TY, RNE_BF16)
        w1 = _emulate(word, 1, la[None, :], ma[None, :], 0, 2, DOT_TY, RNE_BF16)
        w2 = _emulate(word, 2, la[None, :], ma[None, :], 0, 2, DOT_TY, RNE_BF16)
        w3 = _emulate(word, 3, la[None, :], ma[None, :], 0, 2, DOT_TY, RNE_BF16)
        w4 = _emulate(word, 4, lb[None, :], mb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w5 = _emulate(word, 5, lb[None, :], mb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w6 = _emulate(word, 6, lb[None, :], mb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w7 = _emulate(word, 7, lb[None, :], mb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w8 = _emulate(word, 8, ha[None, :], na[None, :], 0, 2, DOT_TY, RNE_BF16)
        w9 = _emulate(word, 9, ha[None, :], na[None, :], 0, 2, DOT_TY, RNE_BF16)
        w10 = _emulate(word, 10, ha[None, :], na[None, :], 0, 2, DOT_TY, RNE_BF16)
        w11 = _emulate(word, 11, ha[None, :], na[None, :], 0, 2, DOT_TY, RNE_BF16)
        w12 = _emulate(word, 12, hb[None, :], nb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w13 = _emulate(word, 13, hb[None, :], nb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w14 = _emulate(word, 14, hb[None, :], nb[None, :], 0, 2, DOT_TY, RNE_BF16)
        w15 = _emulate(word, 15, hb[None, :], nb[None, :], 0, 2, DOT_TY, RNE_BF16)
        v = (w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15)
    return v


def _stack16(v):
    """The 16 position values of a 2-bit tile -> one [128, BLOCK_N] tile, in K order."""
    return _stack2(_stack8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]),
                   _stack8(v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]))


def _dequant8(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP: tl.constexpr,
              ASM: tl.constexpr, FP16: tl.constexpr, DOT_TY: tl.constexpr, RNE_BF16: tl.constexpr,
              FAMILY: tl.constexpr = 0, E5M2: tl.constexpr = False):
    """Words [R, BLOCK_N] of 8-bit codes -> the values at positions 0..3 (4 tensors [R, BLOCK_N]):
    integer codes (FAMILY 0) or FP8 bytes (2: fp8, 3: mxfp8; E4M3, or E5M2) times a float32 scale."""
    NG: tl.constexpr = 128 // GROUP if (GROUP > 0 and GROUP < 128) else 1
    # position j covers K [32 j, 32 j + 32): its group is j (NG=4), j // 2 (NG=2) or 0
    if NG == 2:
        s2, b2, s3, b3 = s1, b1, s1, b1
        s1, b1 = s0, b0
    if ASM:
        sv0 = tl.broadcast_to(s0[None, :], word.shape)
        sv1 = tl.broadcast_to(s1[None, :], word.shape)
        sv2 = tl.broadcast_to(s2[None, :], word.shape)
        sv3 = tl.broadcast_to(s3[None, :], word.shape)
        bv0 = tl.broadcast_to(b0[None, :], word.shape)
        bv1 = tl.broadcast_to(b1[None, :], word.shape)
        bv2 = tl.broadcast_to(b2[None, :], word.shape)
        bv3 = tl.broadcast_to(b3[None, :], word.shape)
        if FAMILY == 2 or FAMILY == 3:
            args = [word, sv0, sv1, sv2, sv3]
            if FP16 and E5M2:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    _F8_ASM_E5M2_FP16, "=h,=h,=h,=h,r,r,r,r,r", args, dtype=(tl.float16,) * 4, is_pure=True, pack=1)
            elif FP16:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    _F8_ASM_E4M3_FP16, "=h,=h,=h,=h,r,r,r,r,r", args, dtype=(tl.float16,) * 4, is_pure=True, pack=1)
            elif E5M2:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    _F8_ASM_E5M2_BF16, "=h,=h,=h,=h,r,r,r,r,r", args, dtype=(tl.bfloat16,) * 4, is_pure=True,
                    pack=1)
            else:
                w0, w1, w2, w3 = tl.inline_asm_elementwise(
                    _F8_ASM_E4M3_BF16, "=h,=h,=h,=h,r,r,r,r,r", args, dtype=(tl.bfloat16,) * 4, is_pure=True,
                    pack=1)
        elif FP16:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                _I8_ASM_FP16, "=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
                [word, sv0, sv1, sv2, sv3, bv0, bv1, bv2, bv3], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
        else:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                _I8_ASM_BF16, "=h,=h,=h,=h,r,r,r,r,r,r,r,r,r",
                [word, sv0, sv1, sv2, sv3, bv0, bv1, bv2, bv3], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=1)
    else:
        w0 = _emulate(word, 0, s0[None, :], b0[None, :], FAMILY, 8, DOT_TY, RNE_BF16, E5M2)
        w1 = _emulate(word, 1, s1[None, :], b1[None, :], FAMILY, 8, DOT_TY, RNE_BF16, E5M2)
        w2 = _emulate(word, 2, s2[None, :], b2[None, :], FAMILY, 8, DOT_TY, RNE_BF16, E5M2)
        w3 = _emulate(word, 3, s3[None, :], b3[None, :], FAMILY, 8, DOT_TY, RNE_BF16, E5M2)
    return w0, w1, w2, w3


def _wo_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, K, NT, TPS, NPAD,
    stride_xm, stride_ym,
    FAMILY: tl.constexpr,  # 0: int, 1: mxfp4, 2: fp8, 3: mxfp8, 4: nvfp4 (``family_code``)
    BITS: tl.constexpr,  # 4 or 8
    GROUP: tl.constexpr,  # scale group along K (elements); 0: one per row
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    MODE: tl.constexpr,  # 0 GEMM, 1 SWAP, 2 GEMV
    PARTIAL: tl.constexpr,  # split-K: write float32 partials to ws[pid_k] (no bias, no cast)
    HAS_BIAS: tl.constexpr,
    ASM: tl.constexpr,  # inline PTX dequantization (GPU); plain Triton under the interpreter
    FP16: tl.constexpr,  # x is float16 (else bfloat16)
    DOT_TY: tl.constexpr,
    RNE_BF16: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % 128 == 0: no mask along K on x
    CAT: tl.constexpr = False,  # stack a tile's chunks into one [128, BLOCK_N] operand: one dot per tile
    INT_F32: tl.constexpr = False,  # GEMV of int / FP8 codes in float32 with the scales applied per group
    PREFETCH: tl.constexpr = 1,  # K tiles of words loaded ahead (in registers)
    E5M2: tl.constexpr = False,  # FP8 bytes are E5M2 (else E4M3)
):
    R: tl.constexpr = 4 * BITS  # word rows per 128-element K tile (128 * BITS / 32)
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
    offs_r = tl.arange(0, R)
    m_ok = offs_m < M
    x_row = offs_m.to(tl.int64) * stride_xm
    offs_k = tl.arange(0, 128)
    if CAT:
        if MODE == 1:
            x_base = x_ptr + x_row[None, :] + offs_k[:, None]
        else:
            x_base = x_ptr + x_row[:, None] + offs_k[None, :]
    elif MODE == 1:
        x_base = x_ptr + x_row[None, :] + offs_r[:, None]
    else:
        x_base = x_ptr + x_row[:, None] + offs_r[None, :]
    w_base = w_ptr + offs_r.to(tl.int64)[:, None] * NPAD + offs_n[None, :]

    if MODE == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif MODE == 2:
        acc = tl.zeros((R, BLOCK_N), dtype=tl.float32)  # summed over its rows at the end
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    t_begin = pid_k * TPS
    t_end = tl.minimum(t_begin + TPS, NT)
    # the next tile's words are loaded one iteration ahead (in registers), so that
    # their memory latency overlaps this tile's dequantization and MMA
    # (the last iteration reloads its own tile, an L2 hit, rather than mask the load)
    # (PREFETCH = 2: two tiles ahead, for more bytes in flight per thread)
    word_next = tl.load(w_base + tl.minimum(t_begin, NT - 1) * (R * NPAD))
    if PREFETCH == 2:
        word_next2 = tl.load(w_base + tl.minimum(t_begin + 1, t_end - 1) * (R * NPAD))
    for t in range(t_begin, t_end):
        word = word_next  # [R, BLOCK_N]; the packing keeps codes < 2^31 elements
        if PREFETCH == 2:
            word_next = word_next2
            word_next2 = tl.load(w_base + tl.minimum(t + 2, t_end - 1) * (R * NPAD))
        else:
            word_next = tl.load(w_base + tl.minimum(t + 1, t_end - 1) * (R * NPAD))
        s0, b0, s1, b1, s2, b2, s3, b3 = _tile_scales(s_ptr, b_ptr, t, NPAD, offs_n, FAMILY, GROUP, ASM, FP16)
        k0 = t * 128
        if MODE == 2 and FAMILY == 0 and INT_F32:
            acc = _gemv_int_tile(acc, word, s0, b0, s1, b1, s2, b2, s3, b3, x_base, m_ok, k0, offs_r, K,
                                 BITS, GROUP, EVEN_K, ASM)
        elif MODE == 2 and (FAMILY == 2 or FAMILY == 3) and INT_F32:
            acc = _gemv_fp8_tile(acc, word, s0, s1, s2, s3, x_base, k0, offs_r, K, GROUP, EVEN_K, ASM, E5M2)
        elif BITS == 4:
            w0, w1, w2, w3, w4, w5, w6, w7 = _dequant4(word, s0, b0, s1, b1, s2, b2, s3, b3, FAMILY, GROUP,
                                                       ASM, FP16, DOT_TY, RNE_BF16, MODE == 2)
        if MODE == 2 and FAMILY != 1 and FAMILY != 4 and INT_F32:
            pass
        elif BITS == 4 and CAT:
            acc = _acc_tile(acc, _stack8(w0, w1, w2, w3, w4, w5, w6, w7), x_base, m_ok, k0, offs_k, K, MODE, DOT_TY,
                            EVEN_K)
        elif BITS == 4:
            acc = _acc_chunk(acc, w0, x_base, m_ok, k0 + 0 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w1, x_base, m_ok, k0 + 1 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w2, x_base, m_ok, k0 + 2 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w3, x_base, m_ok, k0 + 3 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w4, x_base, m_ok, k0 + 4 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w5, x_base, m_ok, k0 + 5 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w6, x_base, m_ok, k0 + 6 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            acc = _acc_chunk(acc, w7, x_base, m_ok, k0 + 7 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
        elif BITS == 2:  # MMA: always one stacked [128, BLOCK_N] tile; GEMV: per position
            v = _dequant2(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP, ASM, FP16, DOT_TY, RNE_BF16)
            if MODE == 2:
                for j in tl.static_range(16):
                    acc = _acc_chunk(acc, v[j], x_base, m_ok, k0 + j * R, offs_r, K, MODE, DOT_TY, EVEN_K)
            else:
                tl.static_assert(CAT, "2-bit codes need one stacked tile per MMA (CAT)")
                acc = _acc_tile(acc, _stack16(v), x_base, m_ok, k0, offs_k, K, MODE, DOT_TY, EVEN_K)
        elif BITS == 8:
            w0, w1, w2, w3 = _dequant8(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP, ASM, FP16, DOT_TY, RNE_BF16,
                                       FAMILY, E5M2)
            if CAT:
                acc = _acc_tile(acc, _stack4(w0, w1, w2, w3), x_base, m_ok, k0, offs_k, K, MODE, DOT_TY, EVEN_K)
            else:
                acc = _acc_chunk(acc, w0, x_base, m_ok, k0 + 0 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
                acc = _acc_chunk(acc, w1, x_base, m_ok, k0 + 1 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
                acc = _acc_chunk(acc, w2, x_base, m_ok, k0 + 2 * R, offs_r, K, MODE, DOT_TY, EVEN_K)
                acc = _acc_chunk(acc, w3, x_base, m_ok, k0 + 3 * R, offs_r, K, MODE, DOT_TY, EVEN_K)

    # ---- epilogue: partials, or bias + cast + store
    if MODE == 2:
        acc = tl.sum(acc, axis=0)[None, :]
    if FAMILY == 4:  # nvfp4: the tensor scale (times 2^7), float32 [1] in b_ptr
        acc = acc * tl.load(b_ptr)
    _store_tile(acc, offs_m, offs_n, m_ok, offs_n < N, M, N, stride_ym, pid_k, y_ptr, ws_ptr, bias_ptr,
                MODE == 1, PARTIAL, HAS_BIAS, RNE_BF16)


def _store_tile(acc, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, pid_k, y_ptr, ws_ptr, bias_ptr,
                SWAP: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, RNE_BF16: tl.constexpr):
    """The matmul kernels' epilogue: acc (float32; [BLOCK_N, BLOCK_M] when SWAP, y^T)
    -> the split-K workspace ws[pid_k] as is, or + bias, cast and stored into y."""
    if SWAP:
        mask = n_ok[:, None] & m_ok[None, :]
        out_off = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        y_off = offs_m.to(tl.int64)[None, :] * stride_ym + offs_n[:, None]
    else:
        mask = m_ok[:, None] & n_ok[None, :]
        out_off = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if PARTIAL:
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + out_off, acc, mask=mask)
    else:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if SWAP:
                acc += bias[:, None]
            else:
                acc += bias[None, :]
        if RNE_BF16 and y_ptr.dtype.element_ty == tl.bfloat16:  # not for float32 outputs
            acc = _round_to_bf16(acc)
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _dequant_kernel(
    w_ptr, s_ptr, b_ptr, out_ptr, N, K, NPAD,
    FAMILY: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    ASM: tl.constexpr, FP16: tl.constexpr, DOT_TY: tl.constexpr, RNE_BF16: tl.constexpr,
    E5M2: tl.constexpr = False,
):
    """out[k, n] (W^T, [K, N] contiguous) = the kernel's value of W[n, k]: one K tile x
    BLOCK_N columns per program. For large M: cuBLAS then multiplies x by it."""
    R: tl.constexpr = 4 * BITS
    t = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    word = tl.load(w_ptr + (t * R + offs_r).to(tl.int64)[:, None] * NPAD + offs_n[None, :])
    s0, b0, s1, b1, s2, b2, s3, b3 = _tile_scales(s_ptr, b_ptr, t, NPAD, offs_n, FAMILY, GROUP, ASM, FP16)
    rows = (t * 128 + offs_r).to(tl.int64)[:, None]
    n_ok = (offs_n < N)[None, :]
    out = out_ptr + rows * N + offs_n[None, :]
    if BITS == 2:
        w = _stack16(_dequant2(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP, ASM, FP16, DOT_TY, RNE_BF16))
        krows = (t * 128 + tl.arange(0, 128)).to(tl.int64)[:, None]
        tl.store(out_ptr + krows * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok & (krows < K))
    elif BITS == 4:
        w0, w1, w2, w3, w4, w5, w6, w7 = _dequant4(word, s0, b0, s1, b1, s2, b2, s3, b3, FAMILY, GROUP,
                                                   ASM, FP16, DOT_TY, RNE_BF16)
        if FAMILY == 4:  # nvfp4: times the tensor scale, rounded once more
            g = tl.load(b_ptr)
            w0 = _times(w0, g, RNE_BF16)
            w1 = _times(w1, g, RNE_BF16)
            w2 = _times(w2, g, RNE_BF16)
            w3 = _times(w3, g, RNE_BF16)
            w4 = _times(w4, g, RNE_BF16)
            w5 = _times(w5, g, RNE_BF16)
            w6 = _times(w6, g, RNE_BF16)
            w7 = _times(w7, g, RNE_BF16)
        tl.store(out + 0 * R * N, w0.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 0 * R < K))
        tl.store(out + 1 * R * N, w1.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 1 * R < K))
        tl.store(out + 2 * R * N, w2.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 2 * R < K))
        tl.store(out + 3 * R * N, w3.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 3 * R < K))
        tl.store(out + 4 * R * N, w4.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 4 * R < K))
        tl.store(out + 5 * R * N, w5.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 5 * R < K))
        tl.store(out + 6 * R * N, w6.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 6 * R < K))
        tl.store(out + 7 * R * N, w7.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 7 * R < K))
    else:
        w0, w1, w2, w3 = _dequant8(word, s0, b0, s1, b1, s2, b2, s3, b3, GROUP, ASM, FP16, DOT_TY, RNE_BF16,
                                   FAMILY, E5M2)
        tl.store(out + 0 * R * N, w0.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 0 * R < K))
        tl.store(out + 1 * R * N, w1.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 1 * R < K))
        tl.store(out + 2 * R * N, w2.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 2 * R < K))
        tl.store(out + 3 * R * N, w3.to(out_ptr.dtype.element_ty), mask=n_ok & (rows + 3 * R < K))


def _times(w, g, RNE_BF16: tl.constexpr):
    """w * g in float32, rounded to nearest even by bits under the interpreter (bf16)."""
    v = w.to(tl.float32) * g
    if RNE_BF16:
        v = _round_to_bf16(v)
    return v




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
    if RNE_BF16 and y_ptr.dtype.element_ty == tl.bfloat16:
        acc = _round_to_bf16(acc)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_JITTED: dict[bool, tuple] = {}


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_HELPERS = {f.__name__: f for f in (_pair, _mx_scale_bits, _mx_scale, _dequant2, _stack16, _fp8_value, _times, _gemv_fp8_tile, _gemv_x, _round_to_bf16, _store_tile, _emulate, _acc_chunk, _load_group,
                                    _tile_scales, _dequant4, _dequant8, _stack2, _stack4, _stack8, _acc_tile,
                                    _gemv_chunk, _gemv_flush, _gemv_int_tile, _sel4, _gemv_pos,
                                    _f32_codes_emulated)}


def _kernels():
    """The kernels, wrapped for the current mode (compiled, or interpreted). The
    device functions they call are module globals, set to this mode's wrappers."""
    mode = interpret_mode()
    if mode not in _JITTED:
        helpers = {name: triton.jit(fn) for name, fn in _HELPERS.items()}
        # M and the K-tile counts change from call to call: one compiled variant
        # serves every value (no M == 1 specialisation)
        _JITTED[mode] = (
            triton.jit(_wo_kernel, do_not_specialize=["M", "NT", "TPS"]),
            triton.jit(_splitk_reduce_kernel, do_not_specialize=["MN", "SPLIT_K"]),
            triton.jit(_dequant_kernel),
            helpers,
        )
    matmul, reduce, dequant, helpers = _JITTED[mode]
    globals().update(helpers)
    return matmul, reduce, dequant


_REDUCE_BLOCK = 1024
MODES = {"gemm": 0, "swap": 1, "gemv": 2}
_FAMILY_CODES = {("int", 2): 0, ("int", 4): 0, ("int", 8): 0, ("mx", 4): 1, ("fp8", 8): 2, ("mx", 8): 3, ("nvfp4", 4): 4}


def family_code(lay) -> int:
    """The kernels' FAMILY switch for a Layout: 0 int, 1 mxfp4, 2 fp8, 3 mxfp8, 4 nvfp4."""
    return _FAMILY_CODES[(lay.family, lay.bits)]


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


def split_k_plan(nt: int, split_k: int, y: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """K tiles ``nt`` over at most ``split_k`` programs, none empty -> (split, tiles per
    split, where the matmul kernel writes: a float32 workspace [split, M, N], or y itself)."""
    split = max(1, min(split_k, nt))
    tps = -(-nt // split)
    split = -(-nt // tps)
    m, n = y.shape
    ws = torch.empty((split, m, n), dtype=torch.float32, device=y.device) if split > 1 else y
    return split, tps, ws


def reduce_split(ws: torch.Tensor, split: int, bias: torch.Tensor | None, y: torch.Tensor, rne: bool) -> None:
    """y = sum of the workspace's partials (+ bias), cast; nothing to do for one split."""
    if split == 1:
        return
    _, reduce, _ = _kernels()
    m, n = y.shape
    mn = m * n
    reduce[(triton.cdiv(mn, _REDUCE_BLOCK),)](
        ws, bias if bias is not None else ws, y, mn, n, split,
        BLOCK=_REDUCE_BLOCK, HAS_BIAS=bias is not None, RNE_BF16=rne, num_warps=4,
    )


def launch(x2: torch.Tensor, pw, bias: torch.Tensor | None, y: torch.Tensor, cfg):
    """y[M, N] = x2[M, K] @ W^T (+ bias) with the config ``cfg`` (a WeightOnlyConfig
    already validated for ``pw``). x2 has unit stride along K, y is contiguous.
    Returns the matmul kernel's launch handle (its compiled code, for inspection)."""
    matmul, _, _ = _kernels()
    interp = interpret_mode()
    rne = x2.dtype == torch.bfloat16 and interp
    lay = pw.layout
    m, k = x2.shape
    n = pw.n
    nt = lay.n_tiles
    split, tps, ws = split_k_plan(nt, cfg.split_k, y)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    handle = matmul[grid](
        x2, pw.codes, pw.scales, pw.biases if pw.biases is not None else pw.scales,
        bias if bias is not None else pw.scales, y, ws,
        m, n, k, nt, tps, lay.npad,
        x2.stride(0), y.stride(0),
        FAMILY=family_code(lay),
        BITS=lay.bits,
        GROUP=lay.group,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        GROUP_M=cfg.group_m,
        MODE=MODES[cfg.mode],
        PARTIAL=split > 1,
        HAS_BIAS=bias is not None,
        ASM=not interp,
        FP16=x2.dtype == torch.float16,
        DOT_TY=_dot_type(x2.dtype),
        RNE_BF16=rne,
        EVEN_K=k % 128 == 0,
        CAT=(cfg.stack or lay.bits == 2) and cfg.mode != "gemv",  # 2-bit MMA: always one stacked tile
        INT_F32=cfg.mode == "gemv" and cfg.int_f32 and has_f32_gemv(lay.family, lay.bits),  # else the 16-bit GEMV
        PREFETCH=cfg.prefetch,
        E5M2=pw.fmt.endswith("e5m2"),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_regs} if cfg.max_regs and not interp else {}),
    )
    reduce_split(ws, split, bias, y, rne)
    return handle


def dequantize_t(pw, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in ``dtype`` (pw.dtype), contiguous: the kernels' weight values."""
    _, _, dequant = _kernels()
    interp = interpret_mode()
    lay = pw.layout
    out = torch.empty((pw.k, pw.n), dtype=dtype, device=pw.codes.device)
    block_n = 128
    dequant[(triton.cdiv(pw.n, block_n), lay.n_tiles)](
        pw.codes, pw.scales, pw.biases if pw.biases is not None else pw.scales, out, pw.n, pw.k, lay.npad,
        FAMILY=family_code(lay), BITS=lay.bits, GROUP=lay.group, BLOCK_N=block_n,
        ASM=not interp, FP16=dtype == torch.float16, DOT_TY=_dot_type(dtype),
        RNE_BF16=dtype == torch.bfloat16 and interp, E5M2=pw.fmt.endswith("e5m2"), num_warps=4,
    )
    return out
