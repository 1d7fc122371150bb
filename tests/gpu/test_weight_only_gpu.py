"""weight_only_matmul's kernels on CUDA, on real model shapes, odd shapes, every
mode, and under CUDA-graph capture and torch.compile. Run on the H200:
`pytest -m gpu tests/gpu`.

Two checks per call (as in tests/kernels):
- tight, against the exact product (float64) of x with ``kernel_weight(pw)``,
  the kernels' documented weight values: per element
  EPS * |y_exact| + 1e-5 * (|x| @ |W|^T);
- loose, against ``weight_only_matmul_reference`` (the canonical float32
  dequantization, cuBLAS): max|y - y_ref| / max(|x| @ |W|^T) <= REF_TOL.
And the PTX dequantization itself: ``dequantize_t`` equals ``kernel_weight``
bit for bit, for every format and both dtypes.
"""

import logging

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.kernels import WeightOnlyConfig, dispatch, pack_weight, weight_only_matmul, weight_only_matmul_reference
from lowbit.kernels._weight_only_triton import dequantize_t
from lowbit.kernels.ops import weight_only_linear
from lowbit.kernels.packing import has_f32_gemv, kernel_weight, with_kmajor

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_kernels")]

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
REF_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}

FORMATS = {
    "int4-g128": ("int4", dict(group_size=128)),
    "int4-g32-sym": ("int4", dict(group_size=32, symmetric=True)),
    "int4-g64-intzero": ("int4", dict(group_size=64, zero_point="integer")),
    "int4-channel": ("int4", dict(granularity="channel")),
    "int8-channel": ("int8", {}),
    "int8-g64-affine": ("int8", dict(group_size=64, symmetric=False, scale_dtype=torch.bfloat16)),
    "mxfp4": ("mxfp4", {}),
    "fp8-e4m3-channel": ("fp8_e4m3", {}),
    "fp8-e5m2-b128": ("fp8_e5m2", dict(granularity="block", block_shape=(128, 128))),
    "mxfp8-e4m3": ("mxfp8_e4m3", {}),
    "nvfp4": ("nvfp4", {}),
    "int2-g64": ("int2", dict(group_size=64)),
}


# only in the row GEMV's test (one scale per row, the formats it adds)
ROW_ONLY = {
    "int8-channel-affine": ("int8", dict(symmetric=False)),
    "fp8-e5m2-tensor": ("fp8_e5m2", dict(granularity="tensor")),
}

_PACKED = {}


def packed(name, n, k, dtype=torch.bfloat16):
    """Quantize a random N(0, 0.02) weight once per (format, shape) and pack it on CUDA."""
    key = (name, n, k, dtype)
    if key not in _PACKED:
        fmt, opts = {**FORMATS, **ROW_ONLY}[name]
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        qt = quantize_tensor(w, fmt, **opts)
        del w
        _PACKED[key] = (pack_weight(qt, dtype=dtype), kernel_weight(pack_weight(qt, dtype=dtype)).double())
    return _PACKED[key]


def check(y, x, pw, kw, bias, tag, tight=True):
    """tight=False: only the loose check against the reference (the dequant
    backend's product is cuBLAS's, which may reduce in bf16 like the reference)."""
    y_ref = weight_only_matmul_reference(x, pw, bias)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, tag
    if y.numel() == 0:
        return
    x2 = x.reshape(-1, x.shape[-1]).double()
    exact = x2 @ kw.t()
    s = x2.abs() @ kw.abs().t()
    if bias is not None:
        exact += bias.double()
        s += bias.double().abs()
    exact, s = exact.reshape(y.shape), s.reshape(y.shape)
    err = (y.double() - exact).abs().nan_to_num(float("inf"))
    bound = EPS[y.dtype] * exact.abs() + 1e-5 * s
    excess = err - bound
    worst = int(torch.argmax(excess))
    nmax = float(err.max() / s.max())
    if tight and float(excess.reshape(-1)[worst]) > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), y.shape))
        raise AssertionError(
            f"{tag}: y{list(idx)} = {float(y.double()[idx]):.6g}, exact {float(exact[idx]):.6g}, "
            f"|diff| {float(err[idx]):.3g} > bound {float(bound[idx]):.3g}; "
            f"{int((excess > 0).sum())} of {y.numel()} over; normalised max error {nmax:.3g}"
        )
    ref_err = float((y.double() - y_ref.double()).abs().max() / s.max())
    assert ref_err <= REF_TOL[y.dtype], f"{tag}: normalised error vs the reference {ref_err:.3g}"


def planned(m, pw, kw, dtype, config=None, backend="auto"):
    """(kernel, config, weight values) of the call that runs: the plan's choice when
    neither is forced. A float32 int GEMV (the shipped table picks it at M=1)
    multiplies by q * scale + bias unrounded, the other kernels by kernel_weight."""
    if backend == "auto" and config is None:
        p = dispatch.plan(m, pw.n, pw.k, pw, torch.device("cuda"), dtype)
        backend, config = p.kernel, p.config
    if config is not None and config.int_f32 and config.mode == "gemv" and has_f32_gemv(pw.layout.family, pw.layout.bits):
        kw = kernel_weight(pw, rounded=False)
    if config is not None and config.mode == "row":  # exact code values, the scale on the float32 sums
        kw = kernel_weight(pw, rounded=False)
    if pw.layout.family == "nvfp4" and backend != "dequant":  # exact values, the tensor scale on the sums
        kw = kernel_weight(pw, rounded=False)
    return backend, config, kw


def run(name, n, k, m, dtype=torch.bfloat16, bias=False, config=None, lead=(), backend="auto"):
    pw, kw = packed(name, n, k, dtype)
    g = torch.Generator(device="cuda").manual_seed(m + 1)
    x = torch.randn(*lead, m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    y = weight_only_matmul(x, pw, b, backend=backend, config=config)
    kernel, cfg, kw = planned(x.numel() // k, pw, kw, dtype, config, backend)
    check(y, x, pw, kw, b, f"{name} W[{n}, {k}] x{list(x.shape)} {dtype} {kernel} {cfg}", tight=kernel != "dequant")


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dequantize_kernel_is_bit_exact(name, dtype):
    """The PTX dequantization (dequantize_t shares it with the matmul) gives
    kernel_weight's values bit for bit, on a shape with N and K tails."""
    pw, kw = packed(name, 1000, 1000, dtype)
    got = dequantize_t(pw, dtype).t().double()
    assert int((got != kw).sum()) == 0, f"{name} {dtype}: {int((got != kw).sum())} values differ"


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 4096)], ids=["4096x4096", "28672x4096"])
@pytest.mark.parametrize("m", [1, 16, 128, 1024])
def test_model_shapes(name, n, k, m):
    run(name, n, k, m, bias=(m == 16))


@pytest.mark.parametrize("name", ["int4-g128", "mxfp4", "int8-channel"])
@pytest.mark.parametrize("m", [1, 16])
def test_llama70b_down(name, m):
    """8192x28672: a long K, split-K over many tiles."""
    run(name, 8192, 28672, m)


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32-sym", "int8-channel", "mxfp4", "nvfp4", "fp8-e4m3-channel"])
@pytest.mark.parametrize(
    "n,k,m",
    [(577, 859, 727), (4097, 4000, 3), (4097, 4000, 17), (67, 200, 64), (1000, 4096, 0), (11008, 4096, 5),
     (1536, 576, 1)],
)
def test_odd_shapes(name, n, k, m):
    fp16 = m in (17, 1)  # float16 activations, 3-D input
    run(name, n, k, m, dtype=torch.float16 if fp16 else torch.bfloat16, bias=True, lead=(1,) if fp16 else ())


@pytest.mark.parametrize(
    "config",
    [
        WeightOnlyConfig(1, 32, split_k=8, mode="gemv", num_warps=2, num_stages=2),
        WeightOnlyConfig(1, 128, split_k=1, mode="gemv", num_warps=4),
        WeightOnlyConfig(1, 64, split_k=4, mode="gemv", num_warps=2, int_f32=True),
        WeightOnlyConfig(1, 64, split_k=3, mode="gemv", num_warps=4, int_f32=True, prefetch=2),
        WeightOnlyConfig(1, 32, split_k=6, mode="gemv", num_warps=1, prefetch=2),
        WeightOnlyConfig(16, 64, split_k=8, mode="swap", num_stages=2),
        WeightOnlyConfig(32, 256, split_k=4, mode="swap", num_warps=8),
        WeightOnlyConfig(64, 128, split_k=1, mode="swap", stack=False),
        WeightOnlyConfig(64, 64, split_k=2, mode="gemm"),
        WeightOnlyConfig(128, 256, split_k=1, mode="gemm", num_warps=8, stack=False),
    ],
    ids=lambda c: (f"{c.mode}-bm{c.block_m}-bn{c.block_n}-s{c.split_k}-w{c.num_warps}-"
                   f"{'stack' if c.stack else 'chunks'}{'-f32' if c.int_f32 else ''}-pf{c.prefetch}"),
)
@pytest.mark.parametrize("name", ["int4-g128", "mxfp4", "int8-channel", "nvfp4", "mxfp8-e4m3", "int2-g64"])
def test_explicit_configs(name, config):
    m = 1 if config.mode == "gemv" else 48
    run(name, 4096, 4096, m, bias=True, config=config, backend="triton")


@pytest.mark.parametrize("name", ["int4-g128", "mxfp4", "int8-channel", "nvfp4"])
@pytest.mark.parametrize("m", [1, 16, 128, 1024])
def test_cuda_graph_capture(name, m):
    """Capture the auto call (split-K workspace, dequantized buffer and all) in a CUDA
    graph; replays with new inputs give the eager output bit for bit."""
    n, k = 4096, 4096
    pw, kw = packed(name, n, k)
    static_x = torch.randn(m, k, device="cuda").bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile and warm up outside the graph
            weight_only_matmul(static_x, pw, bias)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = weight_only_matmul(static_x, pw, bias)
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        eager = weight_only_matmul(x, pw, bias)
        assert torch.equal(static_y, eager), f"{name} M={m}: graph replay differs from eager"
        kernel, cfg, kw_run = planned(m, pw, kw, x.dtype)
        check(static_y, x, pw, kw_run, bias, f"graph {name} M={m} {kernel} {cfg}", tight=kernel != "dequant")


def test_auto_plans(caplog):
    pw, _ = packed("int4-g128", 4096, 4096)
    dispatch.forget_loaded_caches()
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        for m in (1, 2, 300, 1024):
            weight_only_matmul(torch.randn(m, 4096, device="cuda").bfloat16(), pw)
    text = caplog.text
    assert "M=1 " in text and "gemv" in text and "swap" in text and "gemm" in text and "dequant" in text
    two, _ = packed("int2-g64", 4096, 4096)
    assert dispatch.plan(16, 4096, 4096, two, torch.device("cuda"), torch.bfloat16).kernel == "dequant"
    nv = pack_weight(quantize_tensor(torch.randn(64, 256, device="cuda"), "mxfp6_e2m3"))  # no kernel
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        weight_only_matmul(torch.randn(2, 256, device="cuda").bfloat16(), nv)
    assert "reference" in caplog.text and "mxfp6_e2m3" in caplog.text
    with pytest.raises(ValueError, match="mxfp6_e2m3"):
        weight_only_matmul(torch.randn(2, 256, device="cuda").bfloat16(), nv, backend="triton")


@pytest.mark.parametrize("m", [1, 16, 1024])
def test_custom_op_under_torch_compile(m):
    pw, kw = packed("int4-g128", 4096, 4096)
    x = torch.randn(m, 4096, device="cuda").bfloat16()
    bias = torch.randn(4096, device="cuda").bfloat16()
    eager = weight_only_matmul(x, pw, bias)
    assert torch.equal(weight_only_linear(x, pw, bias), eager)
    compiled = torch.compile(lambda t: weight_only_linear(t, pw, bias) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager * 2)


@pytest.mark.parametrize("name", ["int4-g128", "int4-channel"])
@pytest.mark.parametrize("n,k,m,dtype", [(4096, 4096, 16, torch.bfloat16), (1000, 1000, 5, torch.float16),
                                         (8192, 28672, 64, torch.bfloat16), (28672, 4096, 130, torch.bfloat16),
                                         (999, 1000, 256, torch.float16)])
def test_kmajor(name, n, k, m, dtype):
    """The K-major kernel (opt-in, packing.with_kmajor) with the dispatcher's config
    (its rule's config also past KMAJOR_MAX_M, where the rule no longer picks it)."""
    pw, kw = packed(name, n, k, dtype)
    kpw = with_kmajor(pw)
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype)
    cfg = dispatch.kmajor_config(m, n, kpw.layout.n_tiles, dispatch.num_sms(x.device))
    if m <= dispatch.KMAJOR_MAX_M:
        assert dispatch.plan(m, n, k, kpw, x.device, dtype).config == cfg
    y = weight_only_matmul(x, kpw, b, backend="triton", config=cfg)
    check(y, x, kpw, kw, b, f"kmajor {name} W[{n}, {k}] M={m} {dtype} {cfg}")


@pytest.mark.parametrize("name", ["int8-channel", "fp8-e4m3-channel", "int8-channel-affine", "fp8-e5m2-tensor"])
@pytest.mark.parametrize("n,k,dtype", [(28672, 4096, torch.bfloat16), (8192, 28672, torch.bfloat16),
                                       (1001, 1111, torch.float16)], ids=["8b", "70b-down", "odd-fp16"])
@pytest.mark.parametrize("config", [None, WeightOnlyConfig(1, 1, 1, 4, 1, "row", block_k=2048),
                                    WeightOnlyConfig(1, 4, 1, 1, 1, "row", block_k=512)],
                         ids=["auto", "row-1x2048-w4", "row-4x512-w1"])
def test_row_gemv(name, n, k, dtype, config):
    """M = 1 on the canonical 8-bit bytes (the plan's choice for these weights)."""
    pw, _ = packed(name, n, k, dtype)
    assert pw.row_codes is not None
    if config is None:
        assert dispatch.plan(1, n, k, pw, torch.device("cuda"), dtype).config.mode == "row"
    run(name, n, k, 1, dtype, bias=True, config=config, backend="auto" if config is None else "triton")
