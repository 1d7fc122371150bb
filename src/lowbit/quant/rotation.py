"""Block-wise Hadamard rotation of the input space of a linear layer.

y = x W^T = (x R)(W R)^T for any orthogonal R. With R block-diagonal of normalised
Hadamard matrices H_b / sqrt(b) along K, the weight is quantized as W R (outliers
spread over each block of b input channels, so a block's shared scale fits its
values better: what makes MXFP4 close the gap to NVFP4), and the activations are
rotated online, x -> x R, in the layer's forward before any activation quantization.

Layout of R for K input features and block b: K // b full blocks H_b, then the tail
of K % b features split greedily into powers of two (e.g. K = 576, b = 128: four
H_128 then one H_64; a tail of 1 is left as is). R is orthogonal and symmetric, so
R^T = R and rotating twice is the identity.

H_n is Sylvester's construction (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]]):
H_n[i, j] = (-1)^popcount(i & j).
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["hadamard", "rotation_blocks", "rotate", "rotate_weight", "rotation_matrix"]


@lru_cache(maxsize=None)
def _hadamard64(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / (n ** 0.5)


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalised n x n Sylvester Hadamard matrix (orthogonal, symmetric)."""
    return _hadamard64(n).to(dtype=dtype, device=device)


def rotation_blocks(k: int, block: int) -> list[tuple[int, int]]:
    """(start, size) of the Hadamard blocks along K (see the module docstring)."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"the rotation block must be a power of two, got {block}")
    out = [(s, block) for s in range(0, k - k % block, block)]
    start, rest = k - k % block, k % block
    while rest > 1:
        size = 1 << (rest.bit_length() - 1)
        out.append((start, size))
        start, rest = start + size, rest - size
    return out


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x R along the last dimension (a new tensor, x's dtype; arithmetic in x's dtype,
    float32 for half-precision inputs on the CPU)."""
    k = x.shape[-1]
    spans = rotation_blocks(k, block)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" else x
    out = work.clone()
    full = k // block
    if full:
        h = hadamard(block, work.dtype, x.device)
        head = work[..., : full * block].reshape(*x.shape[:-1], full, block)
        out[..., : full * block] = (head @ h).reshape(*x.shape[:-1], full * block)
    for start, size in spans[full:]:
        out[..., start:start + size] = work[..., start:start + size] @ hadamard(size, work.dtype, x.device)
    return out.to(x.dtype)


def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """W R for a weight [out, in] (float32 result; computed in float64 for accuracy)."""
    return rotate(w.detach().double(), block).float()


def rotation_matrix(k: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """R itself, K x K (for tests and for transforming a Hessian: R^T H R)."""
    return rotate(torch.eye(k, dtype=dtype), block)
