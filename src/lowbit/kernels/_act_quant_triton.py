"""Triton kernels of the dynamic activation quantization (``act_quant.py`` is the
public op) and the element codecs the A8W8 kernels share.

One program quantizes one row of x [M, K] (a token): the whole row in
registers where it fits (K up to 16384), else in two passes (a few long rows
instead: ``_chunk_amax_kernel`` writes each 1024-element chunk's amax, then one
program per chunk quantizes it with the row's scale):

- per-token scales (GROUP = 0): a first pass finds the row's amax, a second
  writes the codes (the row is re-read from L2);
- 1 x GROUP block scales (GROUP = 128): one pass, each block quantized as soon
  as its amax is known.

The numerics are the reference's (``lowbit.formats``, FORMATS.md) bit for bit:
s = amax / QMAX and v = x / s both correctly rounded (``div_rn``; Triton's
plain ``/`` is approximate on the GPU; a reciprocal with one FMA correction
was tried and is not bit-exact there), a zero row gets s = 1, FP8 codes round
to nearest even and saturate at 448, INT8 codes round half to even and clamp
to [-127, 127]. A SmoothQuant factor (QuantLinear's input_scale) is applied
first as the reference does: x / input_scale rounded to x's dtype.

FP8 E4M3 codes on the GPU come from the hardware conversion (cvt.rn.satfinite).
Triton's CPU interpreter converts to FP8 without saturation and flushes
subnormals, so under TRITON_INTERPRET (EMULATE) the code is built from the
float's bits instead: the same rounding, in integer arithmetic. Codes are
stored as bytes (uint8 for FP8, int8 for INT8); the GEMM reinterprets them.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import gdc_launch_dependents

from ._weight_only_triton import _round_to_bf16, interpret_mode


def _e4m3_bits(v, EMULATE: tl.constexpr):
    """float32 v (finite) -> its FP8 E4M3 code (int32 in [0, 255]): round to
    nearest even, saturate at +-448. Integer arithmetic on the float's bits."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # normal: drop 20 mantissa bits with round to nearest even, rebias 127 -> 7
    rounded = (a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20
    normal = rounded - ((127 - 7) << 3)
    # subnormal (|v| < 2^-6): multiples of 2^-9, rint rounds half to even; 8 is 2^-6 itself
    sub = _rint(a * 512.0, EMULATE).to(tl.int32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.minimum(code, 0x7E)  # 448; beyond it saturates
    return code | (sign << 7)


def _e4m3_decode(c):
    """FP8 E4M3 code (int32, 0..255, no NaN) -> its float32 value, exactly."""
    e = (c >> 3) & 0xF
    m = c & 7
    mag_bits = ((e + 120) << 23) | (m << 20)
    normal = mag_bits.to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    mag = tl.where(e == 0, sub, normal)
    return tl.where((c & 0x80) != 0, -mag, mag)


def _load_f32(x_ptrs, mask, EMULATE: tl.constexpr):
    """x (bf16/fp16) as float32. The interpreter converts subnormal bf16 wrongly, so
    there a bf16's bits are shifted into a float32's instead (the same value)."""
    if EMULATE and x_ptrs.dtype.element_ty == tl.bfloat16:
        bits = tl.load(x_ptrs.to(tl.pointer_type(tl.int16)), mask=mask, other=0)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)


def _prepare(x_ptrs, mask, iscale_ptrs, HAS_ISCALE: tl.constexpr, FP16: tl.constexpr, RNE_BF16: tl.constexpr,
             EMULATE: tl.constexpr):
    """x (float32) as the reference sees it: after x / input_scale, rounded to x's dtype."""
    x = _load_f32(x_ptrs, mask, EMULATE)
    if HAS_ISCALE:
        d = tl.load(iscale_ptrs, mask=mask, other=1.0)
        x = _div(x, d, EMULATE)
        if FP16:
            x = x.to(tl.float16).to(tl.float32)
        elif RNE_BF16:
            x = _round_to_bf16(x).to(tl.float32)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    return x


def _div(a, b, EMULATE: tl.constexpr):
    """a / b correctly rounded: div_rn on the GPU (plain / is approximate there);
    the interpreter's numpy division is already IEEE (it has no div_rn)."""
    if EMULATE:
        return a / b
    return libdevice.div_rn(a, b)


def _rint(v, EMULATE: tl.constexpr):
    """Round half to even (|v| < 2^22): libdevice on the GPU; under the interpreter
    (no libdevice) adding and subtracting 1.5 * 2^23 rounds in float32 the same way."""
    if EMULATE:
        return (v + 12582912.0) - 12582912.0
    return libdevice.rint(v)


def _scale_of(amax, QMAX: tl.constexpr, EMULATE: tl.constexpr):
    s = _div(amax, tl.full(amax.shape, QMAX, tl.float32), EMULATE)
    return tl.where(s > 0, s, 1.0)  # a zero row (or an amax that underflowed) -> 1


def _encode(x, s, INT8: tl.constexpr, EMULATE: tl.constexpr):
    v = _div(x, s, EMULATE)
    if INT8:
        q = tl.minimum(tl.maximum(_rint(v, EMULATE), -127.0), 127.0).to(tl.int8)
    elif EMULATE:
        q = _e4m3_bits(v, EMULATE).to(tl.uint8)
    else:
        q = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return q


def _chunk_amax_kernel(
    x_ptr, iscale_ptr, part_ptr, K, stride_xm, n_chunks,
    BLOCK_K: tl.constexpr, HAS_ISCALE: tl.constexpr, FP16: tl.constexpr, RNE_BF16: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """part[m, c] = amax of row m's chunk c (BLOCK_K elements): the first pass of
    per-token quantization spread over many programs (few long rows)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    k = c * BLOCK_K + tl.arange(0, BLOCK_K)
    x = _prepare(x_ptr + row * stride_xm + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
    tl.store(part_ptr + row * n_chunks + c + tl.arange(0, 1), tl.max(tl.abs(x), axis=0, keep_dims=True))


def _act_quant_kernel(
    x_ptr, iscale_ptr, q_ptr, s_ptr, part_ptr,
    K, KQ, stride_xm, n_groups,
    GROUP: tl.constexpr,  # 0: one scale per row; else 1 x GROUP blocks along K
    BLOCK_K: tl.constexpr,
    INT8: tl.constexpr,
    HAS_ISCALE: tl.constexpr,
    FP16: tl.constexpr,
    RNE_BF16: tl.constexpr,
    EMULATE: tl.constexpr,
    ONE_PASS: tl.constexpr = False,  # per token, BLOCK_K >= KQ: the row read once, kept in registers
    SPLIT: tl.constexpr = False,  # per token, row chunks over programs; amax from part[m, :n_groups]
    NP: tl.constexpr = 1,  # SPLIT: n_groups (the chunk count) rounded up to a power of two
    PDL: tl.constexpr = False,  # let the GEMM that reads these codes launch now (it waits for them)
):
    """q[m, :K] = codes, q[m, K:KQ] = 0 (the GEMM's K padding); s[m] or s[m, g].
    SPLIT: program (m, c) quantizes chunk c of row m with the scale from the chunk
    maxima that _chunk_amax_kernel wrote."""
    if PDL:
        gdc_launch_dependents()
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * KQ
    offs = tl.arange(0, BLOCK_K)
    if SPLIT:
        c = tl.program_id(1)
        p = tl.arange(0, NP)
        parts = tl.load(part_ptr + row * n_groups + p, mask=p < n_groups, other=0.0)
        s = _scale_of(tl.max(parts, axis=0, keep_dims=True), QMAX, EMULATE)  # [1]
        if c == 0:
            tl.store(s_ptr + row + tl.arange(0, 1), s)
        k = c * BLOCK_K + offs
        x = _prepare(x_row + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
        tl.store(q_row + k, _encode(x, s, INT8, EMULATE), mask=k < KQ)
    elif GROUP == 0 and ONE_PASS:
        # the whole (padded) row in registers: read once, amax, codes
        k = offs
        x = _prepare(x_row + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
        s = _scale_of(tl.max(tl.abs(x), axis=0, keep_dims=True), QMAX, EMULATE)  # [1]
        tl.store(s_ptr + row + tl.arange(0, 1), s)
        tl.store(q_row + k, _encode(x, s, INT8, EMULATE), mask=k < KQ)
    elif GROUP == 0:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            x = _prepare(x_row + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
            amax = tl.maximum(amax, tl.abs(x))
        s = _scale_of(tl.max(amax, axis=0, keep_dims=True), QMAX, EMULATE)  # [1]
        tl.store(s_ptr + row + tl.arange(0, 1), s)
        for k0 in range(0, KQ, BLOCK_K):
            k = k0 + offs
            x = _prepare(x_row + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
            tl.store(q_row + k, _encode(x, s, INT8, EMULATE), mask=k < KQ)
    else:
        g_offs = tl.arange(0, GROUP)
        for g in range(0, n_groups):
            k = g * GROUP + g_offs
            x = _prepare(x_row + k, k < K, iscale_ptr + k, HAS_ISCALE, FP16, RNE_BF16, EMULATE)
            s = _scale_of(tl.max(tl.abs(x), axis=0, keep_dims=True), QMAX, EMULATE)  # [1]
            tl.store(s_ptr + row * n_groups + g + tl.arange(0, 1), s)
            tl.store(q_row + k, _encode(x, s, INT8, EMULATE), mask=k < KQ)


def _e2m1_bits(v):
    """float32 v (finite) -> its FP4 E2M1 code (int32 in [0, 15]): round to nearest
    even, saturate at +-6. The magnitude code counts the thresholds passed; at a tie
    (0.25, 0.75, ..., 5) the comparison is strict where the lower neighbour's code is even."""
    a = tl.abs(v)
    mag = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
    return mag | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)  # the sign bit: -0.0 keeps it


def _e2m1_value(c):
    """FP4 E2M1 code (int32, 0..15) -> its float32 value (0, 0.5, 1, 1.5, 2, 3, 4, 6; signed)."""
    mag = c & 7
    v = tl.where(mag < 4, mag.to(tl.float32) * 0.5,
                 tl.where(mag < 6, (mag - 2).to(tl.float32), ((mag - 4) * 2).to(tl.float32)))
    return (v.to(tl.int32, bitcast=True) | ((c & 8) << 28)).to(tl.float32, bitcast=True)  # the sign bit (-0.0 too)


def _mx_act_quant_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr, K, KQ, stride_xm, n_blocks,
    FP4: tl.constexpr,  # elements E2M1 (packed two per byte, even element low) else E4M3
    BLOCKS: tl.constexpr,  # 32-element blocks per program
    EMULATE: tl.constexpr,
    DEQUANT: tl.constexpr = False,  # write the quantized values (x's dtype, [M, K]) instead of codes and scales
    RNE_BF16: tl.constexpr = False,
):
    """MX activations, the spec's floor rule (FORMATS.md): per 32-element block
    E = clamp(floor(log2 amax) - emax, -127, 127), scale byte E + 127 (255 for a block
    holding NaN/Inf, whose codes are 0), codes = element(x / 2^E). Program (m, c)
    quantizes blocks [c * BLOCKS, (c + 1) * BLOCKS) of row m; blocks past K get code 0
    and scale byte 0. DEQUANT: out = element value * 2^E instead (NaN in a NaN/Inf
    block, as the reference dequantizes scale byte 255), exact in bfloat16 down to
    2^-133 and in float16 for the values of a float16 x (module note of act_quant)."""
    EMAX: tl.constexpr = 2 if FP4 else 8
    row = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BLOCKS
    blk = b0 + tl.arange(0, BLOCKS)
    k = blk[:, None] * 32 + tl.arange(0, 32)[None, :]  # [BLOCKS, 32]
    x = _load_f32(x_ptr + row * stride_xm + k, k < K, EMULATE)
    finite = tl.abs(x) < float("inf")
    bad = tl.max((~finite).to(tl.int32), axis=1) > 0  # [BLOCKS]
    x = tl.where(finite, x, 0.0)
    amax = tl.max(tl.abs(x), axis=1)
    field = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # 0: zero or subnormal amax
    e = tl.where(field > 0, field - 127 - EMAX, -127)
    e = tl.minimum(tl.maximum(e, -127), 127)
    # x / 2^E = x * 2^-E, exact (2^-E is a normal float32 for the E of bf16/fp16 rows)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    v = x * inv[:, None]
    if FP4:
        c = _e2m1_bits(v)
    elif EMULATE:
        c = _e4m3_bits(v, EMULATE)
    else:
        c = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    c = tl.where(bad[:, None], 0, c)
    if DEQUANT:
        if FP4:
            val = _e2m1_value(c)
        elif EMULATE:
            val = _e4m3_decode(c)
        else:
            val = c.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        # 2^E as a float32 (2^-127 is the subnormal 0x00400000); the products are exact
        p2 = tl.where(e > -127, (e + 127) << 23, 0x00400000).to(tl.float32, bitcast=True)
        val = tl.where(bad[:, None], float("nan"), val * p2[:, None])
        if RNE_BF16:  # the interpreter (its bf16 casts truncate and mangle subnormals): store the bits
            bits = (_round_to_bf16(val).to(tl.int32, bitcast=True) >> 16).to(tl.int16)
            tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + row * K + k, bits, mask=k < K)
        else:
            tl.store(out_ptr + row * K + k, val.to(out_ptr.dtype.element_ty), mask=k < K)
        return
    s = tl.where(bad, 255, e + 127)
    blk_ok = blk < n_blocks
    tl.store(s_ptr + row * n_blocks + blk, tl.where(blk * 32 < K, s, 0).to(tl.uint8), mask=blk_ok)
    if FP4:
        pairs = tl.reshape(c, (BLOCKS, 16, 2))
        lo, hi = tl.split(pairs)
        byte = (lo | (hi << 4)).to(tl.uint8)
        kb = blk[:, None] * 16 + tl.arange(0, 16)[None, :]
        tl.store(q_ptr + row * (KQ // 2) + kb, byte, mask=blk_ok[:, None])
    else:
        tl.store(q_ptr + row * KQ + k, c.to(tl.uint8), mask=blk_ok[:, None])


def _nvfp4_act_kernel(
    x_ptr, st_ptr, out_ptr, q_ptr, s_ptr, K, KQ, stride_xm,
    BLOCKS: tl.constexpr,  # 16-element blocks per program
    EMULATE: tl.constexpr,
    RNE_BF16: tl.constexpr = False,
    CODES: tl.constexpr = False,  # write codes and scale bytes instead of the values
):
    """NVFP4 activations (FORMATS.md), given the tensor scale s_t (float32 [1] at st_ptr,
    amax / (6 * 448) of the whole x): per 16-element block s_b = E4M3(amax_block / (6 s_t))
    and codes E2M1(x / (s_b s_t)), each division correctly rounded, as lowbit.formats does.
    Writes e2m1 * s_b in x's dtype (at most 6 significant bits in [2^-10, 2688]: exact in
    bf16 and fp16); the caller multiplies the product by s_t. Finite x only.
    CODES: the E2M1 codes two per byte (even element low) into q_ptr [M, KQ / 2] and the
    E4M3 scale bytes into s_ptr [M, KQ / 16] instead; the grid then covers KQ, and the
    blocks past K get zero codes and scales."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    k = blk[:, None] * 16 + tl.arange(0, 16)[None, :]  # [BLOCKS, 16]
    x = _load_f32(x_ptr + row * stride_xm + k, k < K, EMULATE)
    s_t = tl.load(st_ptr + tl.arange(0, 1))  # [1]
    six = 6.0 * s_t
    nonzero = six > 0  # an all-zero x has s_t = 0: every block scale is 0
    bamax = tl.max(tl.abs(x), axis=1)
    ratio = tl.where(nonzero, _div(bamax, tl.where(nonzero, six, 1.0), EMULATE), 0.0)
    if EMULATE:
        sc = _e4m3_bits(ratio, EMULATE)
    else:
        sc = ratio.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    s_b = _e4m3_decode(sc)
    denom = s_b * s_t
    ok = denom > 0
    q = tl.where(ok[:, None], _div(x, tl.where(ok, denom, 1.0)[:, None], EMULATE), 0.0)
    if CODES:
        tl.store(s_ptr + row * (KQ // 16) + blk, sc.to(tl.uint8))
        lo, hi = tl.split(tl.reshape(_e2m1_bits(q), (BLOCKS, 8, 2)))
        kb = blk[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(q_ptr + row * (KQ // 2) + kb, (lo | (hi << 4)).to(tl.uint8))
        return
    val = _e2m1_value(_e2m1_bits(q)) * s_b[:, None]
    if RNE_BF16:  # the interpreter: store the bits (exact values, so no rounding happens)
        bits = (val.to(tl.int32, bitcast=True) >> 16).to(tl.int16)
        tl.store(out_ptr.to(tl.pointer_type(tl.int16)) + row * K + k, bits, mask=k < K)
    else:
        tl.store(out_ptr + row * K + k, val.to(out_ptr.dtype.element_ty), mask=k < K)


_HELPERS = {f.__name__: f for f in (_load_f32, _e4m3_bits, _e2m1_bits, _e2m1_value, _e4m3_decode, _div, _rint, _prepare, _scale_of, _encode)}
_JITTED: dict[bool, object] = {}


def helpers() -> dict:
    """The device functions, wrapped for the current mode (shared with the A8W8 kernels)."""
    mode = interpret_mode()
    key = ("helpers", mode)
    if key not in _JITTED:
        _JITTED[key] = {name: triton.jit(fn) for name, fn in _HELPERS.items()}
    return _JITTED[key]


def kernel():
    """The quantization kernel, wrapped for the current mode; its device functions
    become this module's globals in the same mode."""
    from . import _weight_only_triton as wo

    mode = interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_act_quant_kernel, do_not_specialize=["K", "KQ", "n_groups"]),
                         triton.jit(_chunk_amax_kernel, do_not_specialize=["K", "n_chunks"]),
                         triton.jit(_mx_act_quant_kernel, do_not_specialize=["K", "KQ", "n_blocks"]),
                         triton.jit(_nvfp4_act_kernel, do_not_specialize=["K"]))
    wo._kernels()  # _round_to_bf16, wrapped for this mode
    globals().update(helpers())
    globals()["_round_to_bf16"] = wo._round_to_bf16
    return _JITTED[mode]
