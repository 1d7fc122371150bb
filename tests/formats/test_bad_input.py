"""Bad input, per the table at the end of docs/formats.md."""

import re

import numpy as np
import pytest
import torch

import lowbit

from ._ref import ALL_FORMATS, MX

NON_MX = [f for f in ALL_FORMATS if f not in MX]


def test_unknown_format_lists_known_names():
    with pytest.raises(ValueError) as ei:
        lowbit.quantize_tensor(torch.ones(2, 32), "int5")
    msg = str(ei.value)
    missing = [f for f in ALL_FORMATS if f not in msg]
    assert not missing, f"message should list the known formats; missing {missing}: {msg}"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool,
                                   torch.complex64])
@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "nvfp4", "fp8_e4m3"])
def test_non_float_dtype_type_error(fmt, dtype):
    x = torch.ones(2, 32).to(dtype)
    with pytest.raises(TypeError) as ei:
        lowbit.quantize_tensor(x, fmt)
    msg = str(ei.value)
    assert str(dtype).replace("torch.", "") in msg, f"message should name the dtype: {msg}"
    assert "x.float()" in msg, f"message should give the fix x.float(): {msg}"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_0d_raises(fmt):
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.tensor(1.0), fmt)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_k0_raises(fmt):
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.ones(3, 0), fmt)
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.ones(0, 3), fmt, axis=0)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 40)])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_zero_rows_empty_qtensor(fmt, shape):
    x = torch.ones(shape)
    qt = lowbit.quantize_tensor(x, fmt)
    assert tuple(qt.shape) == shape
    assert qt.codes.shape[0] == 0
    d = qt.dequantize()
    assert d.dtype == torch.float32 and tuple(d.shape) == shape
    assert "\n" not in repr(qt)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fmt", NON_MX)
def test_nan_inf_non_mx_raises(fmt, bad):
    x = torch.randn(4, 64)
    x[1, 5] = bad
    x[3, 2] = float("nan")
    with pytest.raises(ValueError) as ei:
        lowbit.quantize_tensor(x, fmt)
    msg = str(ei.value)
    assert re.search(r"\b2\b", msg), f"message should give the count (2): {msg}"
    assert re.search(r"1,\s*5", msg), f"message should give the first index (1, 5): {msg}"
    assert "nan_to_num" in msg, f"message should give the fix torch.nan_to_num: {msg}"


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "nvfp4"])
def test_nan_index_is_in_input_coordinates(fmt):
    """With axis=0 the reported index is the one of x, not of the moved view."""
    x = torch.randn(64, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError) as ei:
        lowbit.quantize_tensor(x, fmt, axis=0)
    msg = str(ei.value)
    assert re.search(r"1,\s*2", msg), f"first NaN is x[1, 2]; message: {msg}"


@pytest.mark.parametrize("fmt", list(MX))
def test_nan_inf_mx_is_nan_scale(fmt):
    """(bit-exactness of the other blocks is in test_mx.test_mx_nan_inf_block)"""
    x = torch.randn(2, 96)
    x[0, 33] = float("nan")
    x[1, 70] = float("inf")
    qt = lowbit.quantize_tensor(x, fmt)
    s = qt.scales
    assert s[0, 1] == 255 and s[1, 2] == 255
    assert (s[0, [0, 2]] != 255).all() and (s[1, :2] != 255).all()
    d = qt.dequantize()
    assert torch.isnan(d[0, 32:64]).all() and torch.isnan(d[1, 64:96]).all()
    assert torch.isfinite(d[0, :32]).all() and torch.isfinite(d[0, 64:]).all() and torch.isfinite(d[1, :64]).all()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_block_granularity_needs_2d(fmt):
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.randn(2, 128, 128), fmt, granularity="block")
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.randn(256), fmt, granularity="block")
    lowbit.quantize_tensor(torch.randn(130, 128), fmt, granularity="block")  # 2-D is fine


@pytest.mark.parametrize("fmt,opt,val", [
    ("mxfp4", "group_size", 32),
    ("mxfp8_e4m3", "granularity", "channel"),
    ("mxint8", "symmetric", True),
    ("mxfp6_e2m3", "scale_dtype", torch.float16),
    ("nvfp4", "scale_rule", "floor"),
    ("nvfp4", "group_size", 16),
    ("nvfp4", "granularity", "group"),
    ("int4", "scale_rule", "ceil"),
    ("int8", "scale_rule", "floor"),
    ("fp8_e4m3", "symmetric", True),
    ("fp8_e5m2", "zero_point", "float"),
    ("int4", "bogus_option", 1),
    ("mxfp4", "bogus_option", 1),
])
def test_option_not_taken(fmt, opt, val):
    with pytest.raises(ValueError) as ei:
        lowbit.quantize_tensor(torch.randn(4, 128), fmt, **{opt: val})
    assert opt in str(ei.value), f"message should name the option {opt!r}: {ei.value}"


@pytest.mark.parametrize("fmt,opts", [
    ("mxfp4", {"scale_rule": "round"}),
    ("int4", {"granularity": "row"}),
    ("int4", {"zero_point": "half"}),
    ("fp8_e4m3", {"granularity": "per-tensor"}),
    ("int4", {"group_size": 0}),
])
def test_bad_option_values(fmt, opts):
    with pytest.raises(ValueError):
        lowbit.quantize_tensor(torch.randn(4, 128), fmt, **opts)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_axis_out_of_range(fmt):
    with pytest.raises((ValueError, IndexError)):
        lowbit.quantize_tensor(torch.randn(4, 64), fmt, axis=2)


def test_input_not_modified():
    x = torch.randn(4, 70)
    x[0, 0] = -0.0
    y = x.clone()
    for fmt in ALL_FORMATS:
        lowbit.quantize_tensor(x, fmt)
    assert torch.equal(x, y) and np.signbit(x[0, 0].item())


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "mxfp4", "nvfp4"])
def test_float64_beyond_float32_range_is_refused(fmt):
    x = torch.randn(4, 64, dtype=torch.float64)
    x[2, 5] = 1e39  # finite in float64, Inf in float32
    with pytest.raises(ValueError, match="float32 range"):
        lowbit.quantize_tensor(x, fmt)
