"""NVFP4: E2M1 elements, one E4M3 scale per 16 along K, one FP32 scale per tensor."""

from __future__ import annotations

import torch

from . import elements, tiles

BLOCK = 16
E2M1 = elements.ELEMENTS["fp4_e2m1"]
E4M3 = elements.ELEMENTS["fp8_e4m3"]


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [R, K], finite -> (grid values [R, K], E4M3 codes [R, ceil(K/16)], s_t fp32 scalar).

    All arithmetic in float32, in this order: s_t = amax / (6 * 448);
    s_b = E4M3(amax_block / (6 * s_t)); elements E2M1(x / (s_b * s_t)).
    """
    r, k = x.shape
    tile = (1, BLOCK)
    amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    s_t = tiles.divide(amax.to(torch.float32), E2M1.max * E4M3.max)
    block_amax = tiles.tile_amax(x, tile)
    six_s_t = torch.tensor(E2M1.max, dtype=torch.float32, device=x.device) * s_t
    nonzero = six_s_t > 0  # an all-zero tensor has s_t = 0: every block scale is 0
    ratio = torch.where(nonzero, block_amax / torch.where(nonzero, six_s_t, 1.0), 0.0)
    scale_codes = elements.encode(ratio, E4M3)
    s_b = elements.decode(scale_codes, E4M3)
    denom = tiles.expand(s_b * s_t, tile, r, k)
    ok = denom > 0
    values = elements.round_to_grid(torch.where(ok, x / torch.where(ok, denom, 1.0), 0.0), E2M1)
    return values, scale_codes, s_t.reshape(())


def dequantize(values: torch.Tensor, scale_codes: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    r, k = values.shape
    s_b = tiles.expand(elements.decode(scale_codes, E4M3), (1, BLOCK), r, k)
    return (values * s_b) * global_scale.to(torch.float32)
