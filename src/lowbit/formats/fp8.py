"""FP8 (E4M3, E5M2) with software scales: per tensor, channel, token, group or block."""

from __future__ import annotations

import torch

from . import elements, tiles


def quantize(
    x: torch.Tensor, elem: elements.ElementFormat, tile: tuple[int, int], scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [R, K] -> (grid values float32 [R, K], scales [Rt, Kt]); s = amax / max_elem."""
    r, k = x.shape
    amax = tiles.tile_amax(x, tile)
    s = torch.where(amax > 0, tiles.divide(amax, elem.max), torch.ones_like(amax))
    s = s.to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    values = elements.round_to_grid(x / tiles.expand(s, tile, r, k), elem)
    return values, s.to(scale_dtype)


def dequantize(values: torch.Tensor, scales: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    r, k = values.shape
    return values * tiles.expand(scales.float(), tile, r, k)
