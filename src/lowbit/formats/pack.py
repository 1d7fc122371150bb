"""Bit packing along K: one little-endian bit-stream rule for every width.

Element j occupies stream bits [j*w, (j+1)*w); byte b holds stream bits
[8b, 8b+8), least significant first. 4-bit: even k in the low nibble; 6-bit:
four codes in three bytes; 3-bit: eight codes in three bytes.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 6, 8)


def chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole chunk of the stream."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths: {SUPPORTED_BITS}")
    n_bits = bits * 8 // math.gcd(bits, 8)  # lcm(bits, 8)
    return n_bits // bits, n_bits // 8


def packed_size(k: int, bits: int) -> int:
    codes, nbytes = chunk(bits)
    return -(-k // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., K] unsigned b-bit patterns (any integer dtype) -> uint8 [..., packed_size(K)]."""
    n_codes, n_bytes = chunk(bits)
    k = codes.shape[-1]
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    pad = -k % n_codes
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], (k + pad) // n_codes, n_codes)
    shifts = torch.arange(n_codes, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # at most 24 bits: exact in int64
    byte_shifts = torch.arange(n_bytes, device=c.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], (k + pad) // n_codes * n_bytes).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 [..., packed_size(K)] -> uint8 [..., K] unsigned b-bit patterns."""
    n_codes, n_bytes = chunk(bits)
    if packed.shape[-1] != packed_size(k, bits):
        raise ValueError(
            f"packed last dimension {packed.shape[-1]} does not hold K={k} {bits}-bit codes "
            f"(expected {packed_size(k, bits)} bytes)"
        )
    n_chunks = packed.shape[-1] // n_bytes
    b = packed.to(torch.int64).reshape(*packed.shape[:-1], n_chunks, n_bytes)
    byte_shifts = torch.arange(n_bytes, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(n_codes, device=b.device, dtype=torch.int64) * bits
    c = (word >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*packed.shape[:-1], n_chunks * n_codes)[..., :k]
    return c.to(torch.uint8)
