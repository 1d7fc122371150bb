"""Element formats: the minifloats (FP8, FP6, FP4) and MXINT8's fixed point.

Codes are unsigned bit patterns (sign in the top bit). ``encode`` rounds to
nearest, ties to even, and saturates (Inf too); ``decode`` is a table lookup.
The tables are built from the bit layout here and checked in the tests against
ml_dtypes, an independent implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class ElementFormat:
    name: str
    bits: int
    ebits: int  # exponent bits (0 for the fixed-point MXINT8 element)
    mbits: int  # mantissa bits
    bias: int
    max: float  # largest finite magnitude
    emax: int  # exponent of the largest binade (OCP's emax_elem)
    has_inf: bool
    has_nan: bool

    @property
    def is_float(self) -> bool:
        return self.ebits > 0


ELEMENTS: dict[str, ElementFormat] = {
    e.name: e
    for e in (
        ElementFormat("fp8_e4m3", 8, 4, 3, 7, 448.0, 8, has_inf=False, has_nan=True),
        ElementFormat("fp8_e5m2", 8, 5, 2, 15, 57344.0, 15, has_inf=True, has_nan=True),
        ElementFormat("fp6_e3m2", 6, 3, 2, 3, 28.0, 4, has_inf=False, has_nan=False),
        ElementFormat("fp6_e2m3", 6, 2, 3, 1, 7.5, 2, has_inf=False, has_nan=False),
        ElementFormat("fp4_e2m1", 4, 2, 1, 1, 6.0, 2, has_inf=False, has_nan=False),
        ElementFormat("mxint8", 8, 0, 6, 0, 127 / 64, 0, has_inf=False, has_nan=False),
    )
}


def _decode_code(code: int, e: ElementFormat) -> float:
    sign_bit = 1 << (e.bits - 1)
    if not e.is_float:  # two's complement k / 64
        k = code - (1 << e.bits) if code & sign_bit else code
        return k / 64
    sign = -1.0 if code & sign_bit else 1.0
    exp = (code >> e.mbits) & ((1 << e.ebits) - 1)
    man = code & ((1 << e.mbits) - 1)
    if e.name == "fp8_e4m3" and exp == 15 and man == 7:
        return math.nan
    if e.name == "fp8_e5m2" and exp == 31:
        return sign * math.inf if man == 0 else math.nan
    if exp == 0:  # subnormal
        return sign * man * 2.0 ** (1 - e.bias - e.mbits)
    return sign * (1 + man / (1 << e.mbits)) * 2.0 ** (exp - e.bias)


@lru_cache(maxsize=None)
def _table(name: str) -> torch.Tensor:
    e = ELEMENTS[name]
    return torch.tensor([_decode_code(c, e) for c in range(1 << e.bits)], dtype=torch.float64)


def decode(codes: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Unsigned codes (any integer dtype) -> float32 values."""
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    table = _table(e.name).to(device=codes.device, dtype=torch.float32)
    idx = codes.to(torch.int64) & ((1 << e.bits) - 1)
    return table[idx]


def pow2(exp: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact 2**exp built from the bits, for integer exp in the dtype's normal range."""
    if dtype == torch.float64:
        return ((exp.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((exp.to(torch.int32) + 127) << 23).view(torch.float32)


def scale_pow2(x: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """x * 2**exp for integer exp in [-254, 254], exact unless the result is subnormal.

    Two steps keep each factor a normal float32 power of two.
    """
    half = torch.div(exp, 2, rounding_mode="floor")
    return x * pow2(half, x.dtype) * pow2(exp - half, x.dtype)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def _round_bits(a: torch.Tensor, e: ElementFormat) -> torch.Tensor:
    """Non-negative float32 a (<= e.max, no NaN) -> nearest grid value, ties to even.

    Normal range: round the float32 mantissa to e.mbits bits with the integer
    round-half-even trick. Below 2**emin (the element's subnormals): adding and
    subtracting C, whose ulp is the subnormal spacing, lets the FPU round.
    """
    shift = 23 - e.mbits
    u = a.view(torch.int32)
    lsb = (u >> shift) & 1
    normal = ((u + ((1 << (shift - 1)) - 1) + lsb) & ~((1 << shift) - 1)).view(torch.float32)
    emin = 1 - e.bias
    c = 2.0 ** (emin - e.mbits + 23)
    sub = (a + c) - c
    return torch.where(a < 2.0**emin, sub, normal)


def round_to_grid(x: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Round onto the element's grid (RNE, saturating), in float32 (float64 for float64 input).

    NaN stays NaN. Exact: no arithmetic rounds except the one onto the grid.
    """
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    x = _work(x)
    a = x.abs().clamp(max=e.max)  # saturate first (Inf too), as FORMATS.md says
    if not e.is_float:
        r = torch.round(a * 64) / 64
    elif x.dtype == torch.float32:
        r = _round_bits(a.nan_to_num(0.0), e)
    else:
        _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1)
        binade = torch.clamp(exp - 1, min=1 - e.bias)  # floored at the subnormal binade
        step = binade - e.mbits  # log2 of the grid spacing
        r = torch.round(a * pow2(-step, a.dtype)) * pow2(step, a.dtype)  # torch.round: half to even
    r = torch.clamp(r, max=e.max)
    r = torch.copysign(r, x)
    return torch.where(torch.isnan(x), x, r) if e.has_nan else r


def encode(x: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Float values -> uint8 codes, round to nearest even, saturating.

    NaN maps to the NaN code where the element has one; otherwise it is an error.
    """
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    if not e.has_nan:
        nan = torch.isnan(x)
        if bool(nan.any()):
            raise ValueError(
                f"{e.name} has no NaN code but the input holds {int(nan.sum())} NaN value(s); "
                "clean the input first (torch.nan_to_num)"
            )
    return grid_to_codes(round_to_grid(x, e), e)


def grid_to_codes(r: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Values already on the element's grid (round_to_grid's output) -> uint8 codes."""
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    r = r.to(torch.float32)  # grid values are exact in float32
    nan = torch.isnan(r)
    a = r.abs().nan_to_num(0.0)
    if e.is_float:
        emin = 1 - e.bias
        u = a.view(torch.int32)
        normal = (((u >> 23) - 127 + e.bias) << e.mbits) | ((u >> (23 - e.mbits)) & ((1 << e.mbits) - 1))
        subnormal = (a * 2.0 ** (e.mbits - emin)).to(torch.int32)
        code = torch.where(a < 2.0**emin, subnormal, normal)
        code = torch.where(torch.signbit(r), code | (1 << (e.bits - 1)), code)
    else:  # two's complement k / 64
        code = (r.nan_to_num(0.0) * 64).to(torch.int32) & 0xFF
    if e.has_nan:
        code = torch.where(nan, torch.full_like(code, 0x7F), code)
    return code.to(torch.uint8)
