"""QTensor metadata: repr, bits_per_element, nbytes, shape/axis, .to()."""

import numpy as np
import pytest
import torch

import lowbit

from ._ref import ALL_FORMATS


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_repr_one_line_with_name(fmt):
    qt = lowbit.quantize_tensor(torch.randn(3, 2, 64), fmt)
    r = repr(qt)
    assert "\n" not in r and fmt in r, r
    assert isinstance(qt, lowbit.QTensor)
    assert isinstance(qt.shape, torch.Size) and qt.shape == (3, 2, 64)
    assert qt.axis == 2


# format, options, expected bits per element of a [8, 256] tensor, by hand:
# codes + scales (+ zeros) (+ global scale), in bits / 2048 elements
BPE = [
    ("mxfp4", {}, 4 + 8 / 32),                                    # 4.25
    ("mxfp6_e2m3", {}, 6 + 8 / 32),
    ("mxfp8_e4m3", {}, 8 + 8 / 32),
    ("mxint8", {}, 8 + 8 / 32),
    ("nvfp4", {}, 4 + 8 / 16 + 32 / 2048),                         # 4.5 + tiny
    ("int4", {}, 4 + (32 + 32) / 128),                             # g128, fp32 scale + zero: 4.5
    ("int4", {"symmetric": True}, 4 + 32 / 128),
    ("int3", {"group_size": 64}, 3 + 64 / 64),
    ("int2", {"group_size": 32, "scale_dtype": torch.float16}, 2 + 32 / 32),
    ("int8", {}, 8 + 32 / 256),                                    # per channel fp32
    ("fp8_e4m3", {"granularity": "tensor"}, 8 + 32 / 2048),
    ("fp8_e5m2", {"granularity": "block", "block_shape": (1, 128)}, 8 + 32 / 128),
]


@pytest.mark.parametrize("fmt,opts,bpe", BPE, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BPE)])
def test_bits_per_element(fmt, opts, bpe):
    qt = lowbit.quantize_tensor(torch.randn(8, 256), fmt, **opts)
    assert qt.bits_per_element == pytest.approx(bpe, abs=1e-12), f"{fmt} {opts}: {qt.bits_per_element} != {bpe}"
    assert qt.nbytes * 8 == pytest.approx(bpe * 2048, abs=1e-9)


def test_nbytes_by_hand():
    qt = lowbit.quantize_tensor(torch.randn(8, 256), "mxfp4")
    assert qt.nbytes == 8 * 128 + 8 * 8
    qt = lowbit.quantize_tensor(torch.randn(8, 256), "nvfp4")
    assert qt.nbytes == 8 * 128 + 8 * 16 + 4
    qt = lowbit.quantize_tensor(torch.randn(8, 256), "int4")
    assert qt.nbytes == 8 * 128 + 2 * (8 * 2 * 4)
    qt = lowbit.quantize_tensor(torch.randn(8, 100), "mxfp6_e3m2")  # 100 -> 25 chunks of 3 bytes
    assert qt.nbytes == 8 * 75 + 8 * 4


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_to_cpu_roundtrip(fmt):
    x = torch.randn(4, 96)
    qt = lowbit.quantize_tensor(x, fmt)
    q2 = qt.to("cpu")
    assert isinstance(q2, lowbit.QTensor) and q2.fmt == fmt
    assert torch.equal(q2.dequantize(), qt.dequantize())


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_options_recorded(fmt):
    qt = lowbit.quantize_tensor(torch.randn(4, 128), fmt)
    assert isinstance(qt.options, dict)
    if fmt.startswith("mx"):
        assert qt.options.get("scale_rule") == "floor"
    if fmt.startswith("int"):
        assert "symmetric" in qt.options and "granularity" in qt.options
    qt = lowbit.quantize_tensor(torch.randn(4, 128), "fp8_e4m3", granularity="token")
    assert qt.options["granularity"] == "token"


def test_formats_listed():
    assert set(ALL_FORMATS) <= set(lowbit.FORMATS)


def test_dequantize_deterministic_and_shape():
    x = torch.randn(2, 5, 33)
    for fmt in ALL_FORMATS:
        qt = lowbit.quantize_tensor(x, fmt, axis=1)
        d = qt.dequantize()
        assert d.shape == x.shape and qt.axis == 1
        assert torch.equal(d, qt.dequantize())
        err = (d - x).abs().max().item()
        assert np.isfinite(err) and err < 2.0, f"{fmt}: max error {err}"
