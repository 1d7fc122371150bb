"""weight_only_matmul's Triton kernels on CUDA, on real model shapes, odd shapes,
and under CUDA-graph capture. Run on the H200: `pytest -m gpu tests/gpu`.

Two checks per call:
- tight, against the exact product of the same operands (x and the weight
  rounded to x's dtype, summed in float64, bias added, rounded once): per
  element EPS * |y_exact| + 1e-4 * (|x| @ |W|^T), as in tests/kernels;
- loose, against ``weight_only_matmul_reference`` (cuBLAS in bf16/fp16, which
  may reduce split-K partial sums in reduced precision): normalised max error
  max|y - y_ref| / max(|x| @ |W|^T) <= NORM_TOL.
"""

import dataclasses
import logging

import pytest
import torch

from lowbit import quantize_tensor
from lowbit.kernels import WeightOnlyConfig, default_config, pack_weight, weight_only_matmul, weight_only_matmul_reference

pytestmark = pytest.mark.gpu

EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
NORM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

FORMATS = {
    "int4-g128": ("int4", dict(group_size=128, scale_dtype=torch.bfloat16)),
    "int4-g32-sym": ("int4", dict(group_size=32, symmetric=True)),
    "int4-channel": ("int4", dict(granularity="channel")),
    "int8-channel": ("int8", {}),
    "int8-g64-affine": ("int8", dict(group_size=64, symmetric=False, scale_dtype=torch.bfloat16)),
    "mxfp4": ("mxfp4", {}),
}


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    # tests/kernels turns the interpreter on for its own module; compile here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pytest.importorskip("triton", reason="needs triton")


def check_close(y, y_ref, x, w, bias, tag):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, tag
    if y.numel() == 0:
        return
    k = x.shape[-1]
    s = x.reshape(-1, k).float().abs() @ w.to(x.dtype).float().abs().t()
    if bias is not None:
        s = s + bias.to(x.dtype).float().abs()
    s = s.reshape(y.shape)
    yd, yr = y.float(), y_ref.float()
    err = (yd - yr).abs().nan_to_num(float("inf"))
    bound = EPS[y.dtype] * yr.abs() + 1e-4 * s
    excess = err - bound
    worst = int(torch.argmax(excess))
    nmax = float(err.max() / s.max())
    if float(excess.reshape(-1)[worst]) > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), y.shape))
        raise AssertionError(
            f"{tag}: y{list(idx)} = {float(yd[idx]):.6g}, reference {float(yr[idx]):.6g}, "
            f"|diff| {float(err[idx]):.3g} > bound {float(bound[idx]):.3g}; "
            f"{int((excess > 0).sum())} of {y.numel()} over; normalised max error {nmax:.3g}"
        )
    return nmax


_PACKED = {}


def packed(name, n, k):
    """Quantize a random N(0, 0.02) weight once per (format, shape) and pack it on CUDA."""
    key = (name, n, k)
    if key not in _PACKED:
        fmt, opts = FORMATS[name]
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        qt = quantize_tensor(w, fmt, **opts)
        del w
        _PACKED[key] = pack_weight(qt)
    return _PACKED[key]


def exact(x, w, bias):
    """The same operands as the kernel (x, w rounded to x's dtype), summed in float64."""
    y = x.double() @ w.to(x.dtype).double().t()
    if bias is not None:
        y = y + bias.to(x.dtype).double()
    return y.to(x.dtype)


def check_against_reference(y, x, pw, bias, tag):
    y_ref = weight_only_matmul_reference(x, pw, bias)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, tag
    if y.numel() == 0:
        return
    s = x.reshape(-1, x.shape[-1]).float().abs() @ pw.qtensor.dequantize().to(x.dtype).float().abs().t()
    nmax = float((y.float() - y_ref.float()).abs().max() / s.max())
    assert nmax <= NORM_TOL[x.dtype], f"{tag}: normalised max error vs the reference {nmax:.3g} > {NORM_TOL[x.dtype]}"


def run(name, n, k, m, dtype=torch.bfloat16, bias=False, config=None, lead=()):
    pw = packed(name, n, k)
    g = torch.Generator(device="cuda").manual_seed(m + 1)
    x = torch.randn(*lead, m, k, device="cuda", generator=g).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    y = weight_only_matmul(x, pw, b, backend="triton", config=config)
    w = pw.qtensor.dequantize()
    tag = f"{name} W[{n}, {k}] x{list(x.shape)} {dtype} {config}"
    check_close(y, exact(x, w, b), x, w, b, tag)
    check_against_reference(y, x, pw, b, tag)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n,k", [(4096, 4096), (28672, 4096)], ids=["4096x4096", "28672x4096"])
@pytest.mark.parametrize("m", [1, 16, 128, 1024])
def test_model_shapes(name, n, k, m):
    run(name, n, k, m, bias=(m == 16))


@pytest.mark.parametrize("name", ["int4-g128", "mxfp4"])
@pytest.mark.parametrize("m", [1, 16])
def test_llama70b_down(name, m):
    """8192x28672: a long K, split-K over many tiles."""
    run(name, 8192, 28672, m)


@pytest.mark.parametrize("name", ["int4-g128", "int4-g32-sym", "int8-channel", "mxfp4"])
@pytest.mark.parametrize(
    "n,k,m",
    [(577, 859, 727), (4097, 4000, 3), (4097, 4000, 17), (67, 200, 64), (1000, 4096, 0), (11008, 4096, 5)],
)
def test_odd_shapes(name, n, k, m):
    fp16 = m == 17  # float16 activations, 3-D input
    run(name, n, k, m, dtype=torch.float16 if fp16 else torch.bfloat16, bias=True, lead=(1,) if fp16 else ())


@pytest.mark.parametrize(
    "config",
    [
        WeightOnlyConfig(16, 64, 128, split_k=8, swap_ab=True, num_stages=2),
        WeightOnlyConfig(32, 256, 256, split_k=4, swap_ab=True, num_warps=8),
        WeightOnlyConfig(64, 128, 128, split_k=1, swap_ab=True),
        WeightOnlyConfig(64, 64, 64, split_k=2, swap_ab=False),
        WeightOnlyConfig(128, 256, 64, split_k=1, swap_ab=False, num_warps=8),
    ],
    ids=lambda c: f"bm{c.block_m}-bn{c.block_n}-bk{c.block_k}-s{c.split_k}-{'swap' if c.swap_ab else 'gemm'}",
)
@pytest.mark.parametrize("name", ["int4-g128", "mxfp4", "int8-channel"])
def test_explicit_configs(name, config):
    ks = packed(name, 4096, 4096).layout.ks  # block_k must be a multiple of the weight's sub-block
    config = dataclasses.replace(config, block_k=-(-config.block_k // ks) * ks)
    run(name, 4096, 4096, 48, bias=True, config=config)


@pytest.mark.parametrize("name", ["int4-g128", "mxfp4", "int8-channel"])
@pytest.mark.parametrize("m", [1, 16, 128])
def test_cuda_graph_capture(name, m):
    """Capture the call (split-K workspace and all) in a CUDA graph; replays with new
    inputs give the eager output bit for bit."""
    n, k = 4096, 4096
    pw = packed(name, n, k)
    cfg = default_config(m, n, k, pw, torch.cuda.get_device_properties(0).multi_processor_count)
    if m == 1:
        assert cfg.split_k > 1  # the two-kernel split-K path is the one to capture
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
        w = pw.qtensor.dequantize()
        check_close(static_y, exact(x, w, bias), x, w, bias, f"graph {name} M={m}")


def test_auto_picks_triton_on_cuda(caplog):
    pw = packed("int4-g128", 4096, 4096)
    x = torch.randn(2, 4096, device="cuda").bfloat16()
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        y = weight_only_matmul(x, pw)
    assert "backend=triton" in caplog.text
    assert torch.equal(y, weight_only_matmul(x, pw, backend="triton"))
    nv = pack_weight(quantize_tensor(torch.randn(64, 256, device="cuda"), "nvfp4"))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        weight_only_matmul(torch.randn(2, 256, device="cuda").bfloat16(), nv)
    assert "backend=reference" in caplog.text and "nvfp4" in caplog.text
    with pytest.raises(ValueError, match="nvfp4"):
        weight_only_matmul(torch.randn(2, 256, device="cuda").bfloat16(), nv, backend="triton")
