"""Recipes: activation bits, weight bits, format, group, methods, in one name.

    a16w4-int-g128      4-bit integer weights, group 128, bf16/fp16 activations
    a8w8-fp8            FP8 E4M3 weights per channel, FP8 activations per token
    a8w8-fp8-b128       FP8 E4M3 weights in 128 x 128 blocks, activations in 1 x 128 blocks
    a8w4-mxfp4          MXFP8 activations x MXFP4 weights
    a8w4-fp8-mxfp4      FP8 E4M3 activations per token x MXFP4 weights (W4A8 on the FP8
                        tensor cores, lowbit.kernels.w4a8)
    a4w4-nvfp4          NVFP4 activations and weights

Optional method suffixes name the algorithms that pick scales and codes: at most
one transform of the layer's input space, then at most one quantizer, in that order.

    quantizers  -rtn    round to nearest (the default)
                -hqq    HQQ: zero point (and scale) by a half-quadratic lp solver;
                        integer formats; no data
                -gptq   GPTQ: Hessian-based error compensation; needs calibration
    transforms  -awq    AWQ: activation-aware per-input-channel scales (and clipping
                        when the quantizer is rtn); integer and FP4 weights; needs
                        calibration
                -smooth SmoothQuant: activation outliers migrated into the weights;
                        a8w8-* recipes only; needs calibration
                -rot    block-wise Hadamard rotation of weights and activations
                        (block 32; -rot128 for block 128); no data

e.g. a16w4-int-g64-hqq, a16w4-int-g64-awq-gptq, a16w4-mxfp4-rot-gptq, a8w8-int8-smooth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUANTIZERS = ("rtn", "hqq", "gptq")
TRANSFORMS = ("awq", "smooth", "rot")
METHODS = QUANTIZERS + TRANSFORMS
CALIBRATED = ("awq", "gptq", "smooth")  # the methods that need calibration data
ROT_BLOCK = 32  # the block of -rot; -rot<n> names another power of two
_ROT = re.compile(r"rot(\d+)?")

# weight part of a recipe -> (format, options for quantize_tensor)
_WEIGHT_FORMATS = {
    "int8": ("int8", {}),
    "fp8": ("fp8_e4m3", {}),
    # DeepSeek-style: 128 x 128 weight blocks (activations then 1 x 128 blocks)
    "fp8-b128": ("fp8_e4m3", {"granularity": "block", "block_shape": (128, 128)}),
    "int8-b128": ("int8", {"granularity": "block", "block_shape": (128, 128)}),
    "mxfp8": ("mxfp8_e4m3", {}),
    "mxfp6": ("mxfp6_e2m3", {}),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
    # W4A8: MXFP4 weights with FP8 activations per token (the body names both formats)
    "fp8-mxfp4": ("mxfp4", {}),
}

# weight parts that name their activation format too: only with that many activation bits
_ACT_NAMED = {"fp8-mxfp4": 8}

# (activation bits, weight family) -> activation format and its options
_ACTIVATIONS = {
    (8, "fp8"): ("fp8_e4m3", {"granularity": "token"}),
    (8, "int8"): ("int8", {"granularity": "token"}),
    (8, "fp8-b128"): ("fp8_e4m3", {"group_size": 128}),
    (8, "int8-b128"): ("int8", {"group_size": 128}),
    (8, "mxfp8"): ("mxfp8_e4m3", {}),
    (8, "mxfp4"): ("mxfp8_e4m3", {}),
    (8, "mxfp6"): ("mxfp8_e4m3", {}),
    (8, "fp8-mxfp4"): ("fp8_e4m3", {"granularity": "token"}),
    (4, "mxfp4"): ("mxfp4", {}),
    (4, "nvfp4"): ("nvfp4", {}),
}

_NAME = re.compile(r"^a(?P<a>16|8|4)w(?P<w>8|6|4|3|2)-(?P<rest>[a-z0-9]+(?:-[a-z0-9]+)*)$")

EXAMPLES = (
    "a16w8-int8 a16w8-fp8 a16w4-int-g32 a16w4-int-g64 a16w4-int-g128 a16w3-int-g64 "
    "a16w2-int-g64 a8w8-fp8 a8w8-int8 a16w8-mxfp8 a16w6-mxfp6 a16w4-mxfp4 a16w4-nvfp4 "
    "a8w4-mxfp4 a8w4-fp8-mxfp4 a4w4-mxfp4 a4w4-nvfp4"
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
    method: str = "rtn"  # the method suffix as written, canonical order (e.g. "rot-gptq"); "rtn" if none
    quantizer: str = "rtn"  # rtn | hqq | gptq
    transform: str | None = None  # awq | smooth | rot | None
    rotation_block: int | None = None  # -rot: the Hadamard block along K

    @property
    def needs_calibration(self) -> bool:
        return self.quantizer in CALIBRATED or self.transform in CALIBRATED


def _fail(name: str, why: str) -> ValueError:
    return ValueError(
        f"bad recipe {name!r}: {why}. Recipes read a<act bits>w<weight bits>-<format>[-g<group>][-<method>...], "
        f"e.g. {', '.join(EXAMPLES[:6])}, a16w4-int-g64-hqq, a16w4-mxfp4-rot-gptq; "
        f"methods: transforms {', '.join(TRANSFORMS)} then quantizers {', '.join(QUANTIZERS)}"
    )


def _split_methods(name: str, rest: str) -> tuple[str, list[str]]:
    """'int-g64-awq-gptq' -> ('int-g64', ['awq', 'gptq']): trailing tokens that name methods."""
    tokens = rest.split("-")
    methods: list[str] = []
    while len(tokens) > 1 and (tokens[-1] in METHODS or _ROT.fullmatch(tokens[-1])):
        methods.insert(0, tokens.pop())
    return "-".join(tokens), methods


def _methods(name: str, methods: list[str]) -> tuple[str, str | None, int | None]:
    quantizer, transform, block = None, None, None
    for m in methods:
        rot = _ROT.fullmatch(m)
        kind = "rot" if rot else m
        if kind in QUANTIZERS:
            if quantizer:
                raise _fail(name, f"two quantizers ({quantizer!r} and {m!r}); pick one of {', '.join(QUANTIZERS)}")
            quantizer = m
        else:
            if transform:
                raise _fail(name, f"two transforms ({transform!r} and {kind!r}); at most one of {', '.join(TRANSFORMS)}")
            if quantizer:
                raise _fail(name, f"the transform {m!r} must come before the quantizer {quantizer!r} "
                                  f"(e.g. a16w4-mxfp4-rot-gptq)")
            transform = kind
            if rot:
                if rot.group(1) is None:
                    block = ROT_BLOCK
                else:
                    block = int(rot.group(1))
                    if block == ROT_BLOCK:
                        raise _fail(name, f"-rot already means block {ROT_BLOCK}; write -rot")
                    if block < 2 or block & (block - 1) or block > 4096:
                        raise _fail(name, f"the Hadamard block of -rot<n> must be a power of two in [2, 4096], got {block}")
    return quantizer or "rtn", transform, block


def parse_recipe(name: str) -> Recipe:
    m = _NAME.match(name) if isinstance(name, str) else None
    if not m:
        raise _fail(name, "it does not follow the naming scheme")
    a_bits, w_bits = int(m["a"]), int(m["w"])
    body, methods = _split_methods(name, m["rest"])
    quantizer, transform, rot_block = _methods(name, methods)
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
    if body in _ACT_NAMED and a_bits != _ACT_NAMED[body]:
        raise _fail(name, f"{body} names {_ACT_NAMED[body]}-bit activations, e.g. a{_ACT_NAMED[body]}w{w_bits}-{body}")
    if a_bits == 16:
        act = ActivationSpec()
    else:
        key = (a_bits, family)
        if key not in _ACTIVATIONS:
            raise _fail(name, f"{a_bits}-bit activations are not defined with {body} weights")
        act = ActivationSpec(*_ACTIVATIONS[key])
    integer = fmt.startswith("int")
    if quantizer == "hqq" and not integer:
        raise _fail(name, f"-hqq optimises integer weights (int8/int4/int3/int2), not {fmt}; "
                          "for MX/NVFP4 weights use -gptq and/or -rot")
    if transform == "smooth" and not (a_bits == 8 and w_bits == 8):
        raise _fail(name, "-smooth (SmoothQuant) only applies to a8w8-* recipes, where activations are quantized "
                          "too; for weight-only recipes use -awq")
    if transform == "awq" and not (integer or fmt in ("mxfp4", "nvfp4")):
        raise _fail(name, f"-awq applies to integer and FP4 (mxfp4, nvfp4) weights, not {fmt}")
    method = "-".join(methods) if methods else "rtn"
    return Recipe(name=name, weight_fmt=fmt, weight_options=opts, activation=act, method=method,
                  quantizer=quantizer, transform=transform, rotation_block=rot_block)
