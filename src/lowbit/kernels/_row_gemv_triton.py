"""Row GEMV: one token times an 8-bit weight read in its canonical [N, K] bytes.

Private: ``weight_only.py`` (mode "row") and ``a8w8.py`` (``A8W8Config(row=True)``)
launch it. Each program owns BLOCK_N whole rows of the weight and walks K in
BLOCK_K-wide slices of contiguous bytes; every thread keeps float32 (or int32)
partial sums [BLOCK_N, BLOCK_K] of its own elements and the row sums are reduced
once, at the end: no MMA, no per-tile reduction, no shared memory in the loop. x is
loaded with the weight tile's shape (a broadcast pointer), so Triton gives both the
same register layout and never converts between them.

Why: at M = 1 the word layout of ``_weight_only_triton`` (N-contiguous words, four K
chunks per word) streamed 8-bit weights at 3.3 TB/s on the H200 (``lowbit bench``);
whole rows stream at 3.5 TB/s, and the A8W8 INT8 dp4a variant at 3.7-3.8 TB/s with the
activation quantization included (docs/perf/experiments/row-gemv-h200.md).

Numerics (``kernel`` = ``_row_gemv_kernel``):

- int8 codes: the byte permuted into the float32 2^23 + u (u the unsigned byte; the
  stored two's-complement byte XOR 0x80 when symmetric), minus 2^23 (+128 when
  symmetric): the code's exact value q (symmetric) or u (affine). y = s * sum x q, or
  s * sum x u + b * sum x with b = -zero * s (affine); sums in float32.
- FP8 codes (E4M3, E5M2): the hardware's exact e4m3x2/e5m2x2 -> f16x2 conversion,
  widened to float32; y = s * sum x v.
- A8W8 FP8 (X_CODES): x arrives as E4M3 codes with one scale per token and is decoded
  the same way; y = (sum xq wq) * sx * sw.
- A8W8 INT8 (``_row_dp4a_kernel``): dp4a on int32 words of four codes, exact int32
  sums; y = sum * sx * sw.

Bias is added in float32, then the cast (as the other kernels' epilogue). Triton's
CPU interpreter cannot run PTX: under TRITON_INTERPRET the same values come from
plain Triton operations (exact: every decode here is).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dequant_ptx import _F8_F32_E4M3, _F8_F32_E5M2  # noqa: F401  (the jitted code names them)
from ._weight_only_triton import _HELPERS as _WO_HELPERS, interpret_mode

# the plain device functions (that module's globals become its jitted wrappers once used)
_fp8_value = _WO_HELPERS["_fp8_value"]
_round_to_bf16 = _WO_HELPERS["_round_to_bf16"]

# four int8 codes (one 32-bit register) -> their exact values in float32: the byte
# permuted under the exponent of 2^23 (bits 0x4B0000uu = 2^23 + u), then 2^23 (+ 128
# after the XOR that maps a two's-complement q to u = q + 128) subtracted exactly
_I8_BODY = """
{{
.reg .b32 u;
{xor}
prmt.b32 $0, u, 0x4B000000, 0x7440;
prmt.b32 $1, u, 0x4B000000, 0x7441;
prmt.b32 $2, u, 0x4B000000, 0x7442;
prmt.b32 $3, u, 0x4B000000, 0x7443;
sub.f32 $0, $0, {off};
sub.f32 $1, $1, {off};
sub.f32 $2, $2, {off};
sub.f32 $3, $3, {off};
}}
"""
_I8_SIGNED_F32 = tl.constexpr(_I8_BODY.format(xor="xor.b32 u, $4, 0x80808080;", off="0f4B000080"))
_I8_UNSIGNED_F32 = tl.constexpr(_I8_BODY.format(xor="mov.b32 u, $4;", off="0f4B000000"))
_DP4A = tl.constexpr("dp4a.s32.s32 $0, $1, $2, $3;")

CODES = {"int8": 0, "fp8_e4m3": 1, "fp8_e5m2": 2}


def _decode(c, CODE: tl.constexpr, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """8-bit codes (a tensor of bytes) -> their exact float32 values."""
    if ASM:
        if CODE == 1:
            return tl.inline_asm_elementwise(_F8_F32_E4M3, "=r,=r,=r,=r,r", [c], dtype=tl.float32,
                                             is_pure=True, pack=4)
        elif CODE == 2:
            return tl.inline_asm_elementwise(_F8_F32_E5M2, "=r,=r,=r,=r,r", [c], dtype=tl.float32,
                                             is_pure=True, pack=4)
        elif SIGNED:
            return tl.inline_asm_elementwise(_I8_SIGNED_F32, "=r,=r,=r,=r,r", [c], dtype=tl.float32,
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_I8_UNSIGNED_F32, "=r,=r,=r,=r,r", [c], dtype=tl.float32,
                                             is_pure=True, pack=4)
    if CODE == 0:
        return c.to(tl.float32)  # int8 or uint8: exact
    return _fp8_value(c.to(tl.int32) & 0xFF, CODE == 2)


def _row_gemv_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, bias_ptr, y_ptr, N, K, stride_w,
                     CODE: tl.constexpr,  # 0 int8, 1 E4M3, 2 E5M2 weight codes
                     SIGNED: tl.constexpr,  # int8 codes stored two's complement (symmetric)
                     HAS_B: tl.constexpr,  # affine int8: y += b[n] * sum x
                     X_CODES: tl.constexpr,  # x given as E4M3 codes times xs[0] (A8W8)
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, ASM: tl.constexpr, RNE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)  # the last program's extra rows re-read row N-1 (not stored)
    offs_k = tl.arange(0, BLOCK_K)
    wp = w_ptr + rows.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    xp = x_ptr + rows[:, None] * 0 + offs_k[None, :]  # the weight tile's shape: the same layout
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c, xt = _load_step(wp, xp, k0, offs_k, K, EVEN_K)
        if X_CODES:
            xf = _decode(xt, 1, False, ASM)
        else:
            xf = xt.to(tl.float32)
        acc += _decode(c, CODE, SIGNED, ASM) * xf
        if HAS_B:
            xsum += xf
    y = tl.sum(acc, axis=1)
    if X_CODES:
        y = y * tl.load(xs_ptr)
    y = y * tl.load(s_ptr + rows)
    if HAS_B:
        y += tl.load(b_ptr + rows) * tl.sum(xsum, axis=1)
    _store_row(y, offs_n, n_ok, bias_ptr, y_ptr, HAS_BIAS, RNE_BF16)


def _load_step(wp, xp, k0, offs_k, K, EVEN_K: tl.constexpr):
    """The weight tile and x at step k0 (zeros past K)."""
    if EVEN_K:
        return tl.load(wp + k0), tl.load(xp + k0)
    k_ok = (k0 + offs_k)[None, :] < K
    return tl.load(wp + k0, mask=k_ok, other=0), tl.load(xp + k0, mask=k_ok, other=0)


def _store_row(y, offs_n, n_ok, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr, RNE_BF16: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if RNE_BF16 and y_ptr.dtype.element_ty == tl.bfloat16:  # not for float32 outputs
        y = _round_to_bf16(y)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _dp4a(w, x, acc, ASM: tl.constexpr):
    """acc + the dot of the four int8 codes in each int32 word of w and x."""
    if ASM:
        return tl.inline_asm_elementwise(_DP4A, "=r,r,r,r", [w, x, acc], dtype=tl.int32, is_pure=True, pack=1)
    for j in tl.static_range(4):  # sign-extended bytes (arithmetic shifts of int32)
        acc += ((w << (24 - 8 * j)) >> 24) * ((x << (24 - 8 * j)) >> 24)
    return acc


def _row_dp4a_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, N, KW, stride_w,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, ASM: tl.constexpr, RNE_BF16: tl.constexpr):
    """A8W8 INT8: x codes [KQ] and weight codes [N, KQ] read as int32 words (KW = KQ / 4)."""
    pid = tl.program_id(0)
    BW: tl.constexpr = BLOCK_K // 4
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = tl.minimum(offs_n, N - 1)
    offs_k = tl.arange(0, BW)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * (stride_w // 4) + offs_k[None, :]
    xp = x_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * 0 + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.int32)
    for k0 in range(0, KW, BW):
        w, x = _load_step(wp, xp, k0, offs_k, KW, EVEN_K)
        acc = _dp4a(w, x, acc, ASM)
    y = tl.sum(acc, axis=1).to(tl.float32) * tl.load(xs_ptr) * tl.load(s_ptr + rows)
    _store_row(y, offs_n, n_ok, bias_ptr, y_ptr, HAS_BIAS, RNE_BF16)


_JITTED: dict[bool, tuple] = {}
_HELPERS = {f.__name__: f for f in (_decode, _load_step, _store_row, _dp4a, _fp8_value, _round_to_bf16)}


def _kernels():
    """(row GEMV, dp4a row GEMV), wrapped for the current mode (compiled or interpreted);
    the device functions they call are module globals set to this mode's wrappers."""
    mode = interpret_mode()
    if mode not in _JITTED:
        helpers = {name: triton.jit(fn) for name, fn in _HELPERS.items()}
        _JITTED[mode] = (triton.jit(_row_gemv_kernel), triton.jit(_row_dp4a_kernel), helpers)
    gemv, dp4a, helpers = _JITTED[mode]
    globals().update(helpers)
    return gemv, dp4a


def launch_weight_only(x2: torch.Tensor, pw, bias: torch.Tensor | None, y: torch.Tensor, cfg) -> None:
    """y[1, N] = x2[1, K] @ W^T (+ bias) from ``pw.row_codes`` (mode "row"; the config
    already checked for pw)."""
    gemv, _ = _kernels()
    interp = interpret_mode()
    w = pw.row_codes
    n, k = w.shape
    code = CODES[pw.fmt]
    affine = code == 0 and w.dtype == torch.uint8
    gemv[(triton.cdiv(n, cfg.block_n),)](
        x2, pw.scales, w, pw.scales, pw.biases if affine else pw.scales, bias if bias is not None else pw.scales,
        y, n, k, w.stride(0),
        CODE=code, SIGNED=code == 0 and not affine, HAS_B=affine, X_CODES=False, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, ASM=not interp,
        RNE_BF16=interp and y.dtype == torch.bfloat16, num_warps=cfg.num_warps, num_stages=1,
    )


def launch_a8w8(codes: torch.Tensor, sx: torch.Tensor, pa, bias: torch.Tensor | None, y: torch.Tensor, cfg) -> None:
    """y[1, N] = (codes * sx) @ (W codes * sw)^T (+ bias): A8W8 per channel, one token;
    codes [1, KQ] from ``act_quant.quantize_activation``."""
    gemv, dp4a = _kernels()
    interp = interpret_mode()
    n, kq = pa.n, pa.kq
    grid = (triton.cdiv(n, cfg.block_n),)
    common = dict(HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  EVEN_K=kq % cfg.block_k == 0, ASM=not interp, RNE_BF16=interp and y.dtype == torch.bfloat16,
                  num_warps=cfg.num_warps, num_stages=1)
    b = bias if bias is not None else pa.scales
    if pa.fmt == "int8":
        dp4a[grid](codes, sx, pa.codes, pa.scales, b, y, n, kq // 4, pa.codes.stride(0), **common)
    else:
        gemv[grid](codes, sx, pa.codes, pa.scales, pa.scales, b, y, n, kq, pa.codes.stride(0),
                   CODE=CODES[pa.fmt], SIGNED=False, HAS_B=False, X_CODES=True, **common)
