"""W4A8 (a8w4-fp8-mxfp4) on the H200: both strategies against bf16 and a8w8-fp8 by M, the
fold kernel alone by tile, and the FP8 GEMM on an already-folded weight (the fold's floor).
Every timing is a CUDA-graph replay over weight copies totalling >= 4x the L2, activation
quantization included. Prints a table; writes JSON to $OUT/w4a8-probe.json.

    PYTHONPATH=src python scripts/w4a8_probe.py [--ms 1,16,...] [--shapes 28672x4096,...]
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

from lowbit import quantize_tensor
from lowbit.bench import run as R
from lowbit.bench.timing import (bf16_weight_bytes, l2_bytes, nominal_weight_bytes, rotation_copies, time_cuda_graph,
                                 weight_copies)
from lowbit.kernels import act_quant
from lowbit.kernels.a8w8 import _launch, a8w8_matmul, pack_a8w8, plan_a8w8
from lowbit.kernels.w4a8 import fold_weight, pack_w4a8, w4a8_matmul

ap = argparse.ArgumentParser()
ap.add_argument("--ms", default="1,16,64,128,256,1024,8192")
ap.add_argument("--shapes", default="28672x4096,8192x28672")
args = ap.parse_args()
dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # cpu + TRITON_INTERPRET=1: a dry run
if dev.type == "cpu":
    from lowbit.bench.timing import time_eager

    def time_cuda_graph(fn):  # noqa: F811
        return time_eager(fn, rep_ms=1, device="cpu")
rows = []


def timed(label, shape, m, fns_or_first, make=None, wbytes=None, x=None):
    fns = weight_copies(fns_or_first, make, wbytes, dev) if make else [fns_or_first]
    us = time_cuda_graph(R._cycle(fns, x))
    rows.append(dict(shape=shape, m=m, what=label, us=round(us, 2)))
    return us


for shape in args.shapes.split(","):
    n, k = map(int, shape.split("x"))
    w = R._randn((n, k), R._seed(0, shape, "w"), dev, scale=0.02)
    qt = quantize_tensor(w, "mxfp4")
    pw = pack_w4a8(qt, torch.bfloat16)
    assert pw.fold_unsupported is None, pw.fold_unsupported
    mk = lambda: pack_w4a8(quantize_tensor(w, "mxfp4"), torch.bfloat16)  # noqa: E731
    wb = nominal_weight_bytes(qt)
    # the fold alone, by tile
    for tile in ((16, 64, 4), (32, 32, 4), (8, 128, 4), (32, 64, 8), (64, 32, 4), (16, 128, 8), (4, 256, 4)):
        us = timed(f"fold {tile}", shape, 0, lambda x, p=pw, t=tile: fold_weight(p, t),
                   lambda t=tile: (lambda x, p=mk(): fold_weight(p, t)), wb, torch.empty(1, device=dev))
        print(f"{shape} fold tile {tile}: {us:.1f} us ({(n * k * 1.5) / us / 1e6:.2f} TB/s: 0.5 B read + 1 B written per weight)", flush=True)
    folded = fold_weight(pw)
    fp8 = pack_a8w8(quantize_tensor(w, "fp8_e4m3", granularity="channel"))
    for m in map(int, args.ms.split(",")):
        x = R._randn((m, k), R._seed(0, shape, m), dev).to(torch.bfloat16)
        ws = [w] + [w.clone() for _ in range(rotation_copies(bf16_weight_bytes(n, k), l2_bytes(dev)) - 1)]
        bfs = [lambda x, ww=ww: F.linear(x, ww) for ww in ws]
        bf = time_cuda_graph(R._cycle(bfs, x))
        rows.append(dict(shape=shape, m=m, what="bf16", us=round(bf, 2)))
        line = [f"{shape} M={m:5d} bf16 {bf:8.1f}"]
        for label, first, make, b in (
            ("a8w8-fp8", lambda x: a8w8_matmul(x, fp8), lambda: (lambda x, p=pack_a8w8(quantize_tensor(
                w, "fp8_e4m3", granularity="channel")): a8w8_matmul(x, p)), n * k),
            ("w4a8 fold", lambda x: w4a8_matmul(x, pw, strategy="fold"),
             lambda: (lambda x, p=mk(): w4a8_matmul(x, p, strategy="fold")), wb),
            ("w4a8 upcast", lambda x: w4a8_matmul(x, pw, strategy="upcast"),
             lambda: (lambda x, p=mk(): w4a8_matmul(x, p, strategy="upcast")), wb),
            ("w4a8 auto", lambda x: w4a8_matmul(x, pw), lambda: (lambda x, p=mk(): w4a8_matmul(x, p)), wb),
        ):
            try:
                us = timed(label, shape, m, first, make, b, x)
                line.append(f"{label} {us:8.1f} ({bf / us:.2f}x)")
            except Exception as e:  # report and go on
                line.append(f"{label} failed: {type(e).__name__}: {e}")
        # the GEMM on a folded weight (no fold in the timing): the fold strategy's floor
        cfg = plan_a8w8(m, folded, dev, torch.bfloat16).check()

        def gemm_only(x, pa=folded, cfg=cfg):
            y = torch.empty((x.shape[0], pa.n), dtype=x.dtype, device=x.device)
            codes, sa = act_quant.quantize_activation(x, "fp8_e4m3")
            _launch(codes, sa, pa, None, y, cfg)
            return y

        us = timed("gemm on folded (no fold)", shape, m, gemm_only, None, None, x)
        line.append(f"gemm-only {us:8.1f} ({bf / us:.2f}x)")
        print(" | ".join(line), flush=True)

out = os.environ.get("OUT", ".")
with open(os.path.join(out, "w4a8-probe.json"), "w") as f:
    json.dump(dict(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", rows=rows), f, indent=1)
