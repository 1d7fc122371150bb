"""bf16 / fp16 / fp64 inputs give the same stored codes, scales and zeros as
the float32 tensor of the same values."""

import numpy as np
import pytest
import torch

import lowbit

from ._ref import ALL_FORMATS, MX, mx_test_data


def _parts(qt):
    return {
        "codes": qt.codes,
        "scales": qt.scales,
        "zeros": qt.zeros,
        "global_scale": qt.global_scale,
    }


def _assert_same(a, b, tag):
    pa, pb = _parts(a), _parts(b)
    for name in pa:
        if pa[name] is None or pb[name] is None:
            assert pa[name] is None and pb[name] is None, f"{tag}: {name} present in only one"
            continue
        assert pa[name].dtype == pb[name].dtype, f"{tag}: {name} dtype {pa[name].dtype} vs {pb[name].dtype}"
        ta, tb = pa[name], pb[name]
        if ta.dtype.is_floating_point:
            eq = (ta == tb) | (torch.isnan(ta) & torch.isnan(tb))
        else:
            eq = ta == tb
        if not bool(eq.all()):
            idx = tuple(int(i) for i in torch.nonzero(~eq)[0])
            raise AssertionError(f"{tag}: {name} differs at {idx}: {ta[idx].item()!r} vs {tb[idx].item()!r}")
    da, db = a.dequantize(), b.dequantize()
    assert da.dtype == torch.float32 and db.dtype == torch.float32
    assert torch.equal(torch.nan_to_num(da, 7.0), torch.nan_to_num(db, 7.0)), f"{tag}: dequantize differs"


def _data(fmt):
    rng = np.random.default_rng(12)
    if fmt in MX:
        x = mx_test_data(rng, (4, 200), -10, 10)  # within fp16 range
    else:
        x = (rng.standard_t(4, (4, 200)) * 3).astype(np.float32)
    return torch.from_numpy(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_half_inputs_match_float32(fmt, dtype):
    xh = _data(fmt).to(dtype)
    a = lowbit.quantize_tensor(xh, fmt)
    b = lowbit.quantize_tensor(xh.float(), fmt)
    _assert_same(a, b, f"{fmt} {dtype}")
    assert a.dequantize().dtype == torch.float32


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_float64_input_matches_float32(fmt):
    x = _data(fmt)
    _assert_same(lowbit.quantize_tensor(x.double(), fmt), lowbit.quantize_tensor(x, fmt), f"{fmt} float64")


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3", "mxfp4", "nvfp4"])
def test_noncontiguous_input(fmt):
    x = _data(fmt)
    xt = x.t().contiguous().t()  # same values, transposed strides
    assert not xt.is_contiguous()
    _assert_same(lowbit.quantize_tensor(xt, fmt), lowbit.quantize_tensor(x, fmt), f"{fmt} non-contiguous")
