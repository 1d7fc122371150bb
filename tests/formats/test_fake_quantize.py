"""fake_quantize is quantize_tensor(...).dequantize() bit for bit, for every format."""

import pytest
import torch

import lowbit
from lowbit.formats import fake_quantize

from ._ref import ALL_FORMATS


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape,axis", [((7, 70), -1), ((2, 3, 45), -1), ((33, 5), 0)])
def test_fake_quantize_equals_quantize_dequantize(fmt, shape, axis):
    g = torch.Generator().manual_seed(hash((fmt, shape)) % 2**31)
    x = torch.randn(shape, generator=g) * 2.0 ** torch.randint(-8, 8, shape, generator=g)
    want = lowbit.quantize_tensor(x, fmt, axis=axis).dequantize()
    got = fake_quantize(x, fmt, axis=axis)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(torch.nan_to_num(got, 1.0), torch.nan_to_num(want, 1.0)), (got - want).abs().max()


@pytest.mark.parametrize("fmt,opts", [("fp8_e4m3", {"granularity": "token"}), ("int8", {"granularity": "token"}),
                                      ("int4", {"group_size": 32, "zero_point": "integer"}),
                                      ("mxfp8_e4m3", {"scale_rule": "ceil"}), ("nvfp4", {})])
def test_fake_quantize_options_and_bf16(fmt, opts):
    x = torch.randn(17, 96).to(torch.bfloat16)
    assert torch.equal(fake_quantize(x, fmt, **opts), lowbit.quantize_tensor(x, fmt, **opts).dequantize())


def test_fake_quantize_mx_nan_block():
    x = torch.randn(2, 64)
    x[1, 40] = float("nan")
    y = fake_quantize(x, "mxfp4")
    assert torch.isnan(y[1, 32:]).all() and not torch.isnan(y[:, :32]).any() and not torch.isnan(y[0]).any()
