"""Time the weight-only Triton kernel over a grid of launch configs (H200 tuning aid).

    PYTHONPATH=src python scripts/sweep_weight_only.py [--out DIR]

For each (shape, M) it prints bf16's time and the five fastest configs with their
speed-up; results go to DIR/sweep.json. Not a benchmark of record (that is
`lowbit bench`); it tells which configs the dispatcher should ship.
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
from lowbit.kernels import pack_weight, weight_only_matmul
from lowbit.kernels.weight_only import WeightOnlyConfig, default_config

CASES = [((28672, 4096), 1), ((8192, 28672), 1), ((4096, 4096), 1), ((28672, 4096), 16)]
FORMATS = [("int4", {"group_size": 128}), ("int4", {"group_size": 128, "scale_dtype": torch.bfloat16})]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    results = []
    t_start = time.time()
    for ((n, k), m), (fmt, opts) in itertools.product(CASES, FORMATS):
        if time.time() - t_start > 420:
            print("time budget spent; stopping")
            break
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        pw = pack_weight(quantize_tensor(w, fmt, **opts), "cuda")
        ref = F.linear(x, pw.qtensor.dequantize().to(torch.bfloat16))
        bf16_us = time_cuda_graph(lambda: F.linear(x, w))
        rows = []
        grid = itertools.product((64, 128, 256), (256, 512), (1, 2, 4), (4,), (3, 4))
        for bn, bk, split, warps, stages in grid:
            cfg = WeightOnlyConfig(max(16, m), bn, bk, split, warps, stages, swap_ab=True)
            try:
                cfg.check(pw)
                y = weight_only_matmul(x, pw, backend="triton", config=cfg)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if err > 1e-2:
                    continue
                us = time_cuda_graph(lambda: weight_only_matmul(x, pw, backend="triton", config=cfg), rep_ms=5.0)
            except Exception as e:  # out of shared memory, registers ...
                rows.append({"config": repr(cfg), "error": f"{type(e).__name__}: {str(e)[:80]}"})
                continue
            rows.append({"config": repr(cfg), "us": us, "speedup": bf16_us / us})
        default = default_config(m, n, k, pw)
        d_us = time_cuda_graph(lambda: weight_only_matmul(x, pw, backend="triton", config=default))
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        label = f"{n}x{k} M={m} {fmt} {opts.get('scale_dtype', torch.float32)}"
        print(f"\n{label}: bf16 {bf16_us:.1f} us; default {d_us:.1f} us ({bf16_us / d_us:.2f}x) {default}")
        for r in ok[:5]:
            print(f"  {r['us']:7.1f} us  {r['speedup']:.2f}x  {r['config']}")
        results.append({"case": label, "bf16_us": bf16_us, "default_us": d_us, "default": repr(default), "top": ok[:10],
                        "failed": sum("error" in r for r in rows)})
        print(f"  ({len(ok)} configs ran, {sum('error' in r for r in rows)} failed; {time.time() - t_start:.0f} s so far)", flush=True)
    with open(f"{args.out}/sweep.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
