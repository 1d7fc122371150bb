"""Time the 2-bit weight-only kernels against 4-bit ones at a few M (CUDA-graph replay).

    PYTHONPATH=src python scripts/int2_probe.py
"""
import torch
import triton

from lowbit import quantize_tensor
from lowbit.kernels import WeightOnlyConfig, pack_weight, weight_only_matmul

torch.manual_seed(0)
n, k = 28672, 4096
w = torch.randn(n, k, device="cuda") * 0.02
packs = {f: pack_weight(quantize_tensor(w, f, group_size=g)) for f, g in (("int2", 64), ("int4", 128))}
wb = w.bfloat16()
for m in (16, 128):
    x = torch.randn(m, k, device="cuda").bfloat16()
    t = triton.testing.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, wb))
    print(f"M={m} bf16 {t * 1e3:.1f} us", flush=True)
    cands = [("auto", "auto", None), ("dequant", "dequant", None),
             ("swap bn128 s4 w8", "triton", WeightOnlyConfig(16 if m == 16 else 64, 128, 4, 8, 3, "swap")),
             ("swap bn64 s4 w4", "triton", WeightOnlyConfig(16 if m == 16 else 64, 64, 4, 4, 3, "swap")),
             ("gemm 64x128 s2 w4", "triton", WeightOnlyConfig(64, 128, 2, 4, 3, "gemm"))]
    for f, pw in packs.items():
        for name, backend, cfg in cands:
            fn = lambda: weight_only_matmul(x, pw, backend=backend, config=cfg)  # noqa: E731
            fn()
            t = triton.testing.do_bench_cudagraph(fn)
            print(f"M={m} {f} {name}: {t * 1e3:.1f} us", flush=True)
