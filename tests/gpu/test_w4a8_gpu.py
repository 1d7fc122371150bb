"""W4A8 (a8w4-fp8-mxfp4) compiled on CUDA (run on the H200: `pytest -m gpu tests/gpu`):
the fold bit for bit against its torch reference and exact (the codes' values times the
row scales are the MXFP4 weight), both strategies against the float64 product of the
FP8-quantized x and the weight on real and odd shapes, QuantLinear routing, CUDA-graph
capture and torch.compile."""

import pytest
import torch
from torch import nn

from lowbit import quantize_tensor
from lowbit.kernels.act_quant import quantize_activation_reference
from lowbit.kernels.ops import w4a8_linear
from lowbit.kernels.w4a8 import FOLD_MIN_M, FOLD_TILE, fold_weight, fold_weight_reference, pack_w4a8, w4a8_matmul
from lowbit.nn.linear import QuantLinear

from .conftest import check_graph_and_compile
from .conftest import wide_cuda_activations as _x

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_kernels")]
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SUM_TOL = {"fold": 2.0**-9, "upcast": 1e-6}  # the FP8 MMA keeps about 14 bits (test_a8w8_gpu)


def _weight(n, k, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    w[: n // 3, : k // 5] *= 64  # rows whose blocks span several exponents
    return quantize_tensor(w, "mxfp4")


@pytest.mark.parametrize("tile", [FOLD_TILE, (16, 64, 4), (32, 64, 8)])
@pytest.mark.parametrize("n,k", [(28672, 4096), (1000, 1111), (8192, 28672)])
def test_fold_is_bit_for_bit_the_reference_and_exact(n, k, tile):
    qt = _weight(n, k)
    pw = pack_w4a8(qt, dtype=None)
    assert pw.fold_unsupported is None
    pa = fold_weight(pw, tile)
    assert torch.equal(pa.codes, fold_weight_reference(pw))
    values = pa.codes[:, :k].view(torch.float8_e4m3fn).double() * pa.scales.double()[:, None]
    assert torch.equal(values, qt.dequantize().double())


def _check(x, qt, y, strategy, bias=None):
    codes, sa = quantize_activation_reference(x, "fp8_e4m3")
    a = codes.view(torch.float8_e4m3fn).double()[:, : qt.shape[1]] * sa.double()[:, None]
    wd = qt.dequantize().double()
    exact, s = a @ wd.T, a.abs() @ wd.abs().T
    if bias is not None:
        exact, s = exact + bias.double(), s + bias.double().abs()
    err = (y.double() - exact).abs()
    bound = EPS[y.dtype] * exact.abs() + SUM_TOL[strategy] * s + 1e-30
    worst = float((err / s.clamp(min=1e-30)).max())
    assert bool((err <= bound).all()), f"{int((err > bound).sum())} elements off, max normalised error {worst:.3g}"


@pytest.mark.parametrize("strategy", ["fold", "upcast"])
@pytest.mark.parametrize("m", [1, 16, 77, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_both_strategies_on_real_and_odd_shapes(strategy, m, dtype):
    for n, k in ((28672, 4096), (1000, 1111)):
        qt = _weight(n, k, seed=m)
        pw = pack_w4a8(qt, dtype=dtype)
        x = _x(m, k, dtype, seed=m)
        bias = torch.randn(n, device="cuda").to(dtype) if n == 1000 else None
        y = w4a8_matmul(x, pw, bias, strategy=strategy)
        assert y.dtype == dtype and y.shape == (m, n)
        _check(x, qt, y, strategy, bias)


def test_auto_strategy_and_the_custom_op_in_a_cuda_graph_and_torch_compile():
    qt = _weight(2048, 1024)
    pw = pack_w4a8(qt, dtype=torch.bfloat16)
    for m in (8, FOLD_MIN_M):
        x = _x(m, 1024, torch.bfloat16, seed=m)
        y0 = check_graph_and_compile(lambda t: w4a8_linear(t, pw), x, _x(m, 1024, torch.bfloat16, seed=m + 1))
        _check(x, qt, y0, "fold" if m >= FOLD_MIN_M else "upcast")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 300])
def test_quantlinear_runs_the_w4a8_op(dtype, m):
    torch.manual_seed(0)
    lin = nn.Linear(1024, 768, bias=True, device="cuda")
    q = QuantLinear.from_linear(lin, "a8w4-fp8-mxfp4").to(dtype)
    x = torch.randn(2, m, 1024, device="cuda", dtype=dtype)
    assert q._w4a8_applies(x)
    y = q(x)
    assert q._pw_cache is not None and q._pw_cache[0][0] == ("w4a8", dtype), "the W4A8 path was not taken"
    q.backend = "reference"
    y_ref = q(x)
    s = x.float().abs() @ q.dequantized_weight(torch.float32).abs().t()
    err = float((y.float() - y_ref.float()).abs().max() / s.max())
    assert err <= (2**-7 if dtype == torch.bfloat16 else 2**-9), err
