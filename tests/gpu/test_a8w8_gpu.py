"""The A8W8 path compiled on CUDA (run on the H200: `pytest -m gpu tests/gpu`):
activation codes and scales bit for bit against lowbit.formats (and the FP8
conversion against ml_dtypes), the GEMM against the float64 product of its own
operands on real and odd shapes for every config family, QuantLinear with a8w8
recipes, CUDA-graph capture and torch.compile."""

import numpy as np
import pytest
import torch

from lowbit import quantize_
from lowbit import quantize_tensor
from lowbit.kernels.a8w8 import (A8W8Config, a8w8_matmul, default_a8w8_config, dequantized_weight, pack_a8w8,
                                  plan_a8w8)
from lowbit.kernels.act_quant import quantize_activation, quantize_activation_reference
from lowbit.kernels.ops import a8w8_linear

from .conftest import check_graph_and_compile
from .conftest import wide_cuda_activations as _x  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_kernels")]
EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(7, 333), (300, 4096)])
def test_activation_codes_and_scales_bit_exact(fmt, group, dtype, m, k):
    x = _x(m, k, dtype, seed=k)
    iscale = torch.rand(k, device="cuda") * 3 + 0.25 if m == 7 else None
    codes, scales = quantize_activation(x, fmt, group, iscale)
    ref_codes, ref_scales = quantize_activation_reference(x, fmt, group, iscale)
    assert torch.equal(codes, ref_codes), f"{int((codes != ref_codes).sum())} codes differ"
    assert torch.equal(scales, ref_scales)


def test_fp8_conversion_of_every_bf16_value_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    pos = torch.arange(0, 0x43E1, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    vals = torch.cat([pos, -pos]).float()
    k = 1023
    rows = -(-vals.numel() // (k - 1))
    x = torch.zeros(rows * (k - 1))
    x[: vals.numel()] = vals
    x = torch.cat([torch.full((rows, 1), 448.0), x.reshape(rows, k - 1)], 1).to(torch.bfloat16)
    codes, scales = quantize_activation(x.cuda(), "fp8_e4m3")
    assert bool((scales == 1).all())
    expect = np.clip(x.float().numpy(), -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    got = codes[:, :k].cpu().numpy()
    assert np.array_equal(got, expect), f"{int((got != expect).sum())} codes differ"


def _weight(fmt, blockwise, n, k, seed=3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    w[: n // 3, : k // 5] *= 8
    opts = {"granularity": "block", "block_shape": (128, 128)} if blockwise else {"granularity": "channel"}
    return quantize_tensor(w, fmt, **opts)


# Hopper's FP8 MMA adds products with about 14 bits kept (DeepSeek-V3 report; the
# kernel promotes partial sums to float32 every 128 along K, which bounds how the
# truncations add up): an FP8 product's error is bounded relative to S = |a| @ |w|^T.
# INT8 accumulates exactly in int32.
SUM_TOL = {"fp8_e4m3": 2.0**-9, "int8": 1e-6}


def _exact(x, pa, bias=None, iscale=None):
    codes, sa = quantize_activation_reference(x, pa.fmt, pa.act_group, iscale)
    a = codes.view(torch.float8_e4m3fn).double() if pa.fmt == "fp8_e4m3" else codes.double()
    a = a * (sa.double()[:, None] if pa.act_group is None else sa.double().repeat_interleave(128, 1))
    wd = dequantized_weight(pa).double()
    exact = a[:, : pa.k] @ wd.T
    s = a[:, : pa.k].abs() @ wd.abs().T
    if bias is not None:
        exact, s = exact + bias.double(), s + bias.double().abs()
    return exact, s, codes, sa


def _check(x, pa, y, bias=None, iscale=None):
    exact, s, _, _ = _exact(x, pa, bias, iscale)
    err = (y.double() - exact).abs()
    bound = EPS[y.dtype] * exact.abs() + SUM_TOL[pa.fmt] * s + 1e-30
    worst = float((err / s.clamp(min=1e-30)).max())
    assert bool((err <= bound).all()), f"{int((err > bound).sum())} elements off, max normalised error {worst:.3g}"


CONFIGS = [
    None,  # the dispatcher's
    A8W8Config(16, 128, 128, split_k=4, num_warps=4, num_stages=4, swap=True),
    A8W8Config(64, 128, 64, split_k=1, num_warps=4, num_stages=4),
    A8W8Config(128, 256, 128, split_k=1, num_warps=8, num_stages=3),
    A8W8Config(128, 128, 128, split_k=2, num_warps=8, num_stages=4),
    A8W8Config(128, 256, 128, split_k=1, num_warps=8, num_stages=3, tma=True),
    A8W8Config(128, 128, 128, split_k=1, num_warps=8, num_stages=4, tma=True),
]


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("blockwise", [False, True])
@pytest.mark.parametrize("m", [1, 16, 77, 1024])
@pytest.mark.parametrize("ci", range(len(CONFIGS)))
def test_gemm_on_real_and_odd_shapes(fmt, blockwise, m, ci):
    cfg = CONFIGS[ci]
    if blockwise and cfg is not None and cfg.block_n == 256 and cfg.block_m == 128:
        pytest.skip("two float32 accumulators of 128 x 256 do not fit the registers")
    for n, k in ((4096, 4096), (1000, 1111)):
        dtype = torch.bfloat16 if n == 4096 else torch.float16
        pa = pack_a8w8(_weight(fmt, blockwise, n, k))
        x = _x(m, k, dtype, seed=m)
        bias = torch.randn(n, device="cuda").to(dtype) if n != 4096 else None
        y = a8w8_matmul(x, pa, bias, config=cfg)
        _check(x, pa, y, bias)


@pytest.mark.parametrize("m", [1, 1024])
def test_fp8_error_is_that_of_cublas_on_the_same_operands(m):
    """An independent FP8 GEMM on the same tensor cores (cuBLAS, row-wise scales)
    given the same codes and scales. Measured on the H200 (K = 4096, M = 1), the error
    beyond the output rounding, / S: lowbit 1.3e-4, cuBLAS 3.8e-5 without fast
    accumulation (it promotes its sums more often, at a cost in speed). lowbit's
    FP8 sums restart every 4096 along K, as cuBLAS's fast-accumulation mode (what
    serving engines use) does not: its error must be no larger than that mode's."""
    n = k = 4096
    pa = pack_a8w8(_weight("fp8_e4m3", False, n, k))
    x = _x(m, k, torch.bfloat16, seed=m)
    exact, s, codes, sa = _exact(x, pa)
    y = a8w8_matmul(x, pa)
    y_cublas = torch._scaled_mm(codes.view(torch.float8_e4m3fn), pa.codes.view(torch.float8_e4m3fn).t(),
                                scale_a=sa.reshape(m, 1), scale_b=pa.scales.reshape(1, n),
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    def beyond_rounding(out):
        return float(((out.double() - exact).abs() - 2.0**-8 * exact.abs()).clamp(min=0).div(s.clamp(min=1e-30)).max())

    ours, theirs = beyond_rounding(y), beyond_rounding(y_cublas)
    print(f"M={m}: max error beyond the output rounding / S: lowbit {ours:.3g}, cuBLAS fast accumulation {theirs:.3g}")
    assert ours <= 1.5 * theirs + 1e-5


def test_quantlinear_runs_a8w8_recipes_through_the_kernels():
    from torch import nn

    for recipe in ("a8w8-fp8", "a8w8-int8", "a8w8-fp8-b128"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(512, 384), nn.GELU(), nn.Linear(384, 256, bias=False)).cuda().to(torch.bfloat16)
        quantize_(m, recipe, progress=False)
        x = torch.randn(5, 9, 512, device="cuda", dtype=torch.bfloat16)
        layer = m[0]
        assert layer._a8w8_applies(x.reshape(-1, 512))
        y = m(x)
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = "reference"
        y_ref = m(x)
        err = float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
        assert err < 2e-2, (recipe, err)


def test_cuda_graph_and_torch_compile():
    pa = pack_a8w8(_weight("fp8_e4m3", False, 2048, 1024))
    check_graph_and_compile(lambda t: a8w8_linear(t, pa), _x(8, 1024, torch.bfloat16),
                            _x(8, 1024, torch.bfloat16, seed=1))


def test_default_rule_is_valid_on_this_gpu():
    for m in (1, 16, 128, 1024, 8192):
        assert default_a8w8_config(m, 28672, 4096, torch.cuda.get_device_properties(0).multi_processor_count).check()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("m,n,k", [(1, 28672, 4096), (16, 8192, 28672), (48, 1000, 1111), (300, 4096, 4096)])
def test_programmatic_dependent_launch_gives_the_same_bits(fmt, m, n, k, monkeypatch):
    """The GEMM launched early (PDL: it prefetches weights, then waits for the codes)
    gives the plain launch's output bit for bit, eagerly and replayed in a CUDA graph."""
    from lowbit.kernels import a8w8 as a8w8_mod

    monkeypatch.setattr(a8w8_mod, "PDL_TILES", 2)
    pa = pack_a8w8(_weight(fmt, False, n, k))
    x = _x(m, k, torch.bfloat16, seed=m)
    cfg = a8w8_mod.plan_a8w8(m, pa, x.device, x.dtype)
    assert a8w8_mod.pdl_tiles(x.device, cfg) == (0 if cfg.tma or cfg.row else 2)  # the row GEMV: a plain launch
    y_pdl = a8w8_linear(x, pa)
    g = torch.cuda.CUDAGraph()
    static_x = x.clone()
    with torch.cuda.graph(g):
        static_y = a8w8_linear(static_x, pa)
    x2 = _x(m, k, torch.bfloat16, seed=m + 1)
    static_x.copy_(x2)
    g.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(a8w8_mod, "PDL_TILES", 0)
    assert torch.equal(y_pdl, a8w8_linear(x, pa))
    assert torch.equal(static_y, a8w8_linear(x2, pa))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("n,k", [(28672, 4096), (8192, 28672), (1000, 1111)])
@pytest.mark.parametrize("cfg", [None, A8W8Config(1, 2, 1024, 1, 2, 1, row=True), A8W8Config(1, 1, 2048, 1, 4, 1, row=True)],
                         ids=["auto", "row-2x1024", "row-1x2048"])
def test_row_gemv_one_token(fmt, n, k, cfg):
    """One token through the row GEMV (INT8: dp4a, exact int32 sums; FP8: float32 sums)."""
    dtype = torch.float16 if n == 1000 else torch.bfloat16
    pa = pack_a8w8(_weight(fmt, False, n, k))
    if cfg is None and fmt == "int8":
        assert plan_a8w8(1, pa, torch.device("cuda"), dtype).row
    x = _x(1, k, dtype, seed=n)
    bias = torch.randn(n, device="cuda").to(dtype) if n == 1000 else None
    _check(x, pa, a8w8_matmul(x, pa, bias, config=cfg), bias)
