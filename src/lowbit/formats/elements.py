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


@lru_cache(maxsize=None)
def _positive_grid(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted finite non-negative values and their codes (+0 is code 0)."""
    table = _table(name)
    finite = torch.isfinite(table) & (table >= 0)
    if not ELEMENTS[name].is_float:
        finite &= table <= ELEMENTS[name].max  # code -128 (= -2) is decode-only
    codes = torch.nonzero(finite).flatten()
    values = table[codes]
    order = torch.argsort(values, stable=True)  # +0 (code 0) sorts first
    return values[order], codes[order]


def decode(codes: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Unsigned codes (any integer dtype) -> float32 values."""
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    table = _table(e.name).to(device=codes.device, dtype=torch.float32)
    idx = codes.to(torch.int64) & ((1 << e.bits) - 1)
    return table[idx]


def round_to_grid(x: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Round float values onto the element's grid (RNE, saturating), in float64.

    NaN stays NaN. Exact: x is rescaled only by powers of two.
    """
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    x = x.to(torch.float64)
    a = x.abs().clamp(max=e.max)  # saturate first (Inf too), as FORMATS.md says
    if e.is_float:
        emin = 1 - e.bias
        # exponent of a's binade, floored at the subnormal binade
        _, exp = torch.frexp(a)
        binade = torch.clamp(exp.to(torch.int64) - 1, min=emin)
        quantum = torch.pow(2.0, (binade - e.mbits).to(torch.float64))
    else:
        quantum = torch.full_like(a, 1 / 64)
    r = torch.round(a / quantum) * quantum  # torch.round: half to even
    r = torch.clamp(r, max=e.max)
    return torch.copysign(r, x)


def encode(x: torch.Tensor, elem: ElementFormat | str) -> torch.Tensor:
    """Float values -> uint8 codes, round to nearest even, saturating.

    NaN maps to the NaN code where the element has one; otherwise it is an error.
    """
    e = ELEMENTS[elem] if isinstance(elem, str) else elem
    nan = torch.isnan(x)
    if not e.has_nan and bool(nan.any()):
        raise ValueError(
            f"{e.name} has no NaN code but the input holds {int(nan.sum())} NaN value(s); "
            "clean the input first (torch.nan_to_num)"
        )
    r = round_to_grid(x, e)
    values, codes = (t.to(x.device) for t in _positive_grid(e.name))
    a = r.abs().nan_to_num(0.0)
    idx = torch.searchsorted(values, a.contiguous())
    code = codes[idx.clamp(max=values.numel() - 1)]
    negative = torch.signbit(r)
    sign_bit = 1 << (e.bits - 1)
    if e.is_float:
        code = torch.where(negative, code | sign_bit, code)
    else:  # two's complement
        code = torch.where(negative & (code != 0), (1 << e.bits) - code, code)
    if e.has_nan:
        nan_code = 0x7F
        code = torch.where(nan, torch.full_like(code, nan_code), code)
    return code.to(torch.uint8)
