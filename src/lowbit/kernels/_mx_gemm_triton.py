"""Triton kernel of the MX matmul (``mx.py`` is the public op):
y = (a * 2^Ea) @ (w * 2^Ew)^T (+ bias), both operands OCP MX (E8M0 scale per 32
along K): MXFP8 (E4M3) or MXFP4 (E2M1, two per byte, even element low), through
``tl.dot_scaled``. On Blackwell that is the native block-scaled MMA; on Hopper
Triton upcasts both operands to bf16 (exact: every scaled E4M3/E2M1 value is a
bf16 value) and runs the bf16 MMA. Products are exact, sums float32. Split-K
writes float32 partials that the weight-only module's reduce kernel sums.

NV: both operands NVFP4 (E2M1 codes, E4M3 scale bytes per 16 along K), the product of
the two tensor scales (float32 [1] at ts_ptr) applied to the float32 sums. Triton's
CPU interpreter decodes every ``tl.dot_scaled`` scale as E8M0, so under it (EMULATE)
the kernel decodes the codes and scales itself and multiplies in float32 (the same
exact products); the ``tl.dot_scaled`` call itself runs only on a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._weight_only_triton import _round_to_bf16, _store_tile, interpret_mode


def _mx_gemm_kernel(
    a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, KQ, NT, TPS, stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    A_FP4: tl.constexpr,
    W_FP4: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RNE_BF16: tl.constexpr,
    NV: tl.constexpr = False,  # NVFP4 x NVFP4 (E4M3 scales per 16; ts_ptr: the tensor scales' product)
    EMULATE: tl.constexpr = False,
    ts_ptr=None,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    AK: tl.constexpr = BLOCK_K // 2 if A_FP4 else BLOCK_K  # bytes of a row's K tile
    WK: tl.constexpr = BLOCK_K // 2 if W_FP4 else BLOCK_K
    SG: tl.constexpr = 16 if NV else 32  # elements per scale
    SK: tl.constexpr = BLOCK_K // SG
    a_row = KQ // 2 if A_FP4 else KQ
    w_row = KQ // 2 if W_FP4 else KQ
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * a_row + tl.arange(0, AK)[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * w_row + tl.arange(0, WK)[None, :]
    sa_ptrs = sa_ptr + offs_m.to(tl.int64)[:, None] * (KQ // SG) + tl.arange(0, SK)[None, :]
    sw_ptrs = sw_ptr + offs_n.to(tl.int64)[:, None] * (KQ // SG) + tl.arange(0, SK)[None, :]
    A_FMT: tl.constexpr = "e2m1" if A_FP4 else "e4m3"
    W_FMT: tl.constexpr = "e2m1" if W_FP4 else "e4m3"
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_begin = pid_k * TPS
    t_end = tl.minimum(t_begin + TPS, NT)
    for t in range(t_begin, t_end):
        a = tl.load(a_ptrs + t * AK, mask=m_ok[:, None], other=0)
        w = tl.load(w_ptrs + t * WK, mask=n_ok[:, None], other=0)
        sa = tl.load(sa_ptrs + t * SK, mask=m_ok[:, None], other=0)
        sw = tl.load(sw_ptrs + t * SK, mask=n_ok[:, None], other=0)
        if NV and EMULATE:
            acc = tl.dot(_nvfp4_values(a, sa, BLOCK_K), tl.trans(_nvfp4_values(w, sw, BLOCK_K)), acc)
        elif NV:
            acc = tl.dot_scaled(a, sa.to(tl.float8e4nv, bitcast=True), "e2m1", tl.trans(w),
                                sw.to(tl.float8e4nv, bitcast=True), "e2m1", acc)
        else:
            acc = tl.dot_scaled(a, sa, A_FMT, tl.trans(w), sw, W_FMT, acc)
    if NV:
        acc = acc * tl.load(ts_ptr)
    _store_tile(acc, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, pid_k, y_ptr, ws_ptr, bias_ptr,
                False, PARTIAL, HAS_BIAS, RNE_BF16)


def _nvfp4_values(b, s, BLOCK_K: tl.constexpr):
    """Interpreter: bytes [R, BLOCK_K / 2] of E2M1 pairs (even element low) and E4M3 scale
    bytes [R, BLOCK_K / 16] -> the values e2m1 * s_b, float32 [R, BLOCK_K] (exact)."""
    c = b.to(tl.int32)
    codes = tl.reshape(tl.join(c & 15, c >> 4), (b.shape[0], BLOCK_K))
    sb = _e4m3_decode(s.to(tl.int32))
    sb = tl.reshape(tl.broadcast_to(sb[:, :, None], (b.shape[0], BLOCK_K // 16, 16)), (b.shape[0], BLOCK_K))
    return _e2m1_value(codes) * sb


_NVFP4_VALUES = _nvfp4_values  # the plain function (the module global becomes its wrapper)
_JITTED: dict[bool, object] = {}


def kernel():
    """The kernel, wrapped for the current mode; its device functions (the shared tile
    order, bf16 rounding) become this module's globals in the same mode."""
    from . import _a8w8_triton as k8
    from . import _act_quant_triton as aq
    from . import _weight_only_triton as wo

    mode = interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_mx_gemm_kernel, do_not_specialize=["M", "NT", "TPS"]),
                         triton.jit(_NVFP4_VALUES))
    k8.kernel()
    wo._kernels()
    globals().update({name: aq.helpers()[name] for name in ("_e2m1_value", "_e4m3_decode")})
    globals()["_nvfp4_values"] = _JITTED[mode][1]
    globals()["_tile_ids"] = k8._tile_ids
    globals()["_round_to_bf16"] = wo._round_to_bf16
    globals()["_store_tile"] = wo._store_tile
    return _JITTED[mode][0]
