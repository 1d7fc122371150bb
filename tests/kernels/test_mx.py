"""The MX path under Triton's CPU interpreter: the MX activation quantization kernel
(codes and E8M0 scales bit for bit against lowbit.formats; E2M1 and E4M3 elements
against ml_dtypes) and the tl.dot_scaled GEMM (against the float64 product of its own
dequantized operands), on small odd shapes."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")
ml_dtypes = pytest.importorskip("ml_dtypes")

from lowbit import quantize_tensor  # noqa: E402
from lowbit.kernels.a8w8 import A8W8Config  # noqa: E402
from lowbit.kernels.act_quant import quantize_activation_mx, quantize_activation_mx_reference  # noqa: E402
from lowbit.kernels.mx import _dequantize, mx_matmul, pack_mx  # noqa: E402

from .conftest import _wide_activations as _x  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_activation_codes_and_scales_equal_the_reference(fmt, dtype):
    x = _x(4, 333, dtype, seed=3)
    x[2, 40] = float("nan")
    x[3, 300] = float("-inf")
    codes, scales = quantize_activation_mx(x, fmt)
    ref_codes, ref_scales = quantize_activation_mx_reference(x, fmt)
    assert codes.shape == ref_codes.shape and scales.shape == (4, 384 // 32)
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} code bytes differ"
    assert torch.equal(scales, ref_scales)
    assert int(scales[2, 1]) == 255 and int(scales[3, 9]) == 255  # the NaN/Inf blocks


@pytest.mark.parametrize("fmt,top,emax,np_type,clip", [
    ("mxfp4", 4.0, 2, "float4_e2m1fn", 6.0),
    ("mxfp8_e4m3", 256.0, 8, "float8_e4m3fn", 448.0),
])
def test_elements_of_every_bf16_value_match_ml_dtypes(fmt, top, emax, np_type, clip):
    """Blocks open with `top` (scale exponent floor(log2 top) - emax = 0, so X = 1) and
    hold every bf16 value below 2 * top: the codes are the element rounding itself."""
    bits = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    vals = bits[bits < 2 * top]
    vals = torch.cat([vals, -vals])
    per_block = 31
    nb = -(-vals.numel() // per_block)
    body = torch.zeros(nb * per_block)
    body[: vals.numel()] = vals
    x = torch.cat([torch.full((nb, 1), top), body.reshape(nb, per_block)], 1).reshape(1, -1).to(torch.bfloat16)
    codes, scales = quantize_activation_mx(x, fmt)
    assert bool((scales[0, :nb] == 127).all())
    expect = np.clip(x.float().numpy(), -clip, clip).astype(getattr(ml_dtypes, np_type))
    got = _dequantize(codes, scales, fmt, x.shape[1]).numpy()
    assert np.array_equal(got, expect.astype(np.float32)), f"{int((got != expect.astype(np.float32)).sum())} differ"


PAIRS = [("mxfp4", "mxfp8_e4m3"), ("mxfp4", "mxfp4"), ("mxfp8_e4m3", "mxfp8_e4m3")]
CONFIGS = {"small": A8W8Config(16, 32, 64, split_k=3), "tile": A8W8Config(32, 64, 128)}
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("wfmt,afmt", PAIRS)
@pytest.mark.parametrize("m,n,k", [(1, 97, 200), (17, 64, 333)])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mx_gemm_equals_the_exact_product(wfmt, afmt, m, n, k, cfg):
    dtype = torch.bfloat16 if m == 1 else torch.float16
    g = torch.Generator().manual_seed(n)
    pm = pack_mx(quantize_tensor(torch.randn(n, k, generator=g) * 0.05, wfmt))
    x = _x(m, k, dtype, seed=m + k)
    bias = torch.randn(n, generator=g).to(dtype) if m > 1 else None
    y = mx_matmul(x, pm, afmt, bias, backend="triton", config=CONFIGS[cfg])
    codes, scales = quantize_activation_mx_reference(x, afmt)
    a = _dequantize(codes, scales, afmt, k).double()
    w = _dequantize(pm.codes, pm.scales, pm.fmt, k).double()
    exact, s = a @ w.T, a.abs() @ w.abs().T
    if bias is not None:
        exact, s = exact + bias.double(), s + bias.double().abs()
    err = (y.double() - exact).abs()
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-6 * s + 1e-30).all())


def test_clear_errors():
    pm = pack_mx(quantize_tensor(torch.randn(8, 64), "mxfp4"))
    with pytest.raises(ValueError, match="activation format"):
        mx_matmul(torch.randn(2, 64, dtype=torch.bfloat16), pm, "nvfp4")
    with pytest.raises(ValueError, match="MX kernel layout.*nvfp4"):
        pack_mx(quantize_tensor(torch.randn(8, 64), "nvfp4"))
    with pytest.raises(ValueError, match="tiled"):
        mx_matmul(torch.randn(2, 64, dtype=torch.bfloat16), pm, "mxfp4", config=A8W8Config(16, 64, swap=True))


def test_custom_op_and_leading_dims():
    from lowbit.kernels.ops import mx_linear

    pm = pack_mx(quantize_tensor(torch.randn(40, 96, generator=torch.Generator().manual_seed(1)) * 0.05, "mxfp4"))
    x = _x(6, 96, torch.bfloat16, seed=5).reshape(2, 3, 96)
    y = mx_linear(x, pm, "mxfp8_e4m3")
    assert y.shape == (2, 3, 40)
    ref = mx_matmul(x, pm, "mxfp8_e4m3", backend="reference")
    assert float((y.float() - ref.float()).abs().max()) <= 2.0**-7 * float(ref.float().abs().max())


def test_negative_zero_keeps_its_sign_bit():
    """fp16 rows underflow to -0.0; the reference (and ml_dtypes) code it as E2M1 0x8."""
    x = torch.zeros(2, 64, dtype=torch.float16)
    x[:, 0] = 4.0
    x[:, 1] = -0.0
    x[:, 2] = -0.1
    for fmt in ("mxfp4", "mxfp8_e4m3"):
        codes, scales = quantize_activation_mx(x, fmt)
        ref_codes, ref_scales = quantize_activation_mx_reference(x, fmt)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales), fmt


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit up to NaN payloads: equal values, equal sign bits, NaN where the other is."""
    same = (a == b) | (a.isnan() & b.isnan())
    return bool(same.all()) and bool(((torch.signbit(a) == torch.signbit(b)) | b.isnan()).all())


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_fake_quantize_equals_the_reference(fmt, dtype):
    """The upcast path's activations: lowbit.formats.fake_quantize in x's dtype, bit for
    bit, with NaN/Inf blocks, -0.0 and (bf16) a block of float32-subnormal values."""
    from lowbit.formats import fake_quantize
    from lowbit.kernels.act_quant import fake_quantize_activation_mx

    x = _x(5, 301, dtype, seed=9)
    x[0, 3] = float("nan")
    x[2, 100] = float("inf")
    x[3, :5] = -0.0
    if dtype == torch.bfloat16:
        x[4, 32:64] = torch.randn(32, generator=torch.Generator().manual_seed(2)).to(dtype) * 1e-39
    got = fake_quantize_activation_mx(x, fmt)
    ref = fake_quantize(x, fmt).to(dtype)
    assert got.dtype == dtype and got.shape == x.shape
    assert _nan_equal(got, ref), f"{int(((got != ref) & ~ref.isnan()).sum())} values differ"
    assert bool(got[0, :32].isnan().all()) and not bool(got[0, 32:].isnan().any())


@pytest.mark.parametrize("afmt", ["mxfp8_e4m3", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
def test_mx_upcast_matmul_equals_the_exact_product(afmt, dtype, m):
    """a8w4-/a4w4-mxfp4 without block-scaled MMA: the exactly dequantized MX activations
    times the MXFP4 weight through the weight-only kernel, against float64."""
    from lowbit.kernels.mx import mx_upcast_matmul

    qt, pw, x, bias = _upcast_case("mxfp4", dtype, m)
    n, k = qt.shape
    y = mx_upcast_matmul(x.reshape(1, m, k), pw, afmt, bias, backend="triton")
    assert y.shape == (1, m, n) and y.dtype == dtype
    codes, scales = quantize_activation_mx_reference(x, afmt)
    _assert_near_exact(y[0], _dequantize(codes, scales, afmt, k).double(), qt.dequantize().double(), bias)


def _upcast_case(wfmt, dtype, m, n=70, k=300):
    """(qt, pw, x, bias): an N(0, 0.05) weight [n, k] in wfmt packed for dtype, x [m, k], bias [n]."""
    from lowbit.kernels import pack_weight

    g = torch.Generator().manual_seed(m)
    qt = quantize_tensor(torch.randn(n, k, generator=g) * 0.05, wfmt)
    return qt, pack_weight(qt, dtype=dtype), _x(m, k, dtype, seed=m), torch.randn(n, generator=g).to(dtype)


def _assert_near_exact(y, a, w, bias):
    """y within 2 units in the last place of y's dtype (plus 1e-6 of |a| @ |w|^T + |bias|)
    of the float64 product a @ w^T + bias."""
    exact, s = a @ w.T + bias.double(), a.abs() @ w.abs().T + bias.double().abs()
    eps = 2.0**-7 if y.dtype == torch.bfloat16 else 2.0**-10
    assert bool(((y.double() - exact).abs() <= eps * exact.abs() + 1e-6 * s).all())


def test_mx_fake_quantize_custom_op_keeps_leading_dims():
    from lowbit.formats import fake_quantize
    from lowbit.kernels.ops import mx_fake_quantize

    x = _x(6, 70, torch.bfloat16, seed=1).reshape(2, 3, 70)
    got = mx_fake_quantize(x, "mxfp4")
    assert got.shape == x.shape and got.dtype == x.dtype
    assert _nan_equal(got, fake_quantize(x.reshape(6, 70), "mxfp4").to(x.dtype).reshape(2, 3, 70))
    with pytest.raises(ValueError, match="MX activation format"):
        mx_fake_quantize(x, "nvfp4")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(5, 301), (1, 4096), (3, 16)])
def test_nvfp4_fake_quantize_equals_the_reference(dtype, m, k):
    """NVFP4 activations (a4w4-nvfp4 without FP4 tensor cores): e2m1 * s_b in x's dtype and
    the tensor scale s_t, whose float32 product is lowbit.formats.fake_quantize(x, "nvfp4")
    bit for bit (signs of -0.0 included), for a wide-range x with a zero block."""
    from lowbit.formats import fake_quantize
    from lowbit.kernels.act_quant import fake_quantize_activation_nvfp4

    x = _x(m, k, dtype, seed=k)
    x[0, :16] = 0.0
    x[-1, -3:] = -0.0
    for backend in ("triton", "reference"):
        local, s_t = fake_quantize_activation_nvfp4(x, backend)
        assert local.dtype == dtype and local.shape == x.shape and s_t.shape == (1,) and s_t.dtype == torch.float32
        got = local.float() * s_t
        ref = fake_quantize(x, "nvfp4").float()
        assert torch.equal(got, ref), f"{backend}: {int((got != ref).sum())} values differ"
        assert torch.equal(torch.signbit(got), torch.signbit(ref))
    local, s_t = fake_quantize_activation_nvfp4(torch.zeros(2, 40, dtype=dtype))  # s_t = 0: all zero
    assert float(s_t) == 0.0 and not bool(local.any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5])
def test_nvfp4_upcast_matmul_equals_the_exact_product(dtype, m):
    """a4w4-nvfp4 without FP4 tensor cores: the activations' e2m1 * s_b times the NVFP4
    weight through the weight-only kernel, both tensor scales on the sums, against float64;
    and the custom op keeps leading dimensions."""
    from lowbit.formats import fake_quantize
    from lowbit.kernels import pack_weight
    from lowbit.kernels.mx import nvfp4_upcast_matmul
    from lowbit.kernels.ops import nvfp4_fake_quantize

    qt, pw, x, bias = _upcast_case("nvfp4", dtype, m)
    n, k = qt.shape
    y = nvfp4_upcast_matmul(x.reshape(1, m, k), pw, bias, backend="triton")
    assert y.shape == (1, m, n) and y.dtype == dtype
    a = fake_quantize(x, "nvfp4").double()
    _assert_near_exact(y[0], a, qt.dequantize().double(), bias)
    local, s_t = nvfp4_fake_quantize(x.reshape(1, m, k))
    assert local.shape == (1, m, k) and torch.equal(local.float() * s_t, a.float().reshape(1, m, k))
    with pytest.raises(ValueError, match="NVFP4 weight"):
        nvfp4_upcast_matmul(x, pack_weight(quantize_tensor(torch.randn(n, k), "mxfp4"), dtype=dtype))
