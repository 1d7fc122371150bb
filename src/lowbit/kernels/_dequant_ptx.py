"""The inline PTX of the weight-only kernels' dequantization (``_weight_only_triton``
uses these strings through ``tl.inline_asm_elementwise``): one 32-bit word of codes ->
its values, two per packed bf16x2/f16x2 instruction where the format allows. Private;
the numerics are documented in docs/kernels.md and computed in torch by
``packing.kernel_weight``. Strings only: nothing here needs a GPU to import.
"""

from __future__ import annotations

import triton.language as tl

# ---- inline PTX: one 32-bit word of codes -> its 8 (4-bit) or 4 (8-bit) values

_I4_BODY = """
{{
.reg .b32 a0, a1, a2, a3, t, one, off;
mov.b32 one, {one};
mov.b32 off, {off};
lop3.b32 a0, $8, 0x000F000F, {magic}, 0xEA;
shr.u32 t, $8, 4;
lop3.b32 a1, t, 0x000F000F, {magic}, 0xEA;
shr.u32 t, $8, 8;
lop3.b32 a2, t, 0x000F000F, {magic}, 0xEA;
shr.u32 t, $8, 12;
lop3.b32 a3, t, 0x000F000F, {magic}, 0xEA;
fma.rn.{ty} a0, a0, one, off;
fma.rn.{ty} a1, a1, one, off;
fma.rn.{ty} a2, a2, one, off;
fma.rn.{ty} a3, a3, one, off;
fma.rn.{ty} a0, a0, $9, $13;
fma.rn.{ty} a1, a1, $10, $14;
fma.rn.{ty} a2, a2, $11, $15;
fma.rn.{ty} a3, a3, $12, $16;
mov.b32 {{$0, $4}}, a0;
mov.b32 {{$1, $5}}, a1;
mov.b32 {{$2, $6}}, a2;
mov.b32 {{$3, $7}}, a3;
}}
"""
# (a & b) | c = lop3 0xEA: the code pair (nibbles p and p+4 after a shift by 4p)
# OR-ed into two copies of the magic number; fma(v, 1, -magic) is the code exactly
_I4_ASM = {
    "bf16": _I4_BODY.format(ty="bf16x2", one="0x3F803F80", off="0xC300C300", magic="0x43004300"),
    "fp16": _I4_BODY.format(ty="f16x2", one="0x3C003C00", off="0xE400E400", magic="0x64006400"),
}


def _i2_asm(ty: str, one: str, off: str, magic: str) -> str:
    """PTX for one word of 2-bit codes -> its 16 values: pair p (positions p and p + 8)
    is lop3(word >> 2p, 0x00030003, magic), the code OR-ed into the magic number's
    mantissa; fma(v, 1, -magic) is the code exactly; one fma applies scale and bias.
    Operands: outputs $0..$15 (position j in $j), the word $16, the scale pairs $17
    (p < 4) and $18 (p >= 4), the bias pairs $19 and $20."""
    lines = ["{", ".reg .b32 a, t, one, off;", f"mov.b32 one, {one};", f"mov.b32 off, {off};"]
    for p in range(8):
        src = "$16"
        if p:
            lines.append(f"shr.u32 t, $16, {2 * p};")
            src = "t"
        sc, bi = ("$17", "$19") if p < 4 else ("$18", "$20")
        lines += [f"lop3.b32 a, {src}, 0x00030003, {magic}, 0xEA;", f"fma.rn.{ty} a, a, one, off;",
                  f"fma.rn.{ty} a, a, {sc}, {bi};", f"mov.b32 {{${p}, ${p + 8}}}, a;"]
    lines.append("}")
    return "\n".join(lines)


_I2_ASM = {
    "bf16": _i2_asm("bf16x2", "0x3F803F80", "0xC300C300", "0x43004300"),
    "fp16": _i2_asm("f16x2", "0x3C003C00", "0xE400E400", "0x64006400"),
}


def _to_f32(asm: str, ty: str) -> str:
    """The same PTX with float32 outputs ($0..$7 = "=r"): each bf16x2/f16x2 pair
    a{p} widened (bf16: a shift or a mask; fp16: a conversion)."""
    for p in range(4):
        old = f"mov.b32 {{${p}, ${p + 4}}}, a{p};"
        if ty == "bf16":
            new = f"shl.b32 ${p}, a{p}, 16;\nand.b32 ${p + 4}, a{p}, 0xFFFF0000;"
        else:
            new = (f"{{\n.reg .b16 l, h;\nmov.b32 {{l, h}}, a{p};\ncvt.f32.f16 ${p}, l;\n"
                   f"cvt.f32.f16 ${p + 4}, h;\n}}")
        assert old in asm
        asm = asm.replace(old, new)
    return asm


def _mx_pair(p: int, mag_shift: int, sign_shift: int) -> str:
    """PTX for the e2m1 pair (nibbles p, p+4) -> a{p}: magnitude bits moved by
    mag_shift (left if positive), sign bit by sign_shift."""
    def shift(dst, amount):
        if amount > 0:
            return f"shl.b32 {dst}, $8, {amount};\n"
        if amount < 0:
            return f"shr.u32 {dst}, $8, {-amount};\n"
        return f"mov.b32 {dst}, $8;\n"

    return shift("m", mag_shift) + shift("s", sign_shift) + "and.b32 s, s, 0x80008000;\n" + (
        f"lop3.b32 a{p}, m, MAGMASK, s, 0xEA;\n"
    )


def _mx_asm(ty: str, mag_pos: int, magmask: str) -> str:
    body = "".join(_mx_pair(p, mag_pos - 4 * p, 12 - 4 * p) for p in range(4)).replace("MAGMASK", magmask)
    return (
        "{\n.reg .b32 a0, a1, a2, a3, m, s, z;\nmov.b32 z, 0x80008000;\n" + body
        + "".join(f"fma.rn.{ty} a{p}, a{p}, ${9 + p}, z;\n" for p in range(4))
        + "".join(f"mov.b32 {{${p}, ${p + 4}}}, a{p};\n" for p in range(4)) + "}\n"
    )


# e2m1 (s e1 e0 m) -> bf16 bits: e1 e0 m at bits 8..6, sign at 15; fp16: bits 11..9
_MX_ASM = {"bf16": _mx_asm("bf16x2", 6, "0x01C001C0"), "fp16": _mx_asm("f16x2", 9, "0x0E000E00")}

_I8_BODY = """
{{
.reg .b32 f0, f1, f2, f3, c, h0, h1;
mov.b32 c, 0x4B000000;
prmt.b32 f0, $4, c, 0x7650;
prmt.b32 f1, $4, c, 0x7651;
prmt.b32 f2, $4, c, 0x7652;
prmt.b32 f3, $4, c, 0x7653;
sub.f32 f0, f0, 0f4B000000;
sub.f32 f1, f1, 0f4B000000;
sub.f32 f2, f2, 0f4B000000;
sub.f32 f3, f3, 0f4B000000;
fma.rn.f32 f0, f0, $5, $9;
fma.rn.f32 f1, f1, $6, $10;
fma.rn.f32 f2, f2, $7, $11;
fma.rn.f32 f3, f3, $8, $12;
cvt.rn.{ty}.f32 h0, f1, f0;
cvt.rn.{ty}.f32 h1, f3, f2;
mov.b32 {{$0, $1}}, h0;
mov.b32 {{$2, $3}}, h1;
}}
"""
# byte j of the word into the low byte of float32 2^23 (prmt), minus 2^23: the code
_I8_ASM = {"bf16": _I8_BODY.format(ty="bf16x2"), "fp16": _I8_BODY.format(ty="f16x2")}

_F8_BODY = """
{{
.reg .b16 lo16, hi16, c0, c1, c2, c3;
.reg .b32 p0, p1, f0, f1, f2, f3, r0, r1;
mov.b32 {{lo16, hi16}}, $4;
cvt.rn.f16x2.{el}x2 p0, lo16;
cvt.rn.f16x2.{el}x2 p1, hi16;
mov.b32 {{c0, c1}}, p0;
mov.b32 {{c2, c3}}, p1;
cvt.f32.f16 f0, c0;
cvt.f32.f16 f1, c1;
cvt.f32.f16 f2, c2;
cvt.f32.f16 f3, c3;
mul.rn.f32 f0, f0, $5;
mul.rn.f32 f1, f1, $6;
mul.rn.f32 f2, f2, $7;
mul.rn.f32 f3, f3, $8;
cvt.rn.{ty}.f32 r0, f1, f0;
cvt.rn.{ty}.f32 r1, f3, f2;
mov.b32 {{$0, $1}}, r0;
mov.b32 {{$2, $3}}, r1;
}}
"""
_F8_F32_BODY = """
{{
.reg .b16 lo16, hi16, c0, c1, c2, c3;
.reg .b32 p0, p1;
mov.b32 {{lo16, hi16}}, $4;
cvt.rn.f16x2.{el}x2 p0, lo16;
cvt.rn.f16x2.{el}x2 p1, hi16;
mov.b32 {{c0, c1}}, p0;
mov.b32 {{c2, c3}}, p1;
cvt.f32.f16 $0, c0;
cvt.f32.f16 $1, c1;
cvt.f32.f16 $2, c2;
cvt.f32.f16 $3, c3;
}}
"""
# FP8 bytes (E4M3 or E5M2): two per hardware conversion into an exact f16 pair,
# widened to float32, times the float32 scale (one rounding), then to the dtype
_F8_ASM = {(el, dt): _F8_BODY.format(el=el, ty=ty)
           for el in ("e4m3", "e5m2") for dt, ty in (("bf16", "bf16x2"), ("fp16", "f16x2"))}


def _f32_codes_asm(bits: int) -> str:
    """PTX: one word -> its codes as float32 f = C + q (the flush undoes C).

    4-bit, two codes per LOP3: r = lop3(word >> 4p, 0x000F000F, 0x43004300) holds the
    bf16 pair 128 + q_p (low half), 128 + q_(p+4) (high half). r << 16 is the float32
    128 + q_p; r itself, read as one float32, is 128 + 67/256 + q_(p+4) + q_p / 65536
    (the low half's bits sit below the high half's mantissa). So C = 128 for positions
    0..3, 128 + 67/256 for 4..7, and position p + 4 carries 1/65536 of position p's
    code: at most 0.00023 of a quantization step, below a bf16 rounding of the weight
    (``packing.kernel_weight(rounded=False)`` includes it). Three shifts, four LOP3 and
    four shifts for eight codes. 8-bit: the code moved into the mantissa of 1.0 (one
    shift, one LOP3 each): f = 1 + q / 256, C = 1 after scaling by 256."""
    if bits == 4:
        lines = ["{", ".reg .b32 t, r;"]
        for p in range(4):
            src = "$8"
            if p:
                lines.append(f"shr.u32 t, $8, {4 * p};")
                src = "t"
            lines.append(f"lop3.b32 r, {src}, 0x000F000F, 0x43004300, 0xEA;")
            lines.append(f"shl.b32 ${p}, r, 16;")
            lines.append(f"mov.b32 ${p + 4}, r;")
        lines.append("}")
        return "\n".join(lines)
    lines = ["{", ".reg .b32 t, mg;", "mov.b32 mg, 0x3F800000;"]
    for j in range(4):
        sh = 15 - 8 * j
        if sh > 0:
            lines.append(f"shl.b32 t, $4, {sh};")
        else:
            lines.append(f"shr.u32 t, $4, {-sh};")
        lines.append(f"lop3.b32 ${j}, t, 0x007F8000, mg, 0xEA;")
    lines.append("}")
    return "\n".join(lines)


_F32_CODES4 = tl.constexpr(_f32_codes_asm(4))
_F32_CODES8 = tl.constexpr(_f32_codes_asm(8))


_I4_ASM_BF16 = tl.constexpr(_I4_ASM["bf16"])
_I4_ASM_BF16_F32 = tl.constexpr(_to_f32(_I4_ASM["bf16"], "bf16"))
_I4_ASM_FP16_F32 = tl.constexpr(_to_f32(_I4_ASM["fp16"], "fp16"))
_MX_ASM_BF16_F32 = tl.constexpr(_to_f32(_MX_ASM["bf16"], "bf16"))
_MX_ASM_FP16_F32 = tl.constexpr(_to_f32(_MX_ASM["fp16"], "fp16"))
_I4_ASM_FP16 = tl.constexpr(_I4_ASM["fp16"])
_MX_ASM_BF16 = tl.constexpr(_MX_ASM["bf16"])
_MX_ASM_FP16 = tl.constexpr(_MX_ASM["fp16"])
_F8_F32_E4M3 = tl.constexpr(_F8_F32_BODY.format(el="e4m3"))
_F8_F32_E5M2 = tl.constexpr(_F8_F32_BODY.format(el="e5m2"))
_F8_ASM_E4M3_BF16 = tl.constexpr(_F8_ASM[("e4m3", "bf16")])
_F8_ASM_E4M3_FP16 = tl.constexpr(_F8_ASM[("e4m3", "fp16")])
_F8_ASM_E5M2_BF16 = tl.constexpr(_F8_ASM[("e5m2", "bf16")])
_F8_ASM_E5M2_FP16 = tl.constexpr(_F8_ASM[("e5m2", "fp16")])
_I8_ASM_BF16 = tl.constexpr(_I8_ASM["bf16"])
_I2_ASM_BF16 = tl.constexpr(_I2_ASM["bf16"])
_I2_ASM_FP16 = tl.constexpr(_I2_ASM["fp16"])
_I8_ASM_FP16 = tl.constexpr(_I8_ASM["fp16"])
