"""Integer formats with software scales: b in {8, 4, 3, 2}, affine or symmetric."""

from __future__ import annotations

import torch

from . import tiles


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def quantize(
    x: torch.Tensor,
    bits: int,
    tile: tuple[int, int],
    symmetric: bool,
    zero_point: str,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x float32 [R, K] -> (q int64 [R, K], scales [Rt, Kt], zeros [Rt, Kt] or None).

    q and the stored scale/zero are consistent: q is computed with the scale and
    zero as stored (rounded to scale_dtype), so dequantize gives (q - z) * s.
    """
    r, k = x.shape
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        amax = tiles.tile_amax(x, tile)
        s = torch.where(amax > 0, tiles.divide(amax, qmax), torch.ones_like(amax))
        s = s.to(scale_dtype).float()
        s = torch.where(s > 0, s, torch.ones_like(s))  # a scale that underflowed scale_dtype
        q = torch.round(x / tiles.expand(s, tile, r, k)).clamp(qmin, qmax)
        return q.to(torch.int64), s.to(scale_dtype), None
    lo, hi = tiles.tile_min_max(x, tile)
    s = tiles.divide(hi - lo, qmax)
    s = torch.where(s > 0, s, torch.ones_like(s))  # constant tile: s = 1, z = -min
    s = s.to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = -lo / s
    if zero_point == "integer":
        z = torch.round(z)
    z = z.to(scale_dtype).float()
    q = torch.round(x / tiles.expand(s, tile, r, k) + tiles.expand(z, tile, r, k)).clamp(qmin, qmax)
    return q.to(torch.int64), s.to(scale_dtype), z.to(scale_dtype)


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, tile: tuple[int, int]
) -> torch.Tensor:
    r, k = q.shape
    s = tiles.expand(scales.float(), tile, r, k)
    if zeros is None:
        return q.float() * s
    return (q.float() - tiles.expand(zeros.float(), tile, r, k)) * s


def to_patterns(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed or unsigned integers -> unsigned b-bit two's complement patterns."""
    return q & ((1 << bits) - 1)


def from_patterns(p: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    p = p.to(torch.int64)
    if symmetric:
        p = torch.where(p >= 2 ** (bits - 1), p - 2**bits, p)
    return p
