"""Probe for the M=8192 gap (docs/perf/experiments/a8w8-h200.md): does any memory-bound
kernel before the A8W8 GEMM slow it, and does a gap kernel between them change that?"""
import torch
from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import a8w8, act_quant

for n, k in ((28672, 4096), (8192, 28672)):
    m = 8192
    pa = a8w8.pack_a8w8(quantize_tensor(torch.randn(n, k, device="cuda") * 0.02, "fp8_e4m3", granularity="channel"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cfg = a8w8.plan_a8w8(m, pa, x.device, x.dtype)
    codes, sa = act_quant.quantize_activation(x, pa.fmt)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    buf = torch.empty_like(x)
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    g = lambda: a8w8._launch(codes, sa, pa, None, y, cfg)  # noqa: E731
    t = {
        "gemm": time_cuda_graph(g, rep_ms=5.0),
        "copy x": time_cuda_graph(lambda: buf.copy_(x), rep_ms=5.0),
        "copy x, gemm": time_cuda_graph(lambda: (buf.copy_(x), g()), rep_ms=5.0),
        "gemm, gemm": time_cuda_graph(lambda: (g(), g()), rep_ms=5.0),
        "bf16": time_cuda_graph(lambda: torch.nn.functional.linear(x, wb), rep_ms=5.0),
        "copy x, bf16": time_cuda_graph(lambda: (buf.copy_(x), torch.nn.functional.linear(x, wb)), rep_ms=5.0),
    }
    print(f"{n}x{k} M={m}: " + ", ".join(f"{a} {b:.1f}" for a, b in t.items()), flush=True)
