"""Triton kernel of the W4A8 fold (``w4a8.py`` is the public op): an MXFP4 weight
rewritten as FP8 E4M3 codes with one power-of-two scale per row, exactly.

Each MXFP4 value is e2m1 * 2^(E_b - 127), E_b its 32-block's E8M0 exponent. With
Emax the row's largest exponent (over blocks holding a nonzero code) and
d = E_b - Emax + 6 in [-8, 6], the value is c * 2^(Emax - 133) where
c = e2m1 * 2^d is an E4M3 number: at most 6 * 2^6 = 384 <= 448, and its two
significant bits sit at or above E4M3's last subnormal bit 2^-9 (0.5 * 2^-8,
1.5 * 2^-8). ``w4a8.pack_w4a8`` checks d >= -8 for every nonzero block.

The code is built from bits (no float conversion, so Triton's interpreter and
the GPU agree): with e2m1 = s|eem, e2m1's magnitude is (1 + m/2) * 2^u0
(u0 = e - 1, or -1 with m = 0 for the subnormal 0.5), u = u0 + d; E4M3 bits
(u + 7) << 3 | m << 2 when u >= -6, else the subnormal integer
(2 + m) * 2^(u + 8) (exact for the u >= -9 allowed). Columns past K (up to KQ,
K rounded up to 128) are zero.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _e4m3_of_e2m1(c, d):
    """E4M3 bit patterns (int32) of e2m1 codes ``c`` times 2^d, d in [-8, 6]."""
    mag = c & 7
    sub = mag == 1  # 0.5 = 1.0 * 2^-1
    m = tl.where(sub, 0, mag & 1)
    u = tl.where(sub, -1, (mag >> 1) - 1) + d
    normal = ((u + 7) << 3) | (m << 2)
    subnormal = ((2 + m) << tl.maximum(u + 9, 0)) >> 1
    bits = tl.where(u >= -6, normal, subnormal)
    return tl.where(mag == 0, 0, bits) | ((c & 8) << 4)


# One word of 8 codes -> two words of 4 E4M3 bytes, with $3 = 2^(d + 7) in both f16 halves.
# Pair j (codes 2j, 2j + 1): PRMT puts code byte j in byte 1 and the word >> 4's byte j in
# byte 3, so each f16 half holds one code in its top byte's low nibble; shifts and masks
# make (s << 15) | (mag << 9), the f16 bits of e2m1 * 2^-14 (mag 1: the subnormal 2^-15);
# two exact multiplies (2^(d + 7), then 2^7) give e2m1 * 2^d, which the satfinite
# conversion writes exactly as two E4M3 bytes, the higher code in the higher byte.
_FOLD_ASM = tl.constexpr("{\n.reg .b32 w4, x, t, f, s2;\n.reg .b16 p0, p1, p2, p3;\nshr.u32 w4, $2, 4;\nmov.b32 s2, 0x58005800;\n" + "".join(
    f"prmt.b32 x, $2, w4, {sel};\nshl.b32 t, x, 4;\nand.b32 t, t, 0x80008000;\nshl.b32 f, x, 1;\n"
    f"and.b32 f, f, 0x0E000E00;\nor.b32 f, f, t;\nmul.rn.f16x2 f, f, $3;\nmul.rn.f16x2 f, f, s2;\n"
    f"cvt.rn.satfinite.e4m3x2.f16x2 p{j}, f;\n"
    for j, sel in enumerate(("0x4400", "0x5511", "0x6622", "0x7733"))
) + "mov.b32 $0, {p0, p1};\nmov.b32 $1, {p2, p3};\n}")


def _fold_kernel(
    words_ptr, scales_ptr, emax_ptr, out_ptr,
    N, KW, NB, KQW,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # input words (8 codes each) per program
    ASM: tl.constexpr,  # the GPU's f16 / E4M3 conversions (else integer decoding, for the interpreter)
):
    """codes as int32 words [N, KW] (nibble i = element 8w + i) -> E4M3 bytes as int64
    words [N, KQW] (byte j of word w = element 8w + j); one E8M0 exponent per input word
    (8 elements of one 32-block)."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)
    ok = n_ok[:, None] & (offs_w < KW)[None, :]
    word = tl.load(words_ptr + rows[:, None] * KW + offs_w[None, :], mask=ok, other=0)
    e = tl.load(scales_ptr + rows[:, None] * NB + (offs_w // 4)[None, :], mask=ok, other=0).to(tl.int32)
    emax = tl.load(emax_ptr + offs_n, mask=n_ok, other=0)
    d = e - emax[:, None] + 6
    if ASM:
        m = tl.minimum(tl.maximum(d + 22, 0), 30) << 10  # the f16 bits of 2^(d + 7) (0 below d = -22)
        lo, hi = tl.inline_asm_elementwise(_FOLD_ASM, "=r,=r,r,r", [word, m | (m << 16)],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        lo = _e4m3_of_e2m1(word & 15, d)
        hi = _e4m3_of_e2m1((word >> 16) & 15, d)
        for j in tl.static_range(1, 4):
            lo |= _e4m3_of_e2m1((word >> (4 * j)) & 15, d) << (8 * j)
            hi |= _e4m3_of_e2m1((word >> (16 + 4 * j)) & 15, d) << (8 * j)
    out = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
    tl.store(out_ptr + rows[:, None] * KQW + offs_w[None, :], out, mask=n_ok[:, None] & (offs_w < KQW)[None, :])


_JITTED: dict = {}
_OWN_HELPERS = {"_e4m3_of_e2m1": _e4m3_of_e2m1}


def kernel():
    """The fold kernel for the current mode (compiled, or interpreted); its device
    function becomes this module's global in the same mode."""
    from ._weight_only_triton import interpret_mode

    mode = interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_fold_kernel, do_not_specialize=["N"]),
                         {name: triton.jit(fn) for name, fn in _OWN_HELPERS.items()})
    fold, own = _JITTED[mode]
    globals().update(own)
    return fold
