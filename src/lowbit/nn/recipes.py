"""Recipes: activation bits, weight bits, format, group, method, in one name.

    a16w4-int-g128      4-bit integer weights, group 128, bf16/fp16 activations
    a8w8-fp8            FP8 E4M3 weights per channel, FP8 activations per token
    a8w4-mxfp4          MXFP8 activations x MXFP4 weights
    a4w4-nvfp4          NVFP4 activations and weights

An optional method suffix names the algorithm that picks scales and codes;
`-rtn` (round to nearest) is the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

METHODS = ("rtn",)
PLANNED_METHODS = ("hqq", "awq", "gptq", "smooth", "rot")  # named in the scheme, not built yet

# weight part of a recipe -> (format, options for quantize_tensor)
_WEIGHT_FORMATS = {
    "int8": ("int8", {}),
    "fp8": ("fp8_e4m3", {}),
    "mxfp8": ("mxfp8_e4m3", {}),
    "mxfp6": ("mxfp6_e2m3", {}),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
}

# (activation bits, weight family) -> activation format and its options
_ACTIVATIONS = {
    (8, "fp8"): ("fp8_e4m3", {"granularity": "token"}),
    (8, "int8"): ("int8", {"granularity": "token"}),
    (8, "mxfp8"): ("mxfp8_e4m3", {}),
    (8, "mxfp4"): ("mxfp8_e4m3", {}),
    (8, "mxfp6"): ("mxfp8_e4m3", {}),
    (4, "mxfp4"): ("mxfp4", {}),
    (4, "nvfp4"): ("nvfp4", {}),
}

_NAME = re.compile(r"^a(?P<a>16|8|4)w(?P<w>8|6|4|3|2)-(?P<body>[a-z0-9-]+?)(?:-(?P<method>[a-z]+))?$")

EXAMPLES = (
    "a16w8-int8 a16w8-fp8 a16w4-int-g32 a16w4-int-g64 a16w4-int-g128 a16w3-int-g64 "
    "a16w2-int-g64 a8w8-fp8 a8w8-int8 a16w8-mxfp8 a16w6-mxfp6 a16w4-mxfp4 a16w4-nvfp4 "
    "a8w4-mxfp4 a4w4-mxfp4 a4w4-nvfp4"
).split()


@dataclass(frozen=True)
class ActivationSpec:
    """Dynamic activation quantization along the last dimension (none when fmt is None)."""

    fmt: str | None = None
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return "none" if self.fmt is None else self.fmt + "".join(f",{k}={v}" for k, v in self.options.items())


@dataclass(frozen=True)
class Recipe:
    name: str
    weight_fmt: str
    weight_options: dict
    activation: ActivationSpec
    method: str = "rtn"


def _fail(name: str, why: str) -> ValueError:
    return ValueError(
        f"bad recipe {name!r}: {why}. Recipes read a<act bits>w<weight bits>-<format>[-g<group>][-<method>], "
        f"e.g. {', '.join(EXAMPLES[:6])}; methods: {', '.join(METHODS)}"
    )


def parse_recipe(name: str) -> Recipe:
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise _fail(name, "it does not follow the naming scheme")
    a_bits, w_bits, body, method = int(m["a"]), int(m["w"]), m["body"], m["method"] or "rtn"
    if m["method"] in PLANNED_METHODS:
        raise _fail(name, f"method {m['method']!r} is not available yet")
    if m["method"] and m["method"] not in METHODS:
        # the suffix may be part of the body (e.g. 'int-g64'); only a known method is split off
        body, method = f"{body}-{m['method']}", "rtn"
    group = None
    g = re.fullmatch(r"int-g(\d+)|int", body)
    if g:
        fmt, opts = f"int{w_bits}", {}
        if g.group(1):
            group = int(g.group(1))
            if group <= 0:
                raise _fail(name, "the group size must be positive")
            opts = {"group_size": group}
        elif w_bits != 8:
            raise _fail(name, f"{w_bits}-bit integer weights need a group, e.g. a16w{w_bits}-int-g128")
        family = "int8" if w_bits == 8 else "int"
    elif body in _WEIGHT_FORMATS:
        fmt, opts = _WEIGHT_FORMATS[body]
        family = body
        from ..formats import get_format

        if get_format(fmt).bits != w_bits:
            raise _fail(name, f"{body} weights have {get_format(fmt).bits} bits, not {w_bits}")
    else:
        raise _fail(name, f"unknown weight format {body!r}")
    if a_bits == 16:
        act = ActivationSpec()
    else:
        key = (a_bits, family)
        if key not in _ACTIVATIONS:
            raise _fail(name, f"{a_bits}-bit activations are not defined with {body} weights")
        act = ActivationSpec(*_ACTIVATIONS[key])
    return Recipe(name=name, weight_fmt=fmt, weight_options=opts, activation=act, method=method)
