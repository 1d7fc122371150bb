"""The A8W8 path under Triton's CPU interpreter: the activation quantization kernel
(codes and scales bit for bit against lowbit.formats, FP8 rounding against
ml_dtypes, INT8 ties against numpy) and the A8W8 GEMM (against the float64 product
of its own dequantized operands, and the pure-torch reference), on small odd shapes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")
ml_dtypes = pytest.importorskip("ml_dtypes")

from lowbit import quantize_tensor  # noqa: E402
from lowbit.kernels.a8w8 import (  # noqa: E402
    A8W8Config,
    a8w8_matmul,
    default_a8w8_config,
    dequantized_weight,
    pack_a8w8,
)
from lowbit.kernels.act_quant import quantize_activation, quantize_activation_reference  # noqa: E402
from lowbit.kernels.ops import a8w8_linear  # noqa: E402

from .conftest import _wide_activations as _x  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_activation_codes_and_scales_equal_the_reference(fmt, group, dtype, smooth):
    m, k = 5, 333
    x = _x(m, k, dtype, seed=k)
    iscale = (torch.rand(k, generator=torch.Generator().manual_seed(1)) * 3 + 0.25) if smooth else None
    codes, scales = quantize_activation(x, fmt, group, iscale)
    ref_codes, ref_scales = quantize_activation_reference(x, fmt, group, iscale)
    assert codes.shape == (m, 384) and codes.dtype == ref_codes.dtype
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"
    assert torch.equal(scales, ref_scales)
    assert bool((codes[:, k:] == 0).all())  # the K padding the GEMM reads
    assert bool((scales[1] == 1).all())  # the zero row


def test_fp8_rounding_of_every_bf16_value_matches_ml_dtypes():
    """Rows start with 448 so that the scale is exactly 1: the codes are then the
    E4M3 rounding (to nearest even, saturating) of the values themselves."""
    pos = torch.arange(0, 0x43E1, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # 0 .. 448
    vals = torch.cat([pos, -pos]).float()
    vals = vals[torch.isfinite(vals)]
    k = 1023
    rows = -(-vals.numel() // (k - 1))
    x = torch.zeros(rows * (k - 1))
    x[: vals.numel()] = vals
    x = torch.cat([torch.full((rows, 1), 448.0), x.reshape(rows, k - 1)], 1).to(torch.bfloat16)
    codes, scales = quantize_activation(x, "fp8_e4m3")
    assert bool((scales == 1).all())
    expect = np.clip(x.float().numpy(), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    got = codes[:, :k].numpy()
    assert np.array_equal(got, expect), f"{int((got != expect).sum())} of {got.size} codes differ"


def test_int8_rounds_half_to_even():
    x = torch.tensor([[127.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 126.5, 1.49, -1.51]], dtype=torch.bfloat16)
    codes, scales = quantize_activation(x, "int8")
    assert float(scales[0]) == 1.0
    expect = np.rint(x.float().numpy()).astype(np.int8)
    assert np.array_equal(codes[:, : x.shape[1]].numpy(), expect)


def _weight(fmt, blockwise, n, k, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: n // 3, : k // 5] *= 8  # blocks with different scales
    opts = {"granularity": "block", "block_shape": (128, 128)} if blockwise else {"granularity": "channel"}
    return quantize_tensor(w, fmt, **opts)


def _exact(x, pa, bias, iscale=None):
    """float64 (codes_a * s_a) @ (codes_w * s_w)^T + bias, from the reference quantization."""
    codes, sa = quantize_activation_reference(x, pa.fmt, pa.act_group, iscale)
    a = codes.view(torch.float8_e4m3fn).double() if pa.fmt == "fp8_e4m3" else codes.double()
    a = a * (sa.double()[:, None] if pa.act_group is None else sa.double().repeat_interleave(128, 1))
    y = a[:, : pa.k] @ dequantized_weight(pa).double().T
    s = a[:, : pa.k].abs() @ dequantized_weight(pa).double().abs().T
    if bias is not None:
        y = y + bias.double()
        s = s + bias.double().abs()
    return y, s


EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
CONFIGS = {
    "swap-split": A8W8Config(16, 64, 64, split_k=3, swap=True),
    "gemm": A8W8Config(32, 32, 128),
    "gemm-k32": A8W8Config(16, 64, 32, split_k=2),
}


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("blockwise", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 97, 200), (3, 130, 256), (17, 61, 333)])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_gemm_equals_the_exact_product(fmt, blockwise, m, n, k, cfg):
    dtype = torch.bfloat16 if (m + n) % 2 else torch.float16
    qt = _weight(fmt, blockwise, n, k)
    pa = pack_a8w8(qt)
    x = _x(m, k, dtype, seed=m * n)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dtype) if k % 2 else None
    y = a8w8_matmul(x, pa, bias, backend="triton", config=CONFIGS[cfg])
    assert y.dtype == dtype and y.shape == (m, n)
    exact, s = _exact(x, pa, bias)
    err = (y.double() - exact).abs()
    bound = EPS[dtype] * exact.abs() + 1e-6 * s + 1e-30
    assert bool((err <= bound).all()), f"max normalised error {float((err / s.clamp(min=1e-30)).max()):.3g}"
    ref = a8w8_matmul(x, pa, bias, backend="reference")
    assert float((y.float() - ref.float()).abs().max()) <= EPS[dtype] * float(s.max())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_custom_op_with_a_smoothquant_scale_and_leading_dims(fmt):
    qt = _weight(fmt, False, 70, 150)
    pa = pack_a8w8(qt)
    x = _x(6, 150, torch.bfloat16, seed=9).reshape(2, 3, 150)
    iscale = torch.rand(150, generator=torch.Generator().manual_seed(2)) + 0.5
    y = a8w8_linear(x, pa, None, iscale)
    assert y.shape == (2, 3, 70)
    exact, s = _exact(x.reshape(6, 150), pa, None, iscale)
    err = (y.reshape(6, 70).double() - exact).abs()
    assert bool((err <= 2.0**-7 * exact.abs() + 1e-6 * s + 1e-30).all())


def test_default_configs_are_valid_and_pick_swap_for_small_m():
    for m in (1, 16, 64, 65, 512, 8192):
        cfg = default_a8w8_config(m, 28672, 4096).check()
        assert cfg.swap == (m <= 64)


def test_clear_errors():
    with pytest.raises(ValueError, match="A8W8 kernel layout.*int4"):
        pack_a8w8(quantize_tensor(torch.randn(8, 64), "int4", group_size=32))
    with pytest.raises(ValueError, match="symmetric"):
        pack_a8w8(quantize_tensor(torch.randn(8, 64), "int8", symmetric=False))
    pa = pack_a8w8(_weight("fp8_e4m3", False, 8, 64))
    with pytest.raises(ValueError, match="features"):
        a8w8_matmul(torch.randn(2, 63, dtype=torch.bfloat16), pa)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        a8w8_matmul(torch.randn(2, 64), pa)
    with pytest.raises(ValueError, match="block_k"):
        A8W8Config(16, 64, 48).check()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_long_rows_split_over_programs_give_the_same_codes(fmt):
    from lowbit.kernels.act_quant import split_rows

    m, k = 3, 5000
    assert split_rows(m, 5120)
    assert split_rows(128, 28672) and not split_rows(128, 14336) and not split_rows(1024, 28672)
    x = _x(m, k, torch.bfloat16, seed=7)
    iscale = torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.5
    codes, scales = quantize_activation(x, fmt, None, iscale)
    ref_codes, ref_scales = quantize_activation_reference(x, fmt, None, iscale)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


def test_fp8_long_k_restarts_the_tensor_core_sum():
    """K > 4096: the kernel sums FP8 products in segments of 4096 (promotion); the
    result is the same exact product (the interpreter's float32 sums)."""
    from lowbit.kernels.a8w8 import promotion_tiles

    k = 4096 + 300
    pa = pack_a8w8(_weight("fp8_e4m3", False, 33, k))
    assert promotion_tiles(pa, 128) == 32 and promotion_tiles(pa, 64) == 64
    x = _x(2, k, torch.bfloat16, seed=4)
    for cfg in (A8W8Config(16, 64, 128, split_k=1, swap=True), A8W8Config(16, 32, 64, split_k=2)):
        y = a8w8_matmul(x, pa, None, backend="triton", config=cfg)
        exact, s = _exact(x, pa, None)
        err = (y.double() - exact).abs()
        assert bool((err <= 2.0**-7 * exact.abs() + 1e-6 * s + 1e-30).all())


def test_tma_configs_are_checked_and_fall_back_under_the_interpreter():
    with pytest.raises(ValueError, match="tma"):
        A8W8Config(16, 64, 128, swap=True, tma=True).check()
    pa = pack_a8w8(_weight("int8", False, 40, 130))
    x = _x(3, 130, torch.bfloat16, seed=2)
    y = a8w8_matmul(x, pa, None, backend="triton", config=A8W8Config(16, 32, 128, tma=True))
    exact, s = _exact(x, pa, None)
    assert bool(((y.double() - exact).abs() <= 2.0**-7 * exact.abs() + 1e-6 * s + 1e-30).all())


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_one_pass_and_two_pass_rows_give_the_reference_codes(fmt, monkeypatch):
    from lowbit.kernels import act_quant

    x = _x(3, 700, torch.float16, seed=11)
    ref = quantize_activation_reference(x, fmt)
    for limit in (16384, 0):  # one pass (the row in registers), then two passes
        monkeypatch.setattr(act_quant, "ONE_PASS_MAX_K", limit)
        codes, scales = quantize_activation(x, fmt)
        assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]), limit
