"""Format names -> specs: what each element format is and which options it takes."""

from __future__ import annotations

from dataclasses import dataclass

from .elements import ELEMENTS, ElementFormat

COMMON_OPTIONS = frozenset({"axis"})
SCALED_OPTIONS = COMMON_OPTIONS | {"granularity", "group_size", "block_shape", "scale_dtype"}


@dataclass(frozen=True)
class FormatSpec:
    name: str
    family: str  # "int" | "fp8" | "mx" | "nvfp4"
    bits: int  # bits per element code
    element: ElementFormat | None  # None for plain integers
    options: frozenset[str]
    block: str  # human description of the scale block or group
    scale: str  # human description of the scale format
    # effective bits per weight of a [4096, 4096] weight with default options and
    # 16-bit software scales (the storage a serving kernel uses)
    reference_bits: float
    description: str


def _int(bits: int) -> FormatSpec:
    per_channel = bits == 8
    return FormatSpec(
        name=f"int{bits}",
        family="int",
        bits=bits,
        element=None,
        options=SCALED_OPTIONS | {"symmetric", "zero_point"},
        block="per channel" if per_channel else "group 128",
        scale="fp scale" if per_channel else "fp scale + zero",
        reference_bits=bits + 16 / 4096 if per_channel else bits + 32 / 128,
        description=(
            "8-bit integer, symmetric, per output channel"
            if per_channel
            else f"{bits}-bit integer, affine (HQQ float zero), group 128 along K"
        ),
    )


def _fp8(elem: str) -> FormatSpec:
    return FormatSpec(
        name=elem,
        family="fp8",
        bits=8,
        element=ELEMENTS[elem],
        options=SCALED_OPTIONS,
        block="per channel",
        scale="fp scale",
        reference_bits=8 + 16 / 4096,
        description=f"FP8 {elem[4:].upper()} with a software scale amax/{ELEMENTS[elem].max:g}",
    )


def _mx(name: str, elem: str) -> FormatSpec:
    e = ELEMENTS[elem]
    return FormatSpec(
        name=name,
        family="mx",
        bits=e.bits,
        element=e,
        options=COMMON_OPTIONS | {"scale_rule"},
        block="block 32",
        scale="E8M0",
        reference_bits=e.bits + 8 / 32,
        description=f"OCP MX: {elem} elements, one power-of-two scale per 32",
    )


FORMATS: dict[str, FormatSpec] = {
    s.name: s
    for s in (
        _int(8),
        _int(4),
        _int(3),
        _int(2),
        _fp8("fp8_e4m3"),
        _fp8("fp8_e5m2"),
        _mx("mxfp8_e4m3", "fp8_e4m3"),
        _mx("mxfp8_e5m2", "fp8_e5m2"),
        _mx("mxfp6_e3m2", "fp6_e3m2"),
        _mx("mxfp6_e2m3", "fp6_e2m3"),
        _mx("mxfp4", "fp4_e2m1"),
        _mx("mxint8", "mxint8"),
        FormatSpec(
            name="nvfp4",
            family="nvfp4",
            bits=4,
            element=ELEMENTS["fp4_e2m1"],
            options=COMMON_OPTIONS,
            block="block 16",
            scale="E4M3 + FP32 tensor",
            reference_bits=4 + 8 / 16 + 32 / 4096**2,
            description="NVIDIA FP4: fp4_e2m1 elements, E4M3 scale per 16, FP32 per tensor",
        ),
    )
}


def get_format(name: str) -> FormatSpec:
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown format {name!r}; known formats: {' '.join(FORMATS)}"
        ) from None
