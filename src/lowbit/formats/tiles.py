"""Scale tiles over the 2-D view [R, K] of a tensor.

Every scale covers one tile (tr, tc). Partial tiles at the end of R or K are
padded by repeating the last real row/column, so min, max and amax are those of
the real elements; the padding never reaches the output.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "channel", "token", "group", "block")


def grid(r: int, k: int, tile: tuple[int, int]) -> tuple[int, int]:
    return -(-r // tile[0]), -(-k // tile[1])


def resolve_tile(
    granularity: str, group_size: int | None, block_shape, r: int, k: int, ndim: int
) -> tuple[int, int]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "tensor":
        return max(r, 1), k
    if granularity in ("channel", "token"):
        return 1, k
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        return 1, group_size
    if ndim != 2:
        raise ValueError(
            f"granularity='block' needs a 2-D tensor, got {ndim}-D; reshape it to [rows, K] first"
        )
    br, bc = block_shape
    if br <= 0 or bc <= 0:
        raise ValueError(f"block_shape must be positive, got {block_shape!r}")
    return int(br), int(bc)


def tiled(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """[R, K] -> [Rt, tr, Kt, tc], partial tiles padded by edge replication."""
    r, k = x.shape
    tr, tc = tile
    pad_k = -k % tc
    if pad_k:
        x = torch.cat([x, x[:, -1:].expand(r, pad_k)], dim=1)
    pad_r = -r % tr
    if pad_r and r:
        x = torch.cat([x, x[-1:, :].expand(pad_r, x.shape[1])], dim=0)
    rt, kt = grid(r, k, tile)
    return x.reshape(rt, tr, kt, tc)


def tile_amax(x: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    return tiled(x, tile).abs().amax(dim=(1, 3))


def tile_min_max(x: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    t = tiled(x, tile)
    return t.amin(dim=(1, 3)), t.amax(dim=(1, 3))


def tile_any(mask: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    return tiled(mask.to(torch.uint8), tile).amax(dim=(1, 3)).bool()


def expand(per_tile: torch.Tensor, tile: tuple[int, int], r: int, k: int) -> torch.Tensor:
    """[Rt, Kt] -> [R, K], each tile's value repeated over its elements."""
    rt, kt = per_tile.shape
    if tile[0] == 1 and kt == 1:  # one scale per row: a broadcast view, no copy
        return per_tile[:r].expand(r, k)
    out = per_tile[:, None, :, None].expand(rt, tile[0], kt, tile[1]).reshape(rt * tile[0], kt * tile[1])
    return out[:r, :k]


def divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b, correctly rounded on every device.

    On CUDA, dividing by a Python scalar multiplies by its reciprocal (rounded
    first), which can differ from the CPU in the last bit; a tensor divisor
    takes the true-division path everywhere.
    """
    return a / torch.full_like(a, b)
