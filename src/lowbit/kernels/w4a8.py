"""W4A8: MXFP4 weights x FP8 E4M3 activations per token (recipe ``a8w4-fp8-mxfp4``).

```python
pw = pack_w4a8(qt, dtype=torch.bfloat16)   # qt: an MXFP4 QTensor [N, K]; once, at load time
y = w4a8_matmul(x, pw, bias=None)          # x [..., K] bf16/fp16 -> [..., N] in x.dtype
```

The product is y = (qa * sa) @ W^T (+ bias): qa the E4M3 codes of x with one
scale sa per token (``act_quant.quantize_activation``, as ``a8w8-fp8``), W the
MXFP4 weight. Two strategies compute it, both without rounding either operand:

- ``"fold"`` (large M, compute-bound): ``_w4a8_triton`` rewrites the weight as
  E4M3 codes with one power-of-two scale per row, exactly (its module note:
  possible when each row's nonzero 32-blocks span at most 14 binary exponents,
  checked at packing), into a temporary [N, KQ] buffer; then the A8W8 GEMM of
  ``a8w8.py`` runs on the FP8 tensor cores (the same kernel, configs and tuning
  entries as ``a8w8-fp8``). The fold reads the 4-bit weight once per call and writes
  one byte per weight, which the GEMM reads: small beside a large-M GEMM.
- ``"upcast"`` (small M, memory-bound): the codes qa, exact in bf16 and fp16,
  times the weight through the weight-only kernels (``weight_only_matmul``, the
  dispatcher's GEMV / MMA choice, float32 sums returned unrounded), then
  sa * sums (+ bias), cast once.

``strategy="auto"`` folds from ``FOLD_MIN_M`` rows on (weights that cannot fold
run "upcast" at every M, ``pack_w4a8`` logs why; weights the weight-only kernels do
not take fold at every M). Backends: "triton" (CUDA, or CPU tensors under
TRITON_INTERPRET), "reference" (pure torch: the same activation quantization,
float32 products of the dequantized operands), "auto" (triton on CUDA, the
reference elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from . import act_quant
from .act_quant import padded_k

logger = logging.getLogger("lowbit.kernels")

STRATEGIES = ("auto", "fold", "upcast")
# rows from which "auto" folds: on the H200 the fold wins from 128 on 28672x4096 (104 against
# 117 us) and from 256 on 8192x28672 (at 128: 218 against 193 us); docs/perf/experiments/w4a8-h200.md
FOLD_MIN_M = 128
FOLD_SPAN = 14  # a row's nonzero blocks' exponents may span this much: d = E - Emax + 6 >= -8


@dataclass(frozen=True, repr=False)
class PackedW4A8:
    """An MXFP4 weight for ``w4a8_matmul``: the canonical codes (uint8 [N, ceil(K/2)],
    even k in the low nibble) and E8M0 exponents (uint8 [N, ceil(K/32)]), the fold's
    row exponents ``emax`` (int32 [N]) and row scales 2^(emax - 133) (float32 [N]),
    ``fold_unsupported`` (why the fold cannot be exact, or None), and the weight in
    the weight-only kernels' layout for ``dtype`` activations (the upcast strategy)."""

    n: int
    k: int
    codes: torch.Tensor
    scales: torch.Tensor
    emax: torch.Tensor
    row_scales: torch.Tensor
    fold_unsupported: str | None
    weight: object  # PackedWeight, or None (the reference backend needs none)

    @property
    def kq(self) -> int:
        return padded_k(self.k)

    @property
    def words(self) -> torch.Tensor:
        """The codes as int32 words [N, ceil(K/8)] (8 codes each) that the fold reads: the
        canonical bytes themselves where a row is whole words (K % 8 == 0), else a padded copy."""
        return code_words(self.codes)

    @property
    def upcast_unsupported(self) -> str | None:
        """Why the upcast strategy cannot run this weight (None if it can)."""
        if self.weight is None:
            return "it was packed without a weight-only layout (dtype=None): pack_w4a8(qt, dtype=x.dtype)"
        if not self.weight.triton_supported:
            return f"the weight-only kernels do not take it ({self.weight.unsupported})"
        return None

    def qtensor(self):
        from ..formats import QTensor

        return QTensor(fmt="mxfp4", shape=torch.Size((self.n, self.k)), axis=1, tile=(1, 32),
                       options={"scale_rule": "floor"}, codes=self.codes, scales=self.scales)

    def __repr__(self) -> str:
        fold = "foldable" if self.fold_unsupported is None else f"not foldable: {self.fold_unsupported}"
        return f"PackedW4A8(N={self.n}, K={self.k}, {fold}, {self.codes.device})"


def w4a8_unsupported(qt) -> str | None:
    """Why ``qt`` cannot be a W4A8 weight (None if it can)."""
    if qt.fmt != "mxfp4":
        return f"{qt.fmt} weights (W4A8 takes mxfp4)"
    if len(qt.shape) != 2 or qt.axis != 1:
        return f"a weight of shape {tuple(qt.shape)} quantized along axis {qt.axis} (a 2-D [N, K] along K)"
    if tuple(qt.tile) != (1, 32):
        return f"scale tile {qt.tile} (MXFP4: (1, 32))"
    return None


def code_words(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, B] as int32 words [N, ceil(B/4)]: a view when B % 4 == 0 (and the
    storage is aligned), else zero-padded into a new tensor."""
    b = codes.shape[1]
    if b % 4 == 0 and codes.is_contiguous() and codes.data_ptr() % 4 == 0:
        return codes.view(torch.int32)
    return act_quant.pad_columns(codes, -(-b // 4) * 4).view(torch.int32)


def fold_exponents(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """(emax int32 [N], why the fold is not exact or None) for canonical MXFP4 codes and
    E8M0 exponents: emax is each row's largest exponent over blocks holding a nonzero
    code (127 for a row of zeros)."""
    n, nb = scales.shape
    # a block (16 bytes of codes; zero past K) holds a nonzero code iff a byte has a magnitude bit
    # set: read on the bytes, without unpacking the weight (the pack's memory stays ~N * K / 2)
    blocks = torch.nn.functional.pad(codes, (0, nb * 16 - codes.shape[1])).reshape(n, nb, 16)
    live = ((blocks & 0x77) != 0).any(-1)
    e = scales.to(torch.int32)
    emax = (torch.where(live, e, torch.full_like(e, -1)).amax(1) if nb
            else torch.full((n,), -1, dtype=torch.int32, device=scales.device))
    emax = torch.where(emax < 0, torch.full_like(emax, 127), emax).to(torch.int32)
    why = None
    nan = e == 255  # a NaN block (its codes are zero)
    low = live & (e < emax[:, None] - FOLD_SPAN)
    if bool(nan.any()):
        r = int(nan.any(1).nonzero()[0])
        why = f"row {r} has a NaN block scale (E8M0 0xFF)"
    elif bool(low.any()):
        r = int(low.any(1).nonzero()[0])
        lo = int(torch.where(live[r], e[r], torch.full_like(e[r], 255)).min())
        why = (f"row {r}'s nonzero blocks span exponents {lo}..{int(emax[r])}, more than the {FOLD_SPAN} "
               f"one E4M3 row scale can hold exactly")
    return emax, why


def pack_w4a8(qt, dtype: torch.dtype | None = torch.bfloat16, device=None) -> PackedW4A8:
    """The W4A8 layout of an MXFP4 QTensor; ``dtype`` (bf16/fp16) packs the weight-only
    layout of the upcast strategy (None: none, for the reference backend)."""
    why = w4a8_unsupported(qt)
    if why is not None:
        raise ValueError(f"no W4A8 layout for {why}")
    device = torch.device(device) if device is not None else qt.codes.device
    n, k = qt.shape
    codes = qt.codes.to(device).contiguous()
    scales = qt.scales.view(torch.uint8).to(device).contiguous()
    emax, fold_why = fold_exponents(codes, scales)
    if fold_why is not None:
        logger.info("W4A8 weight [%d, %d] runs the upcast strategy at every M: %s", n, k, fold_why)
    row_scales = torch.ldexp(torch.ones(n, dtype=torch.float32, device=device), emax - 133)
    weight = None
    if dtype is not None:
        from .packing import pack_weight

        weight = pack_weight(qt, dtype=dtype, device=device)
    return PackedW4A8(n, k, codes, scales, emax, row_scales, fold_why, weight)


def tuned_recipes(recipe) -> tuple[str, ...] | None:
    """The recipes whose kernels a W4A8 recipe runs, for ``lowbit tune`` (None for any other
    recipe): the fold path's FP8 GEMM is a8w8-fp8's (the same tuning entries), the upcast
    path's kernels a16w4-mxfp4's."""
    from ..nn.recipes import parse_recipe

    r = parse_recipe(recipe) if isinstance(recipe, str) else recipe
    act = r.activation
    if r.weight_fmt == "mxfp4" and act.fmt == "fp8_e4m3" and act.options == {"granularity": "token"}:
        return ("a8w8-fp8", "a16w4-mxfp4")
    return None


# ------------------------------------------------------------------ the fold


# rows, input words (8 codes each), warps per program of the fold kernel: 54 us on 28672x4096
# (3.3 TB/s moved), 108 us on 8192x28672 (docs/perf/experiments/w4a8-h200.md)
FOLD_TILE = (4, 256, 4)


def fold_weight(pw: PackedW4A8, tile: tuple[int, int, int] = FOLD_TILE):
    """The weight as an A8W8 FP8 weight (``a8w8.PackedA8W8``): E4M3 codes [N, KQ] (a new
    buffer, written by the fold kernel) and the row scales."""
    import triton

    from . import _w4a8_triton
    from .a8w8 import PackedA8W8

    if pw.fold_unsupported is not None:
        raise ValueError(f"this W4A8 weight cannot fold exactly: {pw.fold_unsupported}; use strategy='upcast'")
    block_n, block_w, warps = tile
    kq = pw.kq
    out = torch.empty((pw.n, kq), dtype=torch.uint8, device=pw.codes.device)
    if pw.n:
        kw = pw.words.shape[1]
        from ._weight_only_triton import interpret_mode

        _w4a8_triton.kernel()[(triton.cdiv(pw.n, block_n), triton.cdiv(kq // 8, block_w))](
            pw.words, pw.scales, pw.emax, out.view(torch.int64), pw.n, kw, pw.scales.shape[1], kq // 8,
            BLOCK_N=block_n, BLOCK_W=block_w, ASM=not interpret_mode(), num_warps=warps,
        )
    return PackedA8W8("fp8_e4m3", pw.n, pw.k, out, pw.row_scales, False)


def fold_weight_reference(pw: PackedW4A8) -> torch.Tensor:
    """The fold in torch: E4M3 bit patterns uint8 [N, KQ] of W / row_scales (exact when
    ``pw.fold_unsupported`` is None)."""
    w = pw.qtensor().dequantize().double() / pw.row_scales.double()[:, None]
    codes = w.float().to(torch.float8_e4m3fn).view(torch.uint8)
    return act_quant.pad_columns(codes, pw.kq)


# ------------------------------------------------------------------ the matmul


def w4a8_reference(x2: torch.Tensor, pw: PackedW4A8, bias=None) -> torch.Tensor:
    """The same activation quantization, then float32 products of the dequantized operands."""
    codes, sa = act_quant.quantize_activation_reference(x2, "fp8_e4m3")
    a = codes.view(torch.float8_e4m3fn).float()[:, : pw.k] * sa[:, None]
    y = a @ pw.qtensor().dequantize().to(a.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def choose_strategy(m: int, pw: PackedW4A8) -> str:
    """strategy="auto": fold from FOLD_MIN_M rows on, where the weight folds exactly; the
    one strategy that can run where the other cannot; an error where neither can."""
    if pw.fold_unsupported is None and (m >= FOLD_MIN_M or pw.upcast_unsupported is not None):
        return "fold"
    if pw.upcast_unsupported is None:
        return "upcast"
    raise ValueError(f"no W4A8 strategy runs this weight: the fold cannot ({pw.fold_unsupported}) and the "
                     f"upcast cannot ({pw.upcast_unsupported}); use backend='reference'")


def _upcast(x2, pw: PackedW4A8, bias, backend: str) -> torch.Tensor:
    from .weight_only import weight_only_matmul

    if pw.upcast_unsupported is not None:
        raise ValueError(f"the upcast strategy cannot run this W4A8 weight: {pw.upcast_unsupported}")
    codes, sa = act_quant.quantize_activation(x2, "fp8_e4m3", backend="triton")
    xv = codes[:, : pw.k].view(torch.float8_e4m3fn).to(x2.dtype)  # E4M3 values are exact in bf16 and fp16
    sums = weight_only_matmul(xv, pw.weight, None, backend=backend, out_dtype=torch.float32)
    y = sums * sa[:, None]
    if bias is not None:
        y += bias.float()
    return y.to(x2.dtype)


def _fold(x2, pw: PackedW4A8, bias) -> torch.Tensor:
    from .a8w8 import _launch, plan_a8w8

    pa = fold_weight(pw)
    y = torch.empty((x2.shape[0], pw.n), dtype=x2.dtype, device=x2.device)
    cfg = plan_a8w8(x2.shape[0], pa, x2.device, x2.dtype).check()
    codes, sa = act_quant.quantize_activation(x2, "fp8_e4m3", backend="triton")
    _launch(codes, sa, pa, bias, y, cfg)
    return y


def w4a8_matmul(x: torch.Tensor, pw: PackedW4A8, bias: torch.Tensor | None = None, backend: str = "auto",
                strategy: str = "auto") -> torch.Tensor:
    """y = quantize_fp8(x) @ W^T (+ bias), in x's dtype (bf16 or fp16)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: one of {', '.join(STRATEGIES)}")
    backend = act_quant.resolve_backend(x, pw.n, pw.k, bias, backend, "W4A8", pw.codes.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    if backend == "reference":
        return w4a8_reference(x2, pw, bias).reshape(*lead, pw.n)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, pw.n))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    if strategy == "auto":
        strategy = choose_strategy(m, pw)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if strategy == "fold":
            y = _fold(x2, pw, bias)
        else:
            y = _upcast(x2, pw, bias, "auto" if x.is_cuda else "triton")
    return y.reshape(*lead, pw.n)

