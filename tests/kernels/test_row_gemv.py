"""The one-token row GEMV (``_row_gemv_triton``) under Triton's CPU interpreter: 8-bit
weights read in their canonical [N, K] bytes, against the exact product (float64), for
weight-only int8 (symmetric, affine) and FP8 (E4M3, E5M2; per channel, per tensor) and
for A8W8 (INT8 by dp4a, FP8); odd N, K not a multiple of the step, both dtypes, bias."""

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.kernels import WeightOnlyConfig, dispatch, pack_weight, weight_only_matmul
from lowbit.kernels.a8w8 import A8W8Config, a8w8_matmul, pack_a8w8, plan_a8w8
from lowbit.kernels.ops import weight_only_linear
from lowbit.kernels.packing import kernel_weight, row_supported

from .conftest import _wide_activations as _x
from .test_a8w8 import EPS, _exact

WEIGHTS = {
    "int8-sym": ("int8", {}),
    "int8-affine": ("int8", {"symmetric": False}),
    "fp8-e4m3": ("fp8_e4m3", {}),
    "fp8-e5m2-tensor": ("fp8_e5m2", {"granularity": "tensor"}),
}
ROW = {"2x256": WeightOnlyConfig(1, 2, 1, 2, 1, "row", block_k=256),
       "4x128": WeightOnlyConfig(1, 4, 1, 1, 1, "row", block_k=128),
       "1x1024": WeightOnlyConfig(1, 1, 1, 4, 1, "row", block_k=1024)}


def _w(n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: n // 3] *= 8  # rows of different scales
    return w


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("n,k", [(37, 300), (130, 512), (5, 1100)])
@pytest.mark.parametrize("cfg", list(ROW))
def test_weight_only_row_gemv_equals_the_exact_product(name, n, k, cfg):
    fmt, opts = WEIGHTS[name]
    dtype = torch.bfloat16 if (n + k) % 2 else torch.float16
    pw = pack_weight(quantize_tensor(_w(n, k), fmt, **opts), dtype=dtype)
    assert pw.row_codes is not None and pw.row_codes.data_ptr() == pw.qtensor.codes.data_ptr()  # no copy
    x = _x(1, k, dtype, seed=n)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype) if n % 2 else None
    y = weight_only_matmul(x, pw, bias, backend="triton", config=ROW[cfg])
    kw = kernel_weight(pw, rounded=False).double()
    exact = x.double() @ kw.T + (0 if bias is None else bias.double())
    scale = x.double().abs() @ kw.abs().T + (0 if bias is None else bias.double().abs())
    err = (y.double() - exact).abs()
    # the output's rounding to the dtype, plus float32 sums (and the affine x-sum term)
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-5 * scale + 1e-30).all()), float((err / scale).max())
    ref = weight_only_matmul(x, pw, bias, backend="reference")
    assert float((y.float() - ref.float()).abs().max()) <= 2 * EPS[dtype] * float(scale.max())


def test_auto_picks_the_row_gemv_at_one_token_and_the_custom_op_carries_the_rows(monkeypatch):
    pw = pack_weight(quantize_tensor(_w(70, 256), "int8"), dtype=torch.bfloat16)
    p = dispatch.plan(1, 70, 256, pw, torch.device("cpu"), torch.bfloat16)
    assert p.config.mode == "row" and p.source == "row"
    assert dispatch.plan(2, 70, 256, pw, torch.device("cpu"), torch.bfloat16).config.mode != "row"
    from lowbit.kernels import ops

    seen = []
    real = ops.weight_only_matmul
    monkeypatch.setattr(ops, "weight_only_matmul", lambda x, w, b, backend: seen.append(w) or real(x, w, b, backend))
    x = _x(1, 256, torch.bfloat16)
    weight_only_linear(x, pw)
    assert seen and seen[0].row_codes is pw.row_codes
    y_row = weight_only_matmul(x, pw, backend="triton", config=dispatch.ROW_CONFIG)
    y_gemv = weight_only_matmul(x, pw, backend="triton", config=WeightOnlyConfig(1, 64, 1, 2, 3, "gemv"))
    assert float((y_row.float() - y_gemv.float()).abs().max()) <= 2**-7 * float(y_gemv.float().abs().max())


def test_row_mode_is_refused_where_it_cannot_run():
    pw4 = pack_weight(quantize_tensor(_w(16, 256), "int4", group_size=128))
    assert pw4.row_codes is None and "8-bit" in row_supported(pw4.layout)
    with pytest.raises(ValueError, match="mode 'row'"):
        WeightOnlyConfig(1, 2, 1, 2, 1, "row").check(pw4)
    pwg = pack_weight(quantize_tensor(_w(16, 256), "int8", group_size=128))
    assert pwg.row_codes is None and "one scale per row" in row_supported(pwg.layout)
    pw8 = pack_weight(quantize_tensor(_w(16, 256), "int8"))
    for bad in (WeightOnlyConfig(1, 3, 1, 2, 1, "row"), WeightOnlyConfig(1, 2, 2, 2, 1, "row"),
                WeightOnlyConfig(1, 2, 1, 2, 1, "row", block_k=100)):
        with pytest.raises(ValueError, match="row"):
            bad.check(pw8)
    with pytest.raises(ValueError, match="one token"):
        weight_only_matmul(_x(2, 256, torch.bfloat16), pw8, backend="triton", config=dispatch.ROW_CONFIG)
    # a tuned row entry is ignored for a weight without its rows (kernel tensors only)
    bare = pack_weight(quantize_tensor(_w(16, 256), "int8"))
    object.__setattr__(bare, "row_codes", None)
    p = dispatch.Plan("triton", dispatch.ROW_CONFIG, "tuned", "")
    assert dispatch._usable(p, bare) is None and dispatch._usable(p, pw8) is p


def test_packed_weight_to_keeps_sharing_the_qtensor_codes():
    pw = pack_weight(quantize_tensor(_w(8, 128), "fp8_e4m3")).to("cpu")
    assert pw.row_codes.data_ptr() == pw.qtensor.codes.data_ptr()


A8_ROW = {"2x256": A8W8Config(1, 2, 256, 1, 2, 1, row=True), "1x1024": A8W8Config(1, 1, 1024, 1, 4, 1, row=True)}


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("n,k", [(37, 300), (131, 640)])
@pytest.mark.parametrize("cfg", list(A8_ROW))
def test_a8w8_row_gemv_equals_the_exact_product(fmt, n, k, cfg):
    dtype = torch.bfloat16 if n % 2 else torch.float16
    g = torch.Generator().manual_seed(n)
    pa = pack_a8w8(quantize_tensor(torch.randn(n, k, generator=g) * 0.05, fmt, granularity="channel"))
    x = _x(1, k, dtype, seed=k)
    bias = torch.randn(n, generator=g).to(dtype) if k % 3 else None
    y = a8w8_matmul(x, pa, bias, backend="triton", config=A8_ROW[cfg])
    exact, s = _exact(x, pa, bias)
    err = (y.double() - exact).abs()
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-6 * s + 1e-30).all()), float((err / s).max())


def test_a8w8_plan_picks_rows_for_one_int8_token_only():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    cuda = torch.device("cpu")
    pa = pack_a8w8(quantize_tensor(w, "int8", granularity="channel"))
    assert plan_a8w8(1, pa, cuda, torch.bfloat16).row
    assert not plan_a8w8(2, pa, cuda, torch.bfloat16).row
    pb = pack_a8w8(quantize_tensor(w, "int8", granularity="block", block_shape=(128, 128)))
    assert not plan_a8w8(1, pb, cuda, torch.bfloat16).row
    with pytest.raises(ValueError, match="one token"):
        a8w8_matmul(_x(2, 256, torch.bfloat16), pa, backend="triton", config=A8_ROW["2x256"])
    with pytest.raises(ValueError, match="block_n"):
        A8W8Config(1, 3, 256, 1, 2, 1, row=True).check()
