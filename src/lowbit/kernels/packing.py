"""Kernel-private packing of a quantized weight for the weight-only matmul.

``pack_weight(qt, dtype=...)`` turns a canonical QTensor of a weight [N, K]
(blocked along K, docs/formats.md) into a ``PackedWeight``: the canonical
QTensor (kept for the reference path and for re-packing) plus, where the Triton
kernels support the format, the tensors in the layout those kernels read. That
layout is made at load time and never saved.

The Triton layout (``Layout`` describes it):

- K is cut into tiles of ``TILE_K`` = 128 elements (zero codes pad K to
  ``kpad``); N is padded with zero codes and zero scales to ``npad``, a multiple
  of ``N_ALIGN``, so the kernels load whole tiles without masks.
- Codes are 32-bit words, ``codes[w, n]`` (int32 [kpad * bits / 32, npad]),
  N-contiguous so that a row of words is one coalesced load. A K tile is
  ``R`` = 4 x bits word rows (8 for 2-bit, 16 for 4-bit, 32 for 8-bit); the code at
  position j of word row r of tile t (nibble or byte j, from the low bits up)
  is element ``k = t*128 + j*R + r``. So position j of all R rows of a tile is
  the contiguous K chunk [t*128 + j*R, t*128 + (j+1)*R): the kernel turns each
  word into its 8 (or 4) values at once and issues one MMA per chunk, with no
  shuffling of values along K.
- Codes are unsigned: a symmetric int code q is stored as q + 2^(b-1) (its
  pattern with the top bit flipped) and the offset moves into the bias below.
- Int scales become one (scale, bias) pair per group, ``w = q * scale + bias``
  with ``bias = -zero * scale`` (``-2^(b-1) * scale`` when symmetric), both
  [groups, npad]. For 2- and 4-bit weights they are rounded to the activation dtype
  (``dtype``, bf16 or fp16): the kernel dequantizes two values per
  instruction in that dtype (``fma.rn.bf16x2``), so each weight value is
  ``round(q * scale + bias)`` with scale and bias rounded first: a relative
  deviation from the float32 reference of about one unit in the last place of
  the dtype (``kernel_weight`` computes exactly what the kernel uses). 8-bit
  scales stay float32 (``round(fma(q, scale, bias))``, the reference's value
  for integer zero points). MXFP4 keeps its E8M0 exponents, the four of a K tile
  in one int32 word (int32 [n_tiles, npad], byte j = group j); its values are exact.
- FP8 (E4M3 or E5M2, per channel, tensor or 128 x 128 blocks) keeps its codes
  as bytes like int8 and its scales in float32; MXFP8 its codes, and its E8M0
  exponents in words like MXFP4's; each value is round(code * scale) in float32,
  then to the dtype.
- NVFP4 packs its e2m1 codes like MXFP4, its E4M3 block scales (groups of 16)
  as s_b 2^119 (bf16) / s_b 2^7 (fp16), exact, and its tensor scale times 2^7
  (float32 [1], in ``biases``): see ``NVFP4_SHIFT``.
- A scale tile that covers several rows (tensor or block granularity) is
  expanded to one scale per row; groups must be 32 or 64 elements, a multiple of
  128, or all of K (one scale per row).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..formats import QTensor

N_ALIGN = 256  # npad is a multiple of this: every BLOCK_N up to 256 tiles it
TILE_K = 128  # K elements per tile of words
TRITON_FORMATS = ("int2", "int4", "int8", "mxfp4", "nvfp4", "fp8_e4m3", "fp8_e5m2", "mxfp8_e4m3", "mxfp8_e5m2")
# the element each non-integer format's codes decode with (lowbit.formats.elements)
_ELEMENT = {"mxfp4": "fp4_e2m1", "nvfp4": "fp4_e2m1", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2",
            "mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2"}
# NVFP4: the kernels store s_b 2^shift in the activation dtype and read an e2m1 code
# as e2m1 2^-126 (bf16) / e2m1 2^-14 (fp16), so the product is e2m1 s_b 2^-7 exactly
# (at most 6 significant bits, within both dtypes' range); the sums are multiplied
# by the tensor scale times 2^7 at the end, in float32
NVFP4_SHIFT = {torch.bfloat16: 119, torch.float16: 7}
TRITON_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Layout:
    """How the Triton kernels read a PackedWeight (see the module docstring)."""

    family: str  # "int" | "mx" | "fp8" | "nvfp4" (the format registry's families)
    bits: int  # 4 or 8
    group: int  # scale group along K in elements; 0: one scale per row
    kpad: int  # K padded to a multiple of TILE_K
    npad: int  # N padded to a multiple of N_ALIGN

    @property
    def rows_per_tile(self) -> int:
        """Word rows per K tile (R)."""
        return TILE_K * self.bits // 32

    @property
    def n_tiles(self) -> int:
        return self.kpad // TILE_K


@dataclass(frozen=True, eq=False, repr=False)
class PackedWeight:
    """A weight [n, k] ready for ``weight_only_matmul``.

    ``qtensor`` is the canonical weight; ``codes``, ``scales`` and ``biases``
    are the Triton layout (None where the Triton kernels do not support the
    format, ``unsupported`` then says why). ``dtype`` is the activation dtype
    the Triton layout was made for (its scales are rounded to it for 4-bit
    ints); the Triton backend refuses other activation dtypes.
    """

    fmt: str
    n: int
    k: int
    qtensor: QTensor | None  # None: kernel tensors only (the custom op rebuilds one from them)
    dtype: torch.dtype
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    biases: torch.Tensor | None = None  # int: per group; nvfp4: the tensor scale times 2^7, float32 [1]
    layout: Layout | None = None
    unsupported: str | None = None
    kbytes: torch.Tensor | None = None  # K-major 4-bit codes [npad, kpad / 2] (``with_kmajor``)
    # 8-bit codes one scale per row: the canonical [n, k] bytes (the QTensor's own tensor, not a
    # copy) that the one-token row GEMV reads (``row_supported``)
    row_codes: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.codes.device if self.qtensor is None else self.qtensor.device

    @property
    def triton_supported(self) -> bool:
        return self.layout is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed (kernel) tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.biases, self.kbytes)
                   if t is not None)  # row_codes: the QTensor's codes, not counted twice

    def to(self, device) -> "PackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        qt = None if self.qtensor is None else self.qtensor.to(device)
        rows = self.row_codes
        if rows is not None:  # still the QTensor's own bytes where there is one
            rows = qt.codes if qt is not None else rows.to(device)
        return replace(
            self,
            qtensor=qt,
            codes=move(self.codes),
            scales=move(self.scales),
            biases=move(self.biases),
            kbytes=move(self.kbytes),
            row_codes=rows,
        )

    def __repr__(self) -> str:
        how = f"layout={self.layout}" if self.layout else f"reference only ({self.unsupported})"
        return f"PackedWeight({self.fmt}, n={self.n}, k={self.k}, {self.dtype}, device={self.device}, {how})"


def _group_of(qt: QTensor) -> tuple[int | None, str | None]:
    """The scale group along K in elements (0 for one per row), or (None, why not)."""
    if qt.scales.shape[1] == 1:  # channel, tensor, or a group >= K
        return 0, None
    tc = qt.tile[1]
    if tc in (32, 64) or tc % TILE_K == 0:
        return tc, None
    return None, (
        f"{qt.fmt} with scale groups of {tc} along K: the Triton kernels take groups of "
        f"32, 64 or a multiple of {TILE_K}, or one scale per row"
    )


def _triton_layout(qt: QTensor, dtype: torch.dtype) -> tuple[Layout | None, str | None]:
    """The Triton layout for ``qt`` and activation ``dtype``, or (None, why not)."""
    spec = qt.spec
    n, k = qt.shape
    npad = -(-n // N_ALIGN) * N_ALIGN
    kpad = -(-k // TILE_K) * TILE_K
    if n * k >= 2**33:
        return None, f"a weight of {n * k} elements: the Triton kernels index codes with 32-bit offsets (< 2^33 elements)"
    if spec.family == "int" and spec.bits in (2, 4, 8):
        group, why = _group_of(qt)
        if why:
            return None, why
        return Layout("int", spec.bits, group, kpad, npad), None
    if qt.fmt == "mxfp4":
        e = qt.scales.view(torch.uint8)
        lo, hi = _MX_EXP_RANGE[dtype]
        if e.numel() and not bool(((e >= lo) & (e <= hi)).all()):
            return None, (
                f"mxfp4 block exponents outside [{lo}, {hi}] (a NaN block, or scales too large or small): "
                f"the Triton kernels multiply by 2^(E-127) in {dtype}; use backend='reference'"
            )
        return Layout("mx", 4, 32, kpad, npad), None
    if qt.fmt in ("mxfp8_e4m3", "mxfp8_e5m2"):
        if bool((qt.scales.view(torch.uint8) == 255).any()):
            return None, f"{qt.fmt} with a NaN block scale (E8M0 255): the Triton kernels cannot apply it; " \
                         "use backend='reference'"
        return Layout("mx", 8, 32, kpad, npad), None
    if spec.family == "fp8":
        group, why = _group_of(qt)
        if why:
            return None, why
        return Layout("fp8", 8, group, kpad, npad), None
    if qt.fmt == "nvfp4":
        sb = qt.scales.view(torch.uint8)
        if bool(((sb & 0x7F) == 0x7F).any()):
            return None, "nvfp4 with a NaN block scale: the Triton kernels cannot apply it; use backend='reference'"
        return Layout("nvfp4", 4, 16, kpad, npad), None
    return None, (
        f"format {qt.fmt}: the Triton weight-only kernels support {', '.join(TRITON_FORMATS)} "
        "(int with groups of 32, 64, a multiple of 128, or per channel) so far; use backend='reference'"
    )


# E8M0 exponents whose scale the kernels can apply: the kernel reads an e2m1
# code as a subnormal-based bf16/fp16 and multiplies by 2^(E-1) (bf16) or
# 2^(E-113) (fp16), which must be a finite number of that dtype
_MX_EXP_RANGE = {torch.bfloat16: (0, 128), torch.float16: (89, 128)}


def _pad2(t: torch.Tensor, rows: int, cols: int, value=0) -> torch.Tensor:
    """Pad a 2-D tensor to [rows, cols] with ``value`` (contiguous)."""
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = torch.full((rows, cols), value, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _words(p: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Unsigned patterns p [n, k] (uint8) -> words [kpad * bits / 32, npad] int32."""
    n, k = p.shape
    per_word = 32 // lay.bits
    r = lay.rows_per_tile
    p = torch.nn.functional.pad(p.to(torch.int64), (0, lay.kpad - k))
    p = p.reshape(n, lay.n_tiles, per_word, r)  # [n, t, j, r]: element t*128 + j*r + r'
    shifts = (torch.arange(per_word, device=p.device) * lay.bits).reshape(1, 1, per_word, 1)
    w = (p << shifts).sum(dim=2)  # [n, t, r], < 2^32
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return _pad2(w.reshape(n, -1).t(), lay.kpad * lay.bits // 32, lay.npad)


def _exponent_words(e: torch.Tensor, lay: Layout) -> torch.Tensor:
    """MX E8M0 exponents [n, groups] (uint8, groups of 32) -> int32 [n_tiles, npad]: byte j
    of word [t, n] is the exponent of K tile t's group j (padding: 127, the scale 1).
    One load per tile instead of four byte loads, each of which Triton moved through
    shared memory with two barriers in the GEMV."""
    n = e.shape[0]
    e = _pad2(e, n, lay.kpad // 32, value=127).to(torch.int64).reshape(n, lay.n_tiles, 4)
    w = (e << torch.tensor([0, 8, 16, 24], device=e.device)).sum(dim=2)  # [n, t], < 2^32
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    return _pad2(w.t(), lay.n_tiles, lay.npad, value=0x7F7F7F7F)


def mx_exponents(pw: "PackedWeight") -> torch.Tensor:
    """The E8M0 exponents [n, kpad / 32] (uint8) of an MX weight's exponent words."""
    w = pw.scales[:, : pw.n].t().to(torch.int64) & 0xFFFFFFFF  # [n, t]
    e = (w[:, :, None] >> torch.tensor([0, 8, 16, 24], device=w.device)) & 0xFF
    return e.reshape(pw.n, -1).to(torch.uint8)


def _rows(t: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """A per-tile tensor [Rt, Kt] expanded to one row per weight row [n, Kt]."""
    tr = qt.tile[0]
    return t.repeat_interleave(tr, dim=0)[: qt.shape[0]] if tr > 1 else t


def _int_scales(qt: QTensor, lay: Layout, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s = _rows(qt.scales, qt).float()
    if qt.options.get("symmetric", True):
        b = -float(1 << (lay.bits - 1)) * s
    else:
        b = -_rows(qt.zeros, qt).float() * s
    kdt = dtype if lay.bits <= 4 else torch.float32
    groups = 1 if lay.group == 0 else -(-lay.kpad // lay.group)
    return _pad2(s.to(kdt).t(), groups, lay.npad), _pad2(b.to(kdt).t(), groups, lay.npad)


def pack_weight(qt: QTensor, device=None, dtype: torch.dtype = torch.bfloat16) -> PackedWeight:
    """Pack the canonical QTensor of a weight [N, K] (blocked along K, axis 1)
    for ``weight_only_matmul`` with ``dtype`` activations (bf16 or fp16), on
    ``device`` (default: the QTensor's).

    Every format works with the reference backend; int4 and int8 (groups of 32,
    64 or a multiple of 128, or per channel; affine or symmetric) and mxfp4 also
    get the Triton layout.
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"pack_weight takes a lowbit QTensor, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"pack_weight needs a 2-D weight [N, K], got shape {list(qt.shape)}")
    if qt.axis != 1:
        raise ValueError(
            f"pack_weight needs a weight blocked along K (axis=1, the input features), got axis={qt.axis}; "
            "quantize the weight [N, K] with axis=-1"
        )
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"dtype={dtype}: the packed layout is made for bfloat16 or float16 activations")
    qt.validate()
    if device is not None:
        qt = qt.to(device)
    n, k = (int(s) for s in qt.shape)
    lay, why = _triton_layout(qt, dtype)
    if lay is None:
        return PackedWeight(qt.fmt, n, k, qt, dtype, unsupported=why)
    p = qt.unpacked_codes()
    if lay.family == "int" and qt.options.get("symmetric", True):
        p = p ^ (1 << (lay.bits - 1))
    codes = _words(p, lay)
    groups = 1 if lay.group == 0 else -(-lay.kpad // lay.group)
    if lay.family == "mx":
        scales, biases = _exponent_words(_rows(qt.scales.view(torch.uint8), qt), lay), None
    elif lay.family == "fp8":
        scales, biases = _pad2(_rows(qt.scales, qt).float().t(), groups, lay.npad), None
    elif lay.family == "nvfp4":
        from ..formats.elements import decode

        sb = decode(qt.scales.view(torch.uint8), "fp8_e4m3").float() * 2.0 ** NVFP4_SHIFT[dtype]  # exact
        scales = _pad2(sb.to(dtype).t(), groups, lay.npad)
        biases = (qt.global_scale.float() * 2.0**7).reshape(1).contiguous()  # the tensor scale, times 2^7
    else:
        scales, biases = _int_scales(qt, lay, dtype)
    rows = qt.codes if row_supported(lay) is None else None  # the same tensor, no copy
    return PackedWeight(qt.fmt, n, k, qt, dtype, codes, scales, biases, lay, row_codes=rows)


def row_supported(lay: Layout | None) -> str | None:
    """Why the one-token row GEMV (``_row_gemv_triton``) cannot take a weight of this
    layout (None if it can): 8-bit int or FP8 codes with one scale per row."""
    if lay is None:
        return "no Triton layout"
    if lay.bits != 8 or lay.family not in ("int", "fp8"):
        return f"{lay.family} {lay.bits}-bit codes: the row GEMV takes 8-bit int or FP8 codes"
    if lay.group != 0:
        return f"groups of {lay.group}: the row GEMV takes one scale per row (or per tensor)"
    return None


def has_f32_gemv(family: str, bits: int) -> bool:
    """Whether the float32 GEMV (``WeightOnlyConfig(int_f32=True)``) takes a layout of this
    family and bit width: 4- and 8-bit integer codes, FP8 and MXFP8."""
    return (family == "int" and bits in (4, 8)) or family == "fp8" or (family == "mx" and bits == 8)


def times_tensor_scale(pw: PackedWeight, s: torch.Tensor) -> PackedWeight:
    """An NVFP4 weight whose tensor scale (``biases``, float32 [1]) is multiplied by s
    (float32 [1] on the device: NVFP4 activations' tensor scale), the codes shared."""
    return replace(pw, biases=pw.biases * s)


def kmajor_supported(pw: PackedWeight) -> str | None:
    """Why the K-major kernel cannot take pw (None if it can): 4-bit ints with one
    scale per row or groups of a multiple of 128."""
    lay = pw.layout
    if lay is None:
        return f"{pw.fmt}: no Triton layout ({pw.unsupported})"
    if lay.family != "int" or lay.bits != 4:
        return f"{pw.fmt}: the K-major kernel takes 4-bit integer codes"
    if lay.group % TILE_K:  # 0 (one scale per row) passes
        return f"group {lay.group}: the K-major kernel takes one scale per row or groups of a multiple of 128"
    return None


def with_kmajor(pw: PackedWeight) -> PackedWeight:
    """pw plus ``kbytes``: its stored 4-bit codes K-major, byte i of row n holding
    elements 2i (low nibble) and 2i + 1 (high nibble), [npad, kpad / 2] uint8 (zero
    codes in the padding), made from the word layout on pw's device."""
    why = kmajor_supported(pw)
    if why:
        raise ValueError(why)
    p = _stored_patterns(pw, pw.layout.npad)
    kb = (p[:, 0::2] | (p[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return replace(pw, kbytes=kb)


def _stored_patterns(pw: PackedWeight, rows: int) -> torch.Tensor:
    """The words' codes as stored (biased when symmetric), [rows, kpad] int64 in
    element order: the inverse of ``_words`` for the first ``rows`` rows."""
    lay = pw.layout
    per_word = 32 // lay.bits
    w = pw.codes[:, :rows].t().to(torch.int64) & 0xFFFFFFFF  # [rows, t*r]
    w = w.reshape(rows, lay.n_tiles, 1, lay.rows_per_tile)
    shifts = (torch.arange(per_word, device=w.device) * lay.bits).reshape(1, 1, per_word, 1)
    return ((w >> shifts) & ((1 << lay.bits) - 1)).reshape(rows, lay.kpad)


def unpack_codes_from_layout(pw: PackedWeight) -> torch.Tensor:
    """The Triton layout's codes back as [n, k] canonical unsigned patterns
    (uint8): the inverse of the packing, for tests."""
    lay = pw.layout
    if lay is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported})")
    p = _stored_patterns(pw, pw.n)[:, : pw.k]
    if lay.family == "int" and pw.qtensor.options.get("symmetric", True):
        p = p ^ (1 << (lay.bits - 1))
    return p.to(torch.uint8)


def kernel_weight(pw: PackedWeight, rounded: bool = True) -> torch.Tensor:
    """The weight values [n, k] the Triton kernels multiply with, in pw.dtype,
    computed in torch from the packed layout: the kernels' numerics, for tests.

    4-bit ints: round(q * scale + bias) with scale and bias in pw.dtype and one
    rounding (a fused multiply-add in that dtype); 8-bit ints: round(fma(q,
    scale, bias)) in float32 then to pw.dtype; FP8 and MXFP8: the code's value
    times the scale rounded to float32, then to pw.dtype; MXFP4: the exact value.
    NVFP4: the matmul kernels multiply by e2m1 s_b 2^-7 exactly and the sums by
    the tensor scale 2^7 in float32: rounded=False gives e2m1 s_b s_t (float64),
    rounded=True what the dequantization kernel (backend "dequant") writes,
    round(float32(e2m1 s_b 2^-7) * float32(s_t 2^7)) in pw.dtype.
    rounded=False (ints, FP8, MXFP8): q * scale + bias (code * scale) unrounded, in
    float64: what the float32 GEMV (``WeightOnlyConfig(int_f32=True)``) multiplies with; for 4-bit
    codes that includes the GEMV's carry: positions 4..7 of a word (k % 128 >= 64)
    add scale * q(k - 64) / 65536 (see ``_dequant_ptx._f32_codes_asm``).
    """
    lay = pw.layout
    if lay is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported})")
    n, k = pw.n, pw.k
    q = unpack_codes_from_layout(pw).double()
    if lay.family == "int" and pw.qtensor.options.get("symmetric", True):
        q = (q.long() ^ (1 << (lay.bits - 1))).double()  # the stored (biased) code
    cols = torch.arange(k, device=q.device)
    g = torch.zeros_like(cols) if lay.group == 0 else cols // lay.group
    if lay.family != "int":
        from ..formats.elements import decode

        v = decode(unpack_codes_from_layout(pw), _ELEMENT[pw.fmt]).double()
        if lay.family == "mx":
            s = torch.exp2(mx_exponents(pw)[:, g].double() - 127)
        else:
            s = pw.scales[:, :n].t()[:, g].double()
        if lay.family == "nvfp4":
            w = v * s * 2.0 ** -(NVFP4_SHIFT[pw.dtype] + 7)  # e2m1 s_b 2^-7, exact
            w = w * pw.biases.double()  # times the tensor scale 2^7: once in float32 (below) or exact
            return w.float().to(pw.dtype) if rounded else w
        if lay.bits == 8:  # one float32 rounding of the product, then the cast (the float32 GEMV: none)
            return (v * s).float().to(pw.dtype) if rounded else v * s
        return (v * s).to(pw.dtype)  # mxfp4: exact
    s = pw.scales[:, :n].t()[:, g].double()
    b = pw.biases[:, :n].t()[:, g].double()
    w = q * s + b  # exact in float64
    if not rounded:
        if lay.bits == 4:
            hi = (cols % 128) >= 64
            carry = torch.zeros_like(q)
            carry[:, hi] = q[:, cols[hi] - 64] / 65536
            w = w + carry * s
        return w
    if lay.bits == 8:
        w = w.float()  # one rounding (fma in float32), then to the dtype
    return w.to(torch.float32).to(pw.dtype)
