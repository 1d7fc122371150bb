"""Time the one-token weight-only GEMV over its launch configs on CUDA (H200 tuning aid).

    PYTHONPATH=src python scripts/gemv_sweep.py [--out DIR] [--budget-s S] [--baseline FILE]

For each (shape, format) at M = 1: bf16 cuBLAS, the dispatcher's current choice
(``backend="auto"``), optionally the same choice run by another copy of the kernel
module (``--baseline``: e.g. an older commit's ``_weight_only_triton.py``, to compare
kernels within one run), and every config of the grid below, each output checked
against the kernel's documented weights before timing. Writes DIR/gemv_sweep.json
and prints the fastest configs per case. Not a benchmark of record (that is
``lowbit bench``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time

import torch
import torch.nn.functional as F

from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import WeightOnlyConfig, pack_weight, weight_only_matmul
from lowbit.kernels import dispatch
from lowbit.kernels.packing import kernel_weight

FORMATS = {"int4-g128": ("int4", {"group_size": 128}), "mxfp4": ("mxfp4", {}), "int8": ("int8", {})}
SHAPES = [(28672, 4096), (8192, 28672)]
BLOCKS = [(32, 1), (32, 2), (64, 2), (64, 4), (128, 4)]  # (block_n, num_warps)
SPLITS = [2, 3, 4, 6, 8]


def grid(family: str, splits=SPLITS, f32_only: bool = False, bits: int = 4):
    for (bn, warps), pf, f32 in itertools.product(BLOCKS, (1, 2), (False, True)):
        if (f32 and family != "int") or (f32_only and family == "int" and not f32):
            continue
        for split in splits:
            yield WeightOnlyConfig(1, bn, split, warps, 3, "gemv", int_f32=f32, prefetch=pf)
            if f32 and warps == 4 and bits == 4:  # 72 registers: no spill for 4-bit codes
                yield WeightOnlyConfig(1, bn, split, warps, 3, "gemv", int_f32=f32, prefetch=pf, max_regs=72)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--baseline", default=None, help="another _weight_only_triton.py to time with the auto config")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="split-K values of the grid")
    ap.add_argument("--formats", default=",".join(FORMATS), help="formats to sweep")
    ap.add_argument("--f32-only", action="store_true", help="integer codes: the float32 GEMV only")
    args = ap.parse_args()
    splits = [int(v) for v in args.splits.split(",")]
    t0 = time.time()
    base = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_wo", args.baseline)
        base = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(base)
    results = []
    for (n, k), name in itertools.product(SHAPES, args.formats.split(",")):
        fmt, opts = FORMATS[name]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]  # > 4x L2
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        pws = [pack_weight(quantize_tensor(w, fmt, **opts), "cuda") for w in ws]
        ref = F.linear(x.double(), kernel_weight(pws[0], rounded=False).double()).float()
        it = itertools.cycle(range(len(ws)))
        case = {"n": n, "k": k, "format": name, "bf16_us": time_cuda_graph(lambda: F.linear(x, ws[next(it)]))}
        plan = dispatch.plan(1, n, k, pws[0], x.device, x.dtype)
        case["auto"] = {"plan": repr(plan), "us": time_cuda_graph(lambda: weight_only_matmul(x, pws[next(it)]))}
        if base is not None and plan.kernel == "triton":
            y = torch.empty(1, n, device="cuda", dtype=x.dtype)
            base.launch(x, pws[0], None, y, plan.config)
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            case["baseline"] = {"rel_err": err, "us": time_cuda_graph(
                lambda: base.launch(x, pws[next(it)], None, torch.empty(1, n, device="cuda", dtype=x.dtype),
                                    plan.config))}
        rows = []
        for cfg in grid(pws[0].layout.family, splits, args.f32_only, pws[0].layout.bits):
            if time.time() - t0 > args.budget_s:
                print("time budget spent", flush=True)
                break
            try:
                y = weight_only_matmul(x, pws[0], backend="triton", config=cfg)
                err = float((y.float() - ref).abs().max() / ref.abs().max())
                if not err <= 1e-2:
                    rows.append({"config": repr(cfg), "error": f"rel_err {err:.3g}"})
                    continue
                us = time_cuda_graph(lambda: weight_only_matmul(x, pws[next(it)], backend="triton", config=cfg),
                                     rep_ms=5.0)
            except Exception as e:  # out of registers or shared memory
                rows.append({"config": repr(cfg), "error": f"{type(e).__name__}: {str(e)[:160]}"})
                continue
            rows.append({"config": repr(cfg), "us": us, "rel_err": err})
        case["rows"] = sorted(rows, key=lambda r: r.get("us", 1e9))
        if base is not None:  # the other kernel module with the fastest configs
            for r in case["rows"][:3]:
                cfg = next(c for c in grid(pws[0].layout.family, splits, args.f32_only, pws[0].layout.bits)
                           if repr(c) == r["config"])
                r["baseline_us"] = time_cuda_graph(
                    lambda: base.launch(x, pws[next(it)], None, torch.empty(1, n, device="cuda", dtype=x.dtype), cfg),
                    rep_ms=5.0)
        results.append(case)
        bf = case["bf16_us"]
        print(f"\n{n}x{k} {name}: bf16 {bf:.1f} us; auto {case['auto']['us']:.1f} us ({bf / case['auto']['us']:.2f}x)"
              + (f"; baseline kernel {case['baseline']['us']:.1f} us ({bf / case['baseline']['us']:.2f}x)"
                 if "baseline" in case else ""), flush=True)
        for r in case["rows"][:5]:
            if "us" in r:
                b = f" (baseline kernel {r['baseline_us']:.1f} us)" if "baseline_us" in r else ""
                print(f"  {r['us']:6.1f} us {bf / r['us']:.2f}x{b}  {r['config']}")
        errs = [r for r in case["rows"] if "error" in r]
        if errs:
            print(f"  {len(errs)} errors, first: {errs[0]['config']}: {errs[0]['error']}")
    with open(f"{args.out}/gemv_sweep.json", "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "cases": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
