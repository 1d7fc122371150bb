"""A8W8 matmul: 8-bit activations (quantized on the fly) x 8-bit weights, FP8 E4M3 or INT8.

```python
pa = pack_a8w8(qt)                    # qt: QTensor, fp8_e4m3 or int8 (symmetric), per channel
                                      #     or 128 x 128 blocks; once, at load time
y = a8w8_matmul(x, pa, bias=None)     # x [..., K] bf16/fp16 -> [..., N] in x.dtype
```

What runs: ``act_quant.quantize_activation`` (one Triton kernel: per-token
scales for per-channel weights, 1 x 128 blocks for 128 x 128 weight blocks,
the SmoothQuant factor folded in), then the Triton GEMM of ``_a8w8_triton``
on the FP8/INT8 tensor cores with the scales, bias and output cast in its
epilogue. Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET),
"reference" (pure torch: the same activation quantization, float32 products
of the dequantized operands), "auto" (triton on CUDA, the reference elsewhere).

Launch configs (``A8W8Config``) come from ``plan_a8w8``: the user's tuning
cache, then the default rule below (measured on the H200):

    M <= 64   swapped MMA (y^T tiles; the weight is the wide side), BLOCK_N 128,
              BLOCK_M = M rounded up to 16..64, split-K to fill the SMs
    M > 64    tiled 128 x 256 (128 x 128 under 512 rows, or where the kernel keeps
              two accumulators: FP8, whose partial sums are promoted to float32
              every 128 along K, and block scales), BLOCK_K 128, 8 warps
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import act_quant
from .act_quant import packing_shape, pad_columns

FORMATS = ("fp8_e4m3", "int8")


@dataclass(frozen=True)
class A8W8Config:
    block_m: int
    block_n: int
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    swap: bool = False
    group_m: int = 8
    tma: bool = False  # operand tiles by the TMA engine (tiled, per channel, no split; GPU only)
    row: bool = False  # one token, per channel: the row GEMV (``_row_gemv_triton``), block_n rows per program

    def check(self) -> "A8W8Config":
        if self.row:
            from .config import check_row_tiling

            check_row_tiling(self.block_n, self.block_k)
            if self.swap or self.tma or self.split_k != 1 or self.block_m != 1:
                raise ValueError(f"row=True takes block_m=1, split_k=1, no swap or tma, got {self}")
            return self
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1) or v > 256:
                raise ValueError(f"{name}={v}: must be a power of two in [16, 256]")
        if self.block_k not in (32, 64, 128):
            raise ValueError(f"block_k={self.block_k}: 32, 64 or 128 (it divides the 128-padded K)")
        if self.swap and self.block_n < 64:
            raise ValueError(f"block_n={self.block_n}: swap needs >= 64 (the MMA's 64 rows)")
        if self.split_k < 1 or self.num_stages < 1 or self.group_m < 1:
            raise ValueError(f"split_k, num_stages and group_m must be >= 1, got {self}")
        if self.tma and (self.swap or self.split_k != 1):
            raise ValueError("tma=True takes the tiled orientation without split-K (swap=False, split_k=1)")
        return self


@dataclass(frozen=True, repr=False)
class PackedA8W8:
    """An 8-bit weight in the A8W8 kernels' layout: codes [N, KQ] K-major (FP8 bit
    patterns as uint8, or int8), zero-padded to KQ = K rounded up to 128; scales
    float32 [N] (per channel) or [ceil(N/128), KQ/128] (128 x 128 blocks)."""

    fmt: str
    n: int
    k: int
    codes: torch.Tensor
    scales: torch.Tensor
    blockwise: bool

    @property
    def kq(self) -> int:
        return self.codes.shape[1]

    @property
    def act_group(self) -> int | None:
        """The activation's scale granularity the weight's pairs with."""
        return 128 if self.blockwise else None

    def __repr__(self) -> str:
        gran = "128x128 blocks" if self.blockwise else "per channel"
        return f"PackedA8W8({self.fmt}, N={self.n}, K={self.k}, {gran}, {self.codes.device})"


def a8w8_unsupported(qt) -> str | None:
    """Why ``qt`` has no A8W8 kernel layout (None if it has one)."""
    if qt.fmt not in FORMATS:
        return f"{qt.fmt} weights (the A8W8 kernels take {', '.join(FORMATS)})"
    if len(qt.shape) != 2 or qt.axis != 1:
        return f"a weight of shape {tuple(qt.shape)} quantized along axis {qt.axis} (a 2-D [N, K] along K)"
    if qt.fmt == "int8" and not qt.options.get("symmetric", True):
        return "affine int8 (the INT8 MMA needs symmetric codes)"
    n, k = qt.shape
    if qt.tile == (1, k):
        return None
    if qt.tile == (128, 128):
        return None
    return f"scale tile {qt.tile} (per channel (1, K) or 128 x 128 blocks)"


def pack_a8w8(qt, device=None) -> PackedA8W8:
    n, k, kq, device = packing_shape(qt, a8w8_unsupported(qt), "A8W8 kernel", device)
    codes = pad_columns(qt.codes.view(torch.int8 if qt.fmt == "int8" else torch.uint8), kq, device=device)
    blockwise = qt.tile == (128, 128)
    s = qt.scales.to(device=device, dtype=torch.float32)
    scales = pad_columns(s, kq // 128, fill=1) if blockwise else s.reshape(n).contiguous()
    return PackedA8W8(qt.fmt, n, k, codes, scales, blockwise)


# ------------------------------------------------------------------ reference


def _decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "int8":
        return codes.float()
    return codes.view(torch.float8_e4m3fn).float()


def dequantized_weight(pa: PackedA8W8) -> torch.Tensor:
    """float32 [N, K]: the weight's codes times their scales."""
    w = _decode(pa.codes, pa.fmt)
    if pa.blockwise:
        s = pa.scales.repeat_interleave(128, 0)[: pa.n].repeat_interleave(128, 1)
    else:
        s = pa.scales[:, None]
    return (w * s)[:, : pa.k]


def a8w8_reference(x2: torch.Tensor, pa: PackedA8W8, bias=None, input_scale=None) -> torch.Tensor:
    """The same activation quantization, then float32 products of the dequantized operands."""
    codes, sa = act_quant.quantize_activation_reference(x2, pa.fmt, pa.act_group, input_scale)
    a = _decode(codes, pa.fmt)
    if pa.act_group is None:
        a = a * sa[:, None]
    else:
        a = a * sa.repeat_interleave(128, 1)
    y = a[:, : pa.k] @ dequantized_weight(pa).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


# ------------------------------------------------------------------ planning


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


@functools.lru_cache(maxsize=4096)
def default_a8w8_config(m: int, n: int, kq: int, num_sms: int = 132, two_acc: bool = False) -> A8W8Config:
    """two_acc: the kernel keeps a second accumulator (FP8's promotion, block scales),
    so 128 x 256 tiles would spill: 128 x 128 then."""
    n_k = kq // 128
    if m <= 64:
        bm = _pow2_at_least(m, 16)
        tiles = -(-n // 128)
        split = max(1, min(8, n_k // 2, -(-(2 * num_sms) // tiles)))
        return A8W8Config(bm, 128, 128, split, 4, 4, swap=True)
    bm, bn = (128, 256) if m >= 512 and not two_acc else (128, 128)
    tiles = -(-m // bm) * -(-n // bn)
    split = 1 if tiles >= num_sms else max(1, min(4, n_k // 4, -(-num_sms // tiles)))
    return A8W8Config(bm, bn, 128, split, 8, 3 if bn == 256 else 4)


PROMOTE_EVERY = 4096  # FP8: K elements summed on the tensor cores before a float32 add


def promotion_tiles(pa: "PackedA8W8", block_k: int) -> int:
    """K tiles per tensor-core sum for FP8 with per-channel scales over a long K (0: one sum).
    Hopper's FP8 MMA keeps about 14 bits in its running sum: over K = 28672 that cost
    a relative error of 1.4e-2 (H200, docs/perf); restarting it every 4096 keeps the error
    of a K = 4096 product (about 4e-3, as bf16's own)."""
    if pa.fmt != "fp8_e4m3" or pa.blockwise or pa.kq <= PROMOTE_EVERY:
        return 0
    return PROMOTE_EVERY // block_k


def two_accumulators(pa: "PackedA8W8") -> bool:
    return pa.blockwise or promotion_tiles(pa, 128) > 0


def cache_key(pa: PackedA8W8, m: int, dtype: torch.dtype) -> str:
    from .dispatch import m_bucket

    gran = "b128" if pa.blockwise else "channel"
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return f"a8w8-{pa.fmt}-{gran}-{dt}-{pa.n}x{pa.k}-m{m_bucket(m)}"


def plan_a8w8(m: int, pa: PackedA8W8, device: torch.device, dtype: torch.dtype) -> A8W8Config:
    from . import dispatch

    key = cache_key(pa, m, dtype)
    cfg = _cached(dispatch.load_cache(device), key, m, pa)
    if cfg is None and m == 1 and pa.fmt == "int8" and not pa.blockwise:
        cfg = ROW_CONFIG  # before the shipped table, which was tuned before this kernel existed
    cfg = cfg or _cached(dispatch.shipped_cache(device), key, m, pa)
    return cfg or default_a8w8_config(m, pa.n, pa.kq, dispatch.num_sms(device), two_accumulators(pa))


def _cached(cache, key: str, m: int, pa: PackedA8W8) -> A8W8Config | None:
    e = cache.entries.get(key)
    if e is None or not e.get("config"):
        return None
    cfg = A8W8Config(**e["config"])
    return None if cfg.row and (m != 1 or pa.blockwise) else cfg


# M = 1, INT8 per channel: dp4a on the rows of the weight (``_row_gemv_triton``): 31.6 and
# 61.6 us on 28672x4096 and 8192x28672 (run of record of 8ea8671) against 33.5 and 65.0 us
# for the swapped MMA (that of a7aa505); docs/perf/experiments/row-gemv-h200.md. FP8 rows
# measured no faster (33.6 against 33.0 us on 28672x4096): only ``tune`` picks them.
ROW_CONFIG = A8W8Config(1, 2, 1024, 1, 2, 1, row=True)


def candidate_configs(m: int, n: int, kq: int, two_acc: bool, num_sms: int = 132,
                      blockwise: bool = False) -> list[A8W8Config]:
    """The launch configs ``tune`` times for M (a short list around the default)."""
    n_k = kq // 128
    out = [default_a8w8_config(m, n, kq, num_sms, two_acc)]
    if m == 1 and not blockwise:
        out += [A8W8Config(1, bn, bk, 1, w, 1, row=True) for bn in (1, 2, 4) for w in (1, 2, 4) for bk in (1024, 2048)]
    if m <= 64:
        bm = _pow2_at_least(m, 16)
        for bn in (64, 128, 256):
            for split in (1, 2, 4, 8):
                if split <= max(1, n_k // 2):
                    out.append(A8W8Config(bm, bn, 128, split, 4, 4, swap=True))
        out.append(A8W8Config(bm, 128, 64, 2, 4, 6, swap=True))
        for bn in (64, 128):  # deeper pipelines and more warps: more weight bytes in flight per SM
            for split in (1, 2):
                out += [A8W8Config(bm, bn, 128, split, 4, 6, swap=True), A8W8Config(bm, bn, 128, split, 8, 4, swap=True)]
    else:
        if m <= 256:  # the weight as the MMA's wide side also for a few hundred tokens
            bm = _pow2_at_least(m, 16)
            for bn, w in ((64, 4), (128, 8)):
                for split in (1, 2):
                    out.append(A8W8Config(bm, bn, 128, split, w, 4, swap=True))
        shapes = [(64, 128, 4), (64, 256, 4), (128, 128, 8), (128, 256, 8), (256, 128, 8), (128, 256, 16)]
        for bm, bn, w in shapes:
            if two_acc and bm * bn > 128 * 128 and w < 16:
                continue
            if bm == 64 and m > 512 or (bm, bn) == (64, 256) and two_acc:
                continue
            tiles = -(-m // bm) * -(-n // bn)
            splits = {1, max(1, min(4, n_k // 4, -(-num_sms // tiles)))}
            for split in sorted(splits):
                for stages in (3, 4):
                    out.append(A8W8Config(bm, bn, 128, split, w, stages))
            if m >= 512:
                out += [A8W8Config(bm, bn, 128, 1, w, stages, tma=True) for stages in (3, 4)]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def tune_a8w8(recipe, shapes, ms, device, dtype, cache, log=print, budget_left=lambda: True, bar=None) -> None:
    """``dispatch.tune`` for an a8w8 recipe: time every candidate (activation
    quantization included), reject any with a wrong result, record the fastest."""
    from ..bench.timing import cycle_calls, time_cuda_graph, weight_copies
    from ..formats import quantize_tensor
    from ..nn.recipes import parse_recipe
    from .dispatch import TUNE_TOL, confirm_fastest, num_sms

    r = parse_recipe(recipe)
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        qt = quantize_tensor(w, r.weight_fmt, **r.weight_options)
        why = a8w8_unsupported(qt)
        if why is not None or r.activation.fmt != r.weight_fmt:
            log(f"{recipe} {n}x{k}: no A8W8 kernel ({why or r.activation.fmt}); the reference runs")
            continue
        pa = pack_a8w8(qt)
        wb = w.to(dtype)
        del w, qt
        # weight copies totalling >= 4x L2, as in dispatch.tune
        pas = weight_copies(pa, lambda: pack_a8w8(quantize_tensor(torch.randn(n, k, device=device, generator=gen) * 0.02,
                                                                  r.weight_fmt, **r.weight_options)),
                            pa.codes.numel(), device)
        wbs = weight_copies(wb, lambda: torch.randn(n, k, device=device, generator=gen).to(dtype),
                            wb.numel() * wb.element_size(), device)
        for m in ms:
            if bar is not None:
                bar.update(1)
            if not budget_left():
                return
            x = torch.randn(m, k, device=device, generator=gen).to(dtype)
            bf16_us = time_cuda_graph(cycle_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in wbs]),
                                      rep_ms=5.0)
            y_ref = a8w8_matmul(x, pa, backend="reference").float()

            def rotated(cfg):
                return cycle_calls([lambda p=p: a8w8_matmul(x, p, config=cfg) for p in pas])

            ref_max = float(y_ref.abs().max()) or 1.0
            timed = []
            for cfg in candidate_configs(m, n, pa.kq, two_accumulators(pa), num_sms(device), pa.blockwise):
                try:
                    fn = (lambda c=cfg: a8w8_matmul(x, pa, config=c))
                    err = float((fn().float() - y_ref).abs().max()) / ref_max
                    if not err <= TUNE_TOL:
                        log(f"tune: {cfg} rejected: relative error {err:.3g} > {TUNE_TOL}")
                        continue
                    us = time_cuda_graph(rotated(cfg), rep_ms=5.0)
                except Exception as e:  # a config that does not fit (shared memory, registers)
                    log(f"tune: {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                timed.append((us, cfg))
            if not timed:
                continue
            us, cfg = confirm_fastest(timed, lambda t: time_cuda_graph(rotated(t[1]), rep_ms=5.0))
            cache.put(cache_key(pa, m, dtype), "triton", cfg, us, bf16_us)
            log(f"{recipe} {n}x{k} M={m}: triton {cfg} {us:.1f} us (bf16 {bf16_us:.1f} us, {bf16_us / us:.2f}x)")
        del pa, wb, pas, wbs


# ------------------------------------------------------------------ the op


# Off by default: on the H200 it saved at most 1 us at M=1 and cost 3-6 us on
# Llama-3-70B down at M=16/128 (docs/perf/experiments/a8w8-h200.md, run 10).
PDL_TILES = int(os.environ.get("LOWBIT_PDL_TILES", "0"))


def pdl_tiles(device: torch.device, cfg: A8W8Config) -> int:
    """How many weight tiles the GEMM prefetches into L2 when it is launched with
    programmatic dependent launch (LOWBIT_PDL_TILES > 0; Hopper and later, not the TMA
    variant): it starts while the activation quantization finishes and waits for the
    codes. 0: a plain launch (the default, the interpreter, older GPUs)."""
    from ._weight_only_triton import interpret_mode

    if PDL_TILES <= 0 or cfg.tma or cfg.row or interpret_mode() or device.type != "cuda":
        return 0
    return PDL_TILES if torch.cuda.get_device_capability(device)[0] >= 9 else 0


def _launch(codes, sa, pa: PackedA8W8, bias, y, cfg: A8W8Config, pdl: int = 0) -> None:
    import triton

    from . import _a8w8_triton as k8
    from ._weight_only_triton import interpret_mode, reduce_split, split_k_plan

    if cfg.row:
        from . import _row_gemv_triton

        if codes.shape[0] != 1 or pa.blockwise:
            raise ValueError(f"row=True runs one token with per-channel scales; got {codes.shape[0]} tokens, {pa}")
        _row_gemv_triton.launch_a8w8(codes, sa, pa, bias, y, cfg)
        return
    matmul = k8.kernel()
    interp = interpret_mode()
    m = codes.shape[0]
    n, kq = pa.n, pa.kq
    if pa.blockwise and cfg.block_k != 128:
        cfg = A8W8Config(cfg.block_m, cfg.block_n, 128, cfg.split_k, cfg.num_warps, cfg.num_stages, cfg.swap,
                         cfg.group_m)
    if cfg.tma and not interp and not pa.blockwise:
        _launch_tma(codes, sa, pa, bias, y, cfg)
        return
    nt = kq // cfg.block_k
    split, tps, ws = split_k_plan(nt, cfg.split_k, y)
    a_op, w_op = codes, pa.codes
    if not interp and pa.fmt == "fp8_e4m3":
        a_op, w_op = codes.view(torch.float8_e4m3fn), pa.codes.view(torch.float8_e4m3fn)
    rne = interp and y.dtype == torch.bfloat16
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    matmul[grid](
        a_op, w_op, sa, pa.scales, bias if bias is not None else pa.scales, y, ws,
        m, n, kq, nt, tps, y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SWAP=cfg.swap, INT8=pa.fmt == "int8", BLOCKWISE=pa.blockwise, PARTIAL=split > 1,
        HAS_BIAS=bias is not None, EMULATE=interp, RNE_BF16=rne,
        SEG=promotion_tiles(pa, cfg.block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **(dict(PDL=pdl, launch_pdl=True) if pdl else {}),
    )
    reduce_split(ws, split, bias, y, rne)


def _launch_tma(codes, sa, pa: PackedA8W8, bias, y, cfg: A8W8Config) -> None:
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from . import _a8w8_triton as k8

    a_op, w_op = codes, pa.codes
    if pa.fmt == "fp8_e4m3":
        a_op, w_op = codes.view(torch.float8_e4m3fn), pa.codes.view(torch.float8_e4m3fn)
    a_desc = TensorDescriptor.from_tensor(a_op, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(w_op, [cfg.block_n, cfg.block_k])
    m = codes.shape[0]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(pa.n, cfg.block_n),)
    k8.tma_kernel()[grid](
        a_desc, w_desc, sa, pa.scales, bias if bias is not None else pa.scales, y,
        m, pa.n, pa.kq, y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        INT8=pa.fmt == "int8", HAS_BIAS=bias is not None, SEG=promotion_tiles(pa, cfg.block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def a8w8_matmul(x: torch.Tensor, pa: PackedA8W8, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None, backend: str = "auto",
                config: A8W8Config | None = None) -> torch.Tensor:
    """y = quantize(x / input_scale) @ W^T (+ bias), in x's dtype (bf16 or fp16)."""
    backend = act_quant.resolve_backend(x, pa.n, pa.k, bias, backend, "A8W8", pa.codes.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pa.k)
    if backend == "reference":
        return a8w8_reference(x2, pa, bias, input_scale).reshape(*lead, pa.n)
    m = x2.shape[0]
    y = torch.empty((m, pa.n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, pa.n)
    cfg = (config or plan_a8w8(m, pa, x.device, x.dtype)).check()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    pdl = pdl_tiles(x.device, cfg)
    codes, sa = act_quant.quantize_activation(x2, pa.fmt, pa.act_group, input_scale, backend="triton", pdl=pdl > 0)
    _launch(codes, sa, pa, bias, y, cfg, pdl)
    return y.reshape(*lead, pa.n)
