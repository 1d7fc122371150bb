"""W4A8 (a8w4-fp8-mxfp4) under Triton's CPU interpreter: the fold of an MXFP4 weight into
E4M3 codes times a power-of-two row scale, bit for bit and exact (decoded with
ml_dtypes, independent of torch's FP8 cast); both strategies of ``w4a8_matmul`` against
the exact float64 product of the FP8-quantized x and the MXFP4 weight; what cannot fold;
and the weight-only kernels' float32 output that the upcast strategy uses."""

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit import quantize_tensor
from lowbit.formats import fake_quantize
from lowbit.kernels import pack_weight, weight_only_matmul
from lowbit.kernels.config import WeightOnlyConfig
from lowbit.kernels.packing import kernel_weight
from lowbit.kernels.ops import w4a8_linear
from lowbit.kernels.w4a8 import (FOLD_MIN_M, choose_strategy, fold_weight, fold_weight_reference, pack_w4a8,
                                 fold_exponents, tuned_recipes, w4a8_matmul)

from .conftest import _wide_activations as _x
from .test_a8w8 import EPS


def _weight(n, k, seed, span=12, zeros=True):
    """An MXFP4 weight whose rows' blocks span up to ``span`` binary exponents, with an
    all-zero block, an all-zero row and negative zeros (``zeros``)."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-k // 32)
    w = torch.randn(n, nb * 32, generator=g).reshape(n, nb, 32)
    w = w / w.abs().amax(-1, keepdim=True)
    w[:, :, 0] = 1  # each block's amax in its first element (which every K keeps)
    exps = torch.randint(-span, 1, (n, nb, 1), generator=g).float()
    exps[:, 0] = 0  # every row reaches its top exponent, and its bottom one
    exps[:, -1] = -span
    # block amax 5 * 2^e: its E8M0 exponent is e + 127 (floor rule), so rows span exactly ``span``
    w = (w * 5 * torch.exp2(exps)).reshape(n, nb * 32)[:, :k].contiguous()
    if not zeros:
        return quantize_tensor(w, "mxfp4")
    w[0] = 0
    if n > 2:
        w[2, :32] = 0
        w[2, 32:40] = -0.0
    return quantize_tensor(w, "mxfp4")


def _e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """float64 values of E4M3 bit patterns, decoded by ml_dtypes."""
    return torch.from_numpy(codes.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float64))


@pytest.mark.parametrize("n,k,span", [(37, 200, 14), (5, 33, 3), (70, 1024, 14), (9, 129, 0)])
def test_fold_is_exact_and_bit_for_bit_the_reference(n, k, span):
    qt = _weight(n, k, seed=n + k, span=span)
    pw = pack_w4a8(qt, dtype=None)
    assert pw.fold_unsupported is None
    pa = fold_weight(pw)
    assert pa.codes.shape == (n, pw.kq) and pa.fmt == "fp8_e4m3" and not pa.blockwise
    assert torch.equal(pa.codes, fold_weight_reference(pw))
    assert torch.equal(fold_weight(pw, (16, 64, 4)).codes, pa.codes)  # another tiling, the same bytes
    assert bool((pa.codes[:, k:] == 0).all())  # the K padding
    # exact: the codes' values times the row scales are the MXFP4 weight, -0.0 kept
    values = _e4m3_values(pa.codes[:, :k]) * pa.scales.double()[:, None]
    w = qt.dequantize().double()
    assert torch.equal(values, w)
    assert torch.equal(torch.signbit(values), torch.signbit(w))


@pytest.mark.parametrize("k", [200, 33, 96])
def test_row_exponents_are_the_largest_over_blocks_with_a_nonzero_code(k):
    from lowbit.formats.pack import unpack_codes

    w = _weight(9, k, seed=k).dequantize()
    w[3, :32] = 0
    w[3, 1:32:2] = 10.0  # the row's top block holds codes in odd positions only (high nibbles)
    qt = quantize_tensor(w, "mxfp4")
    emax, why = fold_exponents(qt.codes, qt.scales)
    assert int(emax[3]) == int(qt.scales[3, 0]) > int(qt.scales[3, 1:].max())
    nb = qt.scales.shape[1]
    mags = torch.nn.functional.pad(unpack_codes(qt.codes, 4, k) & 7, (0, nb * 32 - k)).reshape(9, nb, 32)
    live = (mags != 0).any(-1)
    for r in range(9):
        e = qt.scales[r].int()[live[r]]
        assert int(emax[r]) == (int(e.max()) if e.numel() else 127)
    assert why is None


def test_rows_spanning_more_than_fourteen_exponents_do_not_fold():
    w = torch.randn(4, 96)
    w[1, 64:] *= 2.0**-16  # a third block 2^-16 below the row's first ones
    qt = quantize_tensor(w, "mxfp4")
    pw = pack_w4a8(qt, dtype=torch.bfloat16)
    assert pw.fold_unsupported is not None and "row 1" in pw.fold_unsupported
    with pytest.raises(ValueError, match="cannot fold exactly"):
        fold_weight(pw)
    assert choose_strategy(10 * FOLD_MIN_M, pw) == "upcast"
    x = _x(FOLD_MIN_M, 96, torch.bfloat16, seed=1)
    y = w4a8_matmul(x, pw)  # auto: the upcast strategy, still the exact product
    _check(y, x, qt, None)


def test_a_nan_block_scale_does_not_fold():
    w = torch.randn(3, 64)
    w[2, 5] = float("nan")
    pw = pack_w4a8(quantize_tensor(w, "mxfp4"), dtype=None)
    assert pw.fold_unsupported is not None and "NaN" in pw.fold_unsupported


def _check(y, x, qt, bias):
    dtype = x.dtype
    assert y.dtype == dtype and y.shape == (x.shape[0], qt.shape[0])
    a = fake_quantize(x.float(), "fp8_e4m3", granularity="token").double()
    wv = qt.dequantize().double()
    b = 0 if bias is None else bias.double()
    exact = a @ wv.T + b
    s = a.abs() @ wv.abs().T + (0 if bias is None else bias.double().abs())
    err = (y.double() - exact).abs()
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-6 * s + 1e-30).all()), float((err / s.clamp(min=1e-30)).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("strategy", ["fold", "upcast"])
@pytest.mark.parametrize("m,n,k", [(1, 37, 200), (3, 70, 1024), (18, 33, 129)])
def test_w4a8_matmul_is_the_exact_product(dtype, strategy, m, n, k):
    # fp16: no zero blocks (their exponent is outside the fp16 weight-only kernels' range)
    qt = _weight(n, k, seed=m * n + k, zeros=dtype == torch.bfloat16)
    pw = pack_w4a8(qt, dtype=dtype)
    x = _x(m, k, dtype, seed=k + m)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) if m % 2 else None
    y = w4a8_matmul(x, pw, bias, backend="triton", strategy=strategy)
    _check(y, x, qt, bias)
    ref = w4a8_matmul(x, pw, bias, backend="reference")
    _check(ref, x, qt, bias)


def test_auto_strategy_folds_from_fold_min_m_rows():
    qt = _weight(20, 160, seed=3)
    pw = pack_w4a8(qt, dtype=torch.bfloat16)
    assert choose_strategy(FOLD_MIN_M - 1, pw) == "upcast" and choose_strategy(FOLD_MIN_M, pw) == "fold"
    x = _x(FOLD_MIN_M, 160, torch.bfloat16, seed=4).reshape(2, FOLD_MIN_M // 2, 160)  # leading dims kept
    y = w4a8_matmul(x, pw)
    assert y.shape == (2, FOLD_MIN_M // 2, 20)
    _check(y.reshape(FOLD_MIN_M, 20), x.reshape(FOLD_MIN_M, 160), qt, None)


def test_weights_the_weight_only_kernels_refuse_fold_at_every_m():
    qt = _weight(12, 64, seed=8)  # a zero row: E8M0 exponents below the fp16 kernels' range
    pw = pack_w4a8(qt, dtype=torch.float16)
    assert pw.upcast_unsupported is not None and choose_strategy(1, pw) == "fold"
    x = _x(1, 64, torch.float16, seed=9)
    _check(w4a8_matmul(x, pw), x, qt, None)
    with pytest.raises(ValueError, match="upcast strategy cannot"):
        w4a8_matmul(x, pw, strategy="upcast")
    w = torch.randn(4, 96)
    w[1, 64:] *= 2.0**-16
    w[2] = 0
    neither = pack_w4a8(quantize_tensor(w, "mxfp4"), dtype=torch.float16)
    with pytest.raises(ValueError, match="no W4A8 strategy"):
        w4a8_matmul(torch.randn(2, 96).half(), neither)


def test_custom_op_runs_the_same_product():
    qt = _weight(21, 96, seed=5, zeros=False)
    pw = pack_w4a8(qt, dtype=torch.float16)
    x = _x(4, 96, torch.float16, seed=6)
    bias = torch.randn(21).half()
    y = w4a8_linear(x, pw, bias)
    assert torch.equal(y, w4a8_matmul(x, pw, bias, backend="triton"))
    with pytest.raises(ValueError, match="weight-only layout"):
        w4a8_linear(x, pack_w4a8(qt, dtype=None))


def test_w4a8_refuses_what_it_cannot_run():
    qt = _weight(8, 64, seed=7)
    pw = pack_w4a8(qt, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        w4a8_matmul(torch.randn(2, 64), pw)
    with pytest.raises(ValueError, match="features"):
        w4a8_matmul(torch.randn(2, 65).bfloat16(), pw)
    with pytest.raises(ValueError, match="strategy"):
        w4a8_matmul(torch.randn(2, 64).bfloat16(), pw, strategy="fast")
    with pytest.raises(ValueError, match="packed for"):  # the weight-only layout is for bf16
        w4a8_matmul(torch.randn(2, 64).half(), pw, strategy="upcast")
    with pytest.raises(ValueError, match="mxfp4"):
        pack_w4a8(quantize_tensor(torch.randn(8, 64), "nvfp4"))


@pytest.mark.parametrize("fmt,opts,cfg", [
    ("mxfp4", {}, None), ("mxfp4", {}, WeightOnlyConfig(16, 32, split_k=3)),
    ("int4", {"group_size": 32}, WeightOnlyConfig(16, 64, split_k=3, mode="swap")),
    ("fp8_e4m3", {}, WeightOnlyConfig(16, 32, mode="gemm")),
])
def test_weight_only_float32_output_is_the_unrounded_sum(fmt, opts, cfg):
    g = torch.Generator().manual_seed(11)
    qt = quantize_tensor(torch.randn(40, 384, generator=g), fmt, **opts)
    pw = pack_weight(qt, dtype=torch.bfloat16)
    x = torch.randn(3, 384, generator=g).bfloat16()
    bias = torch.randn(40, generator=g).bfloat16()
    y = weight_only_matmul(x, pw, bias, backend="triton", config=cfg, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    wv = kernel_weight(pw).double()  # the kernels' weight values
    exact = x.double() @ wv.T + bias.double()
    s = x.double().abs() @ wv.abs().T
    assert float(((y.double() - exact).abs() / s).max()) < 1e-6  # float32 sums, not rounded to bf16
    ref = weight_only_matmul(x, pw, bias, backend="reference", out_dtype=torch.float32)
    assert ref.dtype == torch.float32
    if fmt == "mxfp4":  # the reference's weight is the canonical one, the kernels' where that is exact
        assert float(((ref.double() - exact).abs() / s).max()) < 1e-6
    with pytest.raises(ValueError, match="out_dtype"):
        weight_only_matmul(x, pw, bias, out_dtype=torch.float16)


def test_tune_covers_the_recipes_whose_kernels_w4a8_runs():
    assert tuned_recipes("a8w4-fp8-mxfp4") == ("a8w8-fp8", "a16w4-mxfp4")
    assert tuned_recipes("a8w4-fp8-mxfp4-awq") == ("a8w8-fp8", "a16w4-mxfp4")
    assert tuned_recipes("a8w4-mxfp4") is None and tuned_recipes("a8w8-fp8") is None
