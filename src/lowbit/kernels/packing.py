"""Kernel-private packing of a quantized weight for the weight-only matmul.

``pack_weight(qt)`` turns a canonical QTensor of a weight [N, K] (blocked along
K, docs/formats.md) into a ``PackedWeight``: the canonical QTensor (kept for the
reference path and for re-packing) plus, where the Triton kernels support the
format, the tensors in the layout those kernels read. That layout is made at
load time and never saved.

The Triton layout (``Layout`` describes it):

- K is cut into sub-blocks of ``ks`` elements (the scale group, at most 128; 128
  for one scale per row) and padded with zero codes to ``kpad``, a multiple of
  ``ks``; N is padded with zero codes and zero scales to ``npad``, a multiple of
  ``N_ALIGN`` (the largest BLOCK_N), so that the kernels load whole, aligned
  tiles without masks.
- Codes are stored transposed, K-major rows of N: ``codes[kp, n]``, so a load of
  a K-slice of a BLOCK_N tile is contiguous along N. Codes are unsigned: a
  symmetric int code q is stored as q + 2^(b-1) (its pattern with the top bit
  flipped), so that the kernel turns every code into a float with one OR and
  one subtraction. 8-bit codes: one per byte, ``codes`` is [kpad, npad] uint8.
- 4-bit codes: two per byte, split by halves of each sub-block: byte row
  ``j * ks/2 + r`` holds element ``k = j*ks + r`` in its low nibble and
  ``k = j*ks + ks/2 + r`` in its high nibble (r < ks/2). The kernel then
  dequantizes two contiguous halves of a sub-block and issues one dot for each,
  with no interleaving of nibbles. ``codes`` is [kpad/2, npad] uint8.
- Scales (and zeros) are transposed too: [groups, npad], one row per scale
  group along K, in their stored dtype (float32, bfloat16 or float16 for ints:
  the kernel computes (q - z) * s in float32 exactly as the reference; uint8
  E8M0 exponents for MXFP4). A scale tile that covers several rows (tensor or
  block granularity) is expanded to one scale per row; the values are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..formats import QTensor

N_ALIGN = 256  # npad is a multiple of this: every BLOCK_N up to 256 tiles it
MAX_KS = 128  # largest K sub-block: one scale row per sub-block at most

TRITON_FORMATS = ("int4", "int8", "mxfp4")


@dataclass(frozen=True)
class Layout:
    """How the Triton kernels read a PackedWeight (see the module docstring)."""

    family: str  # "int" | "mx"
    bits: int  # 4 or 8
    symmetric: bool  # int: no zero point; codes stored biased by 2^(bits-1)
    has_zeros: bool
    per_channel: bool  # one scale row for all of K
    ks: int  # K sub-block in elements (a scale group, or 128 for per-channel)
    subs_per_group: int  # sub-blocks per scale group (1 unless the group is a multiple of 128)
    kpad: int  # K padded to a multiple of ks
    npad: int  # N padded to a multiple of N_ALIGN

    @property
    def n_sub(self) -> int:
        """Number of K sub-blocks."""
        return self.kpad // self.ks

    @property
    def rows_per_sub(self) -> int:
        """Rows of ``codes`` per K sub-block."""
        return self.ks // 2 if self.bits == 4 else self.ks


@dataclass(frozen=True, eq=False, repr=False)
class PackedWeight:
    """A weight [n, k] ready for ``weight_only_matmul``.

    ``qtensor`` is the canonical weight; ``codes``, ``scales`` and ``zeros`` are
    the Triton layout (None where the Triton kernels do not support the format,
    ``unsupported`` then says why).
    """

    fmt: str
    n: int
    k: int
    qtensor: QTensor
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    layout: Layout | None = None
    unsupported: str | None = None

    @property
    def device(self) -> torch.device:
        return self.qtensor.device

    @property
    def triton_supported(self) -> bool:
        return self.layout is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the packed (kernel) tensors."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros) if t is not None)

    def to(self, device) -> "PackedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            qtensor=self.qtensor.to(device),
            codes=move(self.codes),
            scales=move(self.scales),
            zeros=move(self.zeros),
        )

    def __repr__(self) -> str:
        how = f"layout={self.layout}" if self.layout else f"reference only ({self.unsupported})"
        return f"PackedWeight({self.fmt}, n={self.n}, k={self.k}, device={self.device}, {how})"


def _triton_layout(qt: QTensor) -> tuple[Layout | None, str | None]:
    """The Triton layout for ``qt``, or (None, why not)."""
    spec = qt.spec
    n, k = qt.shape
    npad = -(-n // N_ALIGN) * N_ALIGN
    if spec.family == "int" and spec.bits in (4, 8):
        symmetric = bool(qt.options.get("symmetric", True))
        tc = qt.tile[1]
        per_channel = qt.scales.shape[1] == 1  # one scale column: channel, tensor, or a group >= K
        if per_channel:
            ks, spg = MAX_KS, 1
        elif tc in (32, 64, 128):
            ks, spg = tc, 1
        elif tc % MAX_KS == 0:
            ks, spg = MAX_KS, tc // MAX_KS
        else:
            return None, (
                f"{qt.fmt} with scale groups of {tc} along K: the Triton kernels take groups of "
                "32, 64, 128 or a multiple of 128, or one scale per row"
            )
        kpad = -(-k // ks) * ks
        return Layout("int", spec.bits, symmetric, not symmetric, per_channel, ks, spg, kpad, npad), None
    if qt.fmt == "mxfp4":
        ks = 32
        kpad = -(-k // ks) * ks
        return Layout("mx", 4, False, False, False, ks, 1, kpad, npad), None
    return None, (
        f"format {qt.fmt}: the Triton weight-only kernels support {', '.join(TRITON_FORMATS)} "
        "(int with groups of 32/64/128 or per channel) so far; use backend='reference'"
    )


def _pad2(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor to [rows, cols] (contiguous)."""
    if tuple(t.shape) == (rows, cols):
        return t.contiguous()
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _pack_codes(qt: QTensor, lay: Layout) -> torch.Tensor:
    n, k = qt.shape
    bias = 1 << (lay.bits - 1) if lay.family == "int" and lay.symmetric else 0
    if lay.bits == 8:
        c = qt.codes.view(torch.uint8) ^ bias  # [n, k]: one code per byte
        return _pad2(c.t(), lay.kpad, lay.npad)
    p = qt.unpacked_codes() ^ bias  # [n, k] uint8 4-bit patterns
    p = torch.nn.functional.pad(p, (0, lay.kpad - k))
    p = p.reshape(n, lay.n_sub, 2, lay.ks // 2)
    b = p[:, :, 0, :] | (p[:, :, 1, :] << 4)  # low nibble: first half, high: second half
    return _pad2(b.reshape(n, lay.kpad // 2).t(), lay.kpad // 2, lay.npad)


def _pack_scales(t: torch.Tensor, qt: QTensor, lay: Layout) -> torch.Tensor:
    n = qt.shape[0]
    tr = qt.tile[0]
    if tr > 1:  # tensor or block granularity: one scale per row (same values)
        t = t.repeat_interleave(tr, dim=0)[:n]
    return _pad2(t.t(), t.shape[1], lay.npad)


def pack_weight(qt: QTensor, device=None) -> PackedWeight:
    """Pack the canonical QTensor of a weight [N, K] (blocked along K, axis 1)
    for ``weight_only_matmul``, on ``device`` (default: the QTensor's).

    Every format works with the reference backend; int4, int8 (groups of
    32/64/128 or a multiple of 128, per channel; affine or symmetric) and mxfp4
    also get the Triton layout.
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
    qt.validate()
    if device is not None:
        qt = qt.to(device)
    n, k = (int(s) for s in qt.shape)
    lay, why = _triton_layout(qt)
    if lay is None:
        return PackedWeight(qt.fmt, n, k, qt, unsupported=why)
    codes = _pack_codes(qt, lay)
    if lay.family == "mx":
        scales = _pack_scales(qt.scales.view(torch.uint8), qt, lay)
    else:
        scales = _pack_scales(qt.scales, qt, lay)
    zeros = _pack_scales(qt.zeros, qt, lay) if lay.has_zeros else None
    return PackedWeight(qt.fmt, n, k, qt, codes, scales, zeros, lay)


def unpack_codes_from_layout(pw: PackedWeight) -> torch.Tensor:
    """The Triton layout's codes back as [n, k] unsigned patterns (uint8): the
    inverse of the packing, for tests."""
    lay = pw.layout
    if lay is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported})")
    bias = 1 << (lay.bits - 1) if lay.family == "int" and lay.symmetric else 0
    c = pw.codes[:, : pw.n].t().contiguous()  # [n, kpad or kpad/2] uint8
    if lay.bits == 8:
        return c[:, : pw.k] ^ bias
    c = c.reshape(pw.n, lay.n_sub, 1, lay.ks // 2).to(torch.int32)
    p = torch.cat([c & 15, c >> 4], dim=2).reshape(pw.n, lay.kpad)
    return (p[:, : pw.k] ^ bias).to(torch.uint8)
