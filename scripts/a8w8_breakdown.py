"""Where an A8W8 call's time goes on the GPU: the activation quantization alone, the
GEMM alone (on precomputed codes) and the whole op with and without programmatic
dependent launch (PDL: the GEMM starts early, prefetches weights and waits for the
codes), CUDA-graph replay, beside bf16.

    PYTHONPATH=src python scripts/a8w8_breakdown.py [--shapes 28672x4096,8192x28672] [--m 1,16,128]
"""

import argparse

import torch

from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import a8w8, act_quant


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="28672x4096,8192x28672")
    p.add_argument("--m", default="1,16,128,8192")
    p.add_argument("--fmt", default="fp8_e4m3")
    p.add_argument("--pdl-tiles", default="0,2,8", help="weight tiles prefetched under PDL (0: a plain launch)")
    a = p.parse_args()
    tiles = [int(t) for t in a.pdl_tiles.split(",")]
    head = " ".join(f"{f'pdl {t}':>8}" for t in tiles)
    print(f"{'shape':>12} {'M':>5} {'bf16':>8} {'quant':>8} {'split q':>8} {'gemm':>8} {'q, g':>8} {'q->g':>8} {head}"
          "  config (q, g: both kernels in one graph, the GEMM on other codes; q->g: on the new codes; then the op)")
    for spec in a.shapes.split(","):
        n, k = map(int, spec.split("x"))
        w = torch.randn(n, k, device="cuda") * 0.02
        pa = a8w8.pack_a8w8(quantize_tensor(w, a.fmt, granularity="channel"))
        wb = w.to(torch.bfloat16)
        for m in map(int, a.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cfg = a8w8.plan_a8w8(m, pa, x.device, x.dtype)
            codes, sa = act_quant.quantize_activation(x, pa.fmt)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            t_bf16 = time_cuda_graph(lambda: torch.nn.functional.linear(x, wb), rep_ms=5.0)
            t_q = time_cuda_graph(lambda: act_quant.quantize_activation(x, pa.fmt), rep_ms=5.0)
            saved = act_quant.SPLIT_MIN_K
            act_quant.SPLIT_MIN_K = 0  # the split path for comparison
            t_qs = time_cuda_graph(lambda: act_quant.quantize_activation(x, pa.fmt), rep_ms=5.0)
            act_quant.SPLIT_MIN_K = saved
            t_g = time_cuda_graph(lambda: a8w8._launch(codes, sa, pa, None, y, cfg), rep_ms=5.0)

            def both(independent: bool):
                c2, s2 = act_quant.quantize_activation(x, pa.fmt)
                a8w8._launch(codes if independent else c2, sa if independent else s2, pa, None, y, cfg)

            t_qg = time_cuda_graph(lambda: both(True), rep_ms=5.0)
            t_qdg = time_cuda_graph(lambda: both(False), rep_ms=5.0)
            saved, totals = a8w8.PDL_TILES, []
            for t in tiles:
                a8w8.PDL_TILES = t
                totals.append(time_cuda_graph(lambda: a8w8.a8w8_matmul(x, pa), rep_ms=5.0))
            a8w8.PDL_TILES = saved
            cols = " ".join(f"{t:8.1f}" for t in totals)
            print(f"{spec:>12} {m:>5} {t_bf16:8.1f} {t_q:8.1f} {t_qs:8.1f} {t_g:8.1f} {t_qg:8.1f} {t_qdg:8.1f} {cols}  {cfg}",
                  flush=True)


if __name__ == "__main__":
    main()
