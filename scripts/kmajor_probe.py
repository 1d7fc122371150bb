"""Check and time the K-major 4-bit kernel (``mode="kmajor"``) against the
dispatcher's current choice and bf16 on CUDA (H200 experiment).

    PYTHONPATH=src python scripts/kmajor_probe.py [--out DIR] [--budget-s S]

Every config's output is checked against the exact product with
``packing.kernel_weight`` (float64) before it is timed. Writes DIR/kmajor_probe.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F

from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import WeightOnlyConfig, pack_weight, weight_only_matmul
from lowbit.kernels.packing import kernel_weight, with_kmajor

SHAPES = [(28672, 4096), (8192, 28672)]


def configs(m: int):
    if m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        for (bn, warps), split, stages in itertools.product(((64, 4), (128, 4), (128, 8)), (1, 2, 4), (3, 4)):
            yield WeightOnlyConfig(bm, bn, split, warps, stages, "kmajor")
    else:
        for (bm, bn, warps), split in itertools.product(((64, 128, 4), (128, 128, 8), (64, 256, 8)), (1, 2)):
            yield WeightOnlyConfig(bm, bn, split, warps, 3, "kmajor")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    t0 = time.time()
    cases = []
    for (n, k), m in itertools.product(SHAPES, (16, 64, 128, 1024)):
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
        pws = [with_kmajor(pack_weight(quantize_tensor(w, "int4", group_size=128), "cuda")) for w in ws]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        kw = kernel_weight(pws[0]).double()
        exact = (x.double() @ kw.t()).float()
        scale = float((x.double().abs() @ kw.abs().t()).max())
        it = itertools.cycle(range(4))
        case = {"n": n, "k": k, "m": m, "bf16_us": time_cuda_graph(lambda: F.linear(x, ws[next(it)])),
                "auto_us": time_cuda_graph(lambda: weight_only_matmul(x, pws[next(it)])), "rows": []}
        for cfg in configs(m):
            if time.time() - t0 > args.budget_s:
                break
            try:
                y = weight_only_matmul(x, pws[0], backend="triton", config=cfg)
                err = float((y.float() - exact).abs().max()) / scale
                if not err <= 2**-7:
                    case["rows"].append({"config": repr(cfg), "error": f"normalised error {err:.3g}"})
                    continue
                us = time_cuda_graph(lambda: weight_only_matmul(x, pws[next(it)], backend="triton", config=cfg),
                                     rep_ms=5.0)
                case["rows"].append({"config": repr(cfg), "us": us, "err": err})
            except Exception as e:
                case["rows"].append({"config": repr(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"})
        case["rows"].sort(key=lambda r: r.get("us", 1e9))
        cases.append(case)
        bf = case["bf16_us"]
        best = case["rows"][0] if case["rows"] and "us" in case["rows"][0] else None
        print(f"{n}x{k} M={m}: bf16 {bf:.1f} us, auto {case['auto_us']:.1f} us ({bf / case['auto_us']:.2f}x)"
              + (f", kmajor {best['us']:.1f} us ({bf / best['us']:.2f}x) {best['config']} err {best['err']:.1e}"
                 if best else ", kmajor: none"), flush=True)
        errs = [r for r in case["rows"] if "error" in r]
        if errs:
            print(f"  {len(errs)} errors, first: {errs[0]['config']}: {errs[0]['error']}", flush=True)
    with open(f"{args.out}/kmajor_probe.json", "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "cases": cases}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
