"""OCP Microscaling (MX v1.0): blocks of 32 along K sharing one E8M0 scale."""

from __future__ import annotations

import torch

from . import elements, tiles

BLOCK = 32
SCALE_RULES = ("floor", "ceil")
E8M0_NAN = 255


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact 2**e in float64 for integer e."""
    return elements.pow2(e, torch.float64)


def shared_exponent(amax: torch.Tensor, elem: elements.ElementFormat, rule: str) -> torch.Tensor:
    """Block amax (float32, finite) -> the scale exponent E, clamped to [-127, 127]."""
    if rule not in SCALE_RULES:
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {rule!r}")
    a = amax.to(torch.float64)
    if rule == "floor":
        _, ex = torch.frexp(a)  # a = m * 2**ex, m in [0.5, 1): floor(log2 a) = ex - 1
        e = ex.to(torch.int64) - 1 - elem.emax
    else:
        # smallest E with 2**E * max_elem >= amax; the float estimate is off by at most one
        e = torch.ceil(torch.log2(a / elem.max)).nan_to_num(0, posinf=0, neginf=0).to(torch.int64)
        e = torch.where(pow2(e) * elem.max < a, e + 1, e)
        e = torch.where(pow2(e - 1) * elem.max >= a, e - 1, e)
    e = torch.where(a > 0, e, torch.full_like(e, -127))
    return e.clamp(-127, 127)


def quantize(
    x: torch.Tensor, elem: elements.ElementFormat, rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [R, K] -> (grid values float32 [R, K], E8M0 scales uint8 [R, ceil(K/32)])."""
    r, k = x.shape
    tile = (1, BLOCK)
    bad = tiles.tile_any(~torch.isfinite(x), tile)
    amax = tiles.tile_amax(torch.where(torch.isfinite(x), x, torch.zeros_like(x)), tile)
    e = shared_exponent(amax, elem, rule)
    bad_elems = tiles.expand(bad, tile, r, k)
    scaled = elements.scale_pow2(x, -tiles.expand(e, tile, r, k))  # exact (float32)
    scaled = torch.where(bad_elems, torch.zeros_like(scaled), scaled)
    values = elements.round_to_grid(scaled, elem)
    scales = torch.where(bad, torch.full_like(e, E8M0_NAN), e + 127).to(torch.uint8)
    return values, scales


def dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    r, k = values.shape
    s = tiles.expand(scales, (1, BLOCK), r, k)
    x = elements.scale_pow2(values, s.to(torch.int32) - 127)
    return torch.where(s == E8M0_NAN, torch.full_like(x, float("nan")), x)
