"""Triton kernel of the A8W8 matmul (``a8w8.py`` is the public op):
y = (qa * sa) @ (qw * sw)^T (+ bias), qa the activation codes from
``act_quant`` [M, KQ], qw the weight codes [N, KQ], both FP8 E4M3 or INT8 and
both K-major (what the FP8 tensor cores need).

Scales, two schemes:

- per-token x per-channel (BLOCKWISE False): the K loop accumulates the
  products of codes in the MMA's accumulator (float32 for FP8, int32 for
  INT8, exact; for FP8 over K > 4096 the tensor cores' sum restarts every
  4096 and is added into a float32 total, since Hopper's FP8 MMA accumulates
  with fewer bits than float32); the epilogue multiplies by sa[m] * sw[n];
- DeepSeek-style blocks (BLOCKWISE True): activations 1 x 128, weights
  128 x 128; every 128-deep K tile's product is scaled by
  sa[m, t] * sw[n // 128, t] before it joins the float32 accumulator.

Orientations: SWAP computes y^T tiles (the weight is the MMA's wide side) for
small M; otherwise y tiles. Split-K writes float32 partials (already scaled)
to a workspace that the weight-only module's reduce kernel sums, adding the
bias and casting. Under TRITON_INTERPRET (EMULATE) the codes arrive as bytes
and are decoded to float32 exactly before a float32 dot.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from . import _act_quant_triton as aq
from ._weight_only_triton import _round_to_bf16, _store_tile, interpret_mode


def _operand(codes, INT8: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:
        if INT8:
            return codes.to(tl.float32)
        return _e4m3_decode(codes.to(tl.int32))
    return codes


def _mma(x, y, acc, INT_MMA: tl.constexpr):
    """acc + x @ y, with int32 accumulation for INT8. One exit: Triton 3.6 mistypes
    helpers that return from several branches."""
    if INT_MMA:
        out = tl.dot(x, y, acc, out_dtype=tl.int32)
    else:
        out = tl.dot(x, y, acc)
    return out


def _prefetch_weight_tiles(w_ptr, offs_n, N, KQ, t_begin, t_end, BLOCK_K: tl.constexpr, TILES: tl.constexpr):
    """Ask L2 for the first TILES K tiles of these weight rows (one 128-byte line per row
    and tile: BLOCK_K <= 128 bytes), while the kernel before this one finishes."""
    rows = w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * KQ
    for i in tl.static_range(TILES):
        t = tl.minimum(t_begin + i, t_end - 1)
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [rows + t * BLOCK_K], dtype=tl.int32,
                                  is_pure=False, pack=1)


def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row blocks share each weight tile in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % num_in_group) % group_size, (pid % num_in_group) // group_size


def _a8w8_kernel(
    a_ptr, w_ptr, sa_ptr, sw_ptr, bias_ptr, y_ptr, ws_ptr,
    M, N, KQ, NT, TPS, stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP: tl.constexpr,
    INT8: tl.constexpr,
    BLOCKWISE: tl.constexpr,
    PARTIAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EMULATE: tl.constexpr,
    RNE_BF16: tl.constexpr,
    SEG: tl.constexpr = 0,  # FP8 (not blockwise): restart the MMA sum every SEG K tiles (0: never)
    PDL: tl.constexpr = 0,  # launched early (programmatic dependent launch): prefetch this many
                            # weight tiles into L2, then wait for the activation quantization
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if PDL > 0:
        _prefetch_weight_tiles(w_ptr, offs_n, N, KQ, pid_k * TPS, tl.minimum(pid_k * TPS + TPS, NT), BLOCK_K, PDL)
        gdc_wait()
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * KQ + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * KQ + offs_k[None, :]
    INT_MMA: tl.constexpr = INT8 and not EMULATE
    PART_TY: tl.constexpr = tl.int32 if INT_MMA else tl.float32
    if SWAP:
        if INT_MMA and not BLOCKWISE:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        if INT_MMA and not BLOCKWISE:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    t_begin = pid_k * TPS
    t_end = tl.minimum(t_begin + TPS, NT)
    KB: tl.constexpr = 128 // BLOCK_K if BLOCK_K < 128 else 1  # K steps per 128-wide scale block
    nkb = tl.cdiv(KQ, 128)
    if SEG > 0:
        # FP8 over a long K: the tensor cores' sum restarts every SEG tiles and is
        # added into a float32 total (their accumulator keeps fewer bits than float32)
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for s0 in range(t_begin, t_end, SEG):
            seg = tl.zeros(acc.shape, dtype=tl.float32)
            for t in range(s0, tl.minimum(s0 + SEG, t_end)):
                a = _operand(tl.load(a_ptrs + t * BLOCK_K, mask=m_ok[:, None]), INT8, EMULATE)
                w = _operand(tl.load(w_ptrs + t * BLOCK_K, mask=n_ok[:, None]), INT8, EMULATE)
                if SWAP:
                    seg = _mma(w, tl.trans(a), seg, False)
                else:
                    seg = _mma(a, tl.trans(w), seg, False)
            total += seg
        acc = total
    else:
        for t in range(t_begin, t_end):
            a = _operand(tl.load(a_ptrs + t * BLOCK_K, mask=m_ok[:, None]), INT8, EMULATE)
            w = _operand(tl.load(w_ptrs + t * BLOCK_K, mask=n_ok[:, None]), INT8, EMULATE)
            if BLOCKWISE:
                # a fresh product per 128-deep tile, scaled into the float32 accumulator
                if SWAP:
                    part = _mma(w, tl.trans(a), tl.zeros((BLOCK_N, BLOCK_M), PART_TY), INT_MMA)
                else:
                    part = _mma(a, tl.trans(w), tl.zeros((BLOCK_M, BLOCK_N), PART_TY), INT_MMA)
                kb = t // KB
                sa = tl.load(sa_ptr + offs_m.to(tl.int64) * nkb + kb, mask=m_ok, other=0.0)
                sw = tl.load(sw_ptr + (offs_n // 128).to(tl.int64) * nkb + kb, mask=n_ok, other=0.0)
                if SWAP:
                    acc += part.to(tl.float32) * (sw[:, None] * sa[None, :])
                else:
                    acc += part.to(tl.float32) * (sa[:, None] * sw[None, :])
            elif SWAP:
                acc = _mma(w, tl.trans(a), acc, INT_MMA)
            else:
                acc = _mma(a, tl.trans(w), acc, INT_MMA)

    acc = acc.to(tl.float32)
    if not BLOCKWISE:
        sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
        if SWAP:
            acc = acc * sw[:, None] * sa[None, :]
        else:
            acc = acc * sa[:, None] * sw[None, :]
    _store_tile(acc, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, pid_k, y_ptr, ws_ptr, bias_ptr,
                SWAP, PARTIAL, HAS_BIAS, RNE_BF16)


def _a8w8_tma_kernel(
    a_desc, w_desc, sa_ptr, sw_ptr, bias_ptr, y_ptr,
    M, N, KQ, stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SEG: tl.constexpr,
):
    """The tiled (not swapped), per-channel, unsplit GEMM with its operand tiles
    fetched by the TMA engine (host-made tensor descriptors; rows past M or N come
    back as zeros). GPU only."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    nt = KQ // BLOCK_K
    if INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for t in range(0, nt):
            a = a_desc.load([off_m, t * BLOCK_K])
            w = w_desc.load([off_n, t * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        acc = acc.to(tl.float32)
    elif SEG > 0:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s0 in range(0, nt, SEG):
            seg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t in range(s0, tl.minimum(s0 + SEG, nt)):
                a = a_desc.load([off_m, t * BLOCK_K])
                w = w_desc.load([off_n, t * BLOCK_K])
                seg = tl.dot(a, w.T, seg)
            acc += seg
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, nt):
            a = a_desc.load([off_m, t * BLOCK_K])
            w = w_desc.load([off_n, t * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    acc = acc * sa[:, None] * sw[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_TMA: list = []


def tma_kernel():
    if not _TMA:
        _TMA.append(triton.jit(_a8w8_tma_kernel, do_not_specialize=["M"]))
    kernel()  # its device functions, for this mode
    return _TMA[0]


_JITTED: dict[bool, tuple] = {}
_OWN_HELPERS = {f.__name__: f for f in (_operand, _mma, _tile_ids, _prefetch_weight_tiles)}


def kernel():
    """The matmul kernel, wrapped for the current mode (compiled, or interpreted);
    its device functions become this module's globals in the same mode."""
    mode = interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_a8w8_kernel, do_not_specialize=["M", "NT", "TPS"]),
                         {name: triton.jit(fn) for name, fn in _OWN_HELPERS.items()})
    from . import _weight_only_triton as wo

    wo._kernels()  # _round_to_bf16 and the split-K reduce, wrapped for this mode
    aq.kernel()  # act_quant's helpers call each other: wrapped in their own module too
    matmul, own = _JITTED[mode]
    globals().update(aq.helpers())
    globals().update(own)
    globals()["_round_to_bf16"] = wo._round_to_bf16
    globals()["_store_tile"] = wo._store_tile
    return matmul
