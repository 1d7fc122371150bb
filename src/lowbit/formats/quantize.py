"""quantize_tensor: the one public entry to every format."""

from __future__ import annotations

import torch

from . import elements, fp8, int as int_fmt, mx, nvfp4, pack, tiles
from .qtensor import QTensor, dequantize_values, restore_shape
from .registry import get_format

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_input(x: torch.Tensor, axis: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"cannot quantize a {x.dtype} tensor: lowbit quantizes float32, float16, bfloat16 "
            "or float64 values; convert it first (x.float())"
        )
    if x.dim() == 0:
        raise ValueError("cannot quantize a 0-D tensor: give it at least one dimension (x.reshape(1))")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-D tensor")
    axis %= x.dim()
    if x.dtype == torch.float64 and x.numel():
        big = torch.isfinite(x) & (x.abs() > torch.finfo(torch.float32).max)
        if bool(big.any()):
            raise ValueError(
                f"the float64 input holds {int(big.sum())} finite value(s) beyond the float32 range "
                "(lowbit computes in float32); scale the tensor down first"
            )
    if x.shape[axis] == 0:
        raise ValueError("cannot quantize along an empty dimension (K = 0)")
    return axis


def _check_finite(x: torch.Tensor, fmt: str) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{fmt}: the input holds {int(bad.sum())} NaN/Inf value(s), the first at index {first}; "
            "clean them first (torch.nan_to_num) or find where they come from"
        )


def checked_spec(fmt: str, options: dict):
    """The format's spec, after checking that it takes every option given."""
    spec = get_format(fmt)
    unknown = set(options) - spec.options
    if unknown:
        raise ValueError(
            f"format {fmt} does not take option(s) {sorted(unknown)}; it takes {sorted(spec.options)}"
        )
    return spec


def scale_granularity(spec, options: dict) -> tuple[int | None, str]:
    """(group_size, granularity) of an int or FP8 format from its options, with the
    defaults: 4-bit ints in groups of 128, 8-bit and FP8 per channel."""
    group_size = options.get("group_size", None if spec.bits == 8 or spec.family == "fp8" else 128)
    granularity = options.get("granularity", "group" if group_size is not None else "channel")
    if "group_size" in options and "granularity" in options and granularity != "group":
        raise ValueError(f"group_size={group_size} needs granularity='group', got {granularity!r}")
    return group_size, granularity


def _quantize_values(x: torch.Tensor, fmt: str, options: dict):
    """Shared by quantize_tensor and fake_quantize: -> (spec, axis, values [R, K], parts, tile, kept options)."""
    spec = checked_spec(fmt, options)
    axis = _check_input(x, options.get("axis", -1))
    k = x.shape[axis]
    x2 = x.detach().movedim(axis, -1).reshape(-1, k).to(torch.float32)
    r = x2.shape[0]
    if spec.family != "mx":
        _check_finite(x.detach(), fmt)

    parts: dict = {}
    kept: dict = {}
    if spec.family in ("int", "fp8"):
        default_8bit = spec.bits == 8
        group_size, granularity = scale_granularity(spec, options)
        block_shape = tuple(options.get("block_shape", (128, 128)))
        tile = tiles.resolve_tile(granularity, group_size, block_shape, r, k, x.dim())
        scale_dtype = options.get("scale_dtype", torch.float32)
        if not (isinstance(scale_dtype, torch.dtype) and scale_dtype.is_floating_point):
            raise ValueError(f"scale_dtype must be a torch float dtype, got {scale_dtype!r}")
        kept = {"granularity": granularity}
        if granularity == "group":
            kept["group_size"] = group_size
        if granularity == "block":
            kept["block_shape"] = block_shape
        if spec.family == "int":
            symmetric = bool(options.get("symmetric", default_8bit))
            zero_point = options.get("zero_point", "float")
            if zero_point not in ("float", "integer"):
                raise ValueError(f"zero_point must be 'float' or 'integer', got {zero_point!r}")
            if symmetric and "zero_point" in options:
                raise ValueError("zero_point applies to affine formats; drop it or pass symmetric=False")
            values, scales, zeros = int_fmt.quantize(x2, spec.bits, tile, symmetric, zero_point, scale_dtype)
            parts = {"scales": scales, "zeros": zeros}
            kept["symmetric"] = symmetric
            if not symmetric:
                kept["zero_point"] = zero_point
        else:
            values, scales = fp8.quantize(x2, spec.element, tile, scale_dtype)
            parts = {"scales": scales}
    elif spec.family == "mx":
        rule = options.get("scale_rule", "floor")
        values, scales = mx.quantize(x2, spec.element, rule)
        parts = {"scales": scales}
        tile = (1, mx.BLOCK)
        kept = {"scale_rule": rule}
    else:
        values, scales, global_scale = nvfp4.quantize(x2)
        parts = {"scales": scales, "global_scale": global_scale}
        tile = (1, nvfp4.BLOCK)
    return spec, axis, values, parts, tile, kept


def quantize_tensor(x: torch.Tensor, fmt: str, **options) -> QTensor:
    """Quantize ``x`` into format ``fmt`` along ``axis`` (default -1, the K dimension).

    See docs/formats.md for every format's options, rules and canonical layout.
    """
    spec, axis, values, parts, tile, kept = _quantize_values(x, fmt, options)
    if spec.family == "int":
        patterns = int_fmt.to_patterns(values, spec.bits)
    else:
        patterns = elements.grid_to_codes(values, spec.element)
    codes = pack.pack_codes(patterns, spec.bits)
    if spec.family == "int" and spec.bits == 8 and kept["symmetric"]:
        codes = codes.view(torch.int8)
    return QTensor(fmt=fmt, shape=x.shape, axis=axis, codes=codes, tile=tile, options=kept, **parts)


def fake_quantize(x: torch.Tensor, fmt: str, **options) -> torch.Tensor:
    """``quantize_tensor(x, fmt, **options).dequantize()``, bit for bit, without
    encoding and packing codes: the fast path for activations (float32 result)."""
    spec, axis, values, parts, tile, _ = _quantize_values(x, fmt, options)
    return restore_shape(dequantize_values(spec.family, values, parts, tile), x.shape, axis)
