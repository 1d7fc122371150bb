"""Check the weight-only Triton kernel on CUDA and time it over a grid of launch
configs (H200 tuning aid).

    PYTHONPATH=src python scripts/sweep_weight_only.py [--out DIR] [--budget-s S] [--quick]

First a correctness pass: every format x dtype x mode against the exact product
of x with ``packing.kernel_weight`` (the kernel's documented numerics, summed in
float64). Then, for each (shape, M, format), bf16's time and the fastest
configs with their speed-up; results go to DIR/sweep.json, and the PTX/SASS
instruction mix of the best config of each mode to DIR/isa.txt. Not a
benchmark of record (that is `lowbit bench`); it tells which configs the
dispatcher should ship.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import time

import torch
import torch.nn.functional as F

from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import pack_weight, weight_only_matmul
from lowbit.kernels.packing import kernel_weight
from lowbit.kernels import WeightOnlyConfig, default_config

FORMATS = {
    "int4-g128": ("int4", {"group_size": 128}),
    "mxfp4": ("mxfp4", {}),
    "int8": ("int8", {}),
}
CHECK_FORMATS = {
    **FORMATS,
    "int4-g32-sym": ("int4", {"group_size": 32, "symmetric": True}),
    "int4-g64-intzero": ("int4", {"group_size": 64, "zero_point": "integer"}),
    "int4-channel": ("int4", {"granularity": "channel"}),
    "int8-g32-affine": ("int8", {"group_size": 32, "symmetric": False}),
    "int8-g64": ("int8", {"group_size": 64}),
}


def configs(m: int):
    if m == 1:
        for (bn, warps), split in itertools.product(((32, 1), (32, 2), (64, 2), (64, 4), (128, 4)), (2, 4, 8)):
            yield WeightOnlyConfig(1, bn, split, warps, 3, "gemv")
    if m <= 16:
        for bn, split in itertools.product((128, 256), (1, 2, 4)):
            yield WeightOnlyConfig(16, bn, split, 8, 3, "swap")
    if 16 < m <= 512:
        for bm, bn, warps, stack in itertools.product((64, 128), (128, 256), (4, 8), (False,)):
            yield WeightOnlyConfig(bm, bn, 1, warps, 3, "gemm", stack=stack)
    if m >= 1024:
        yield WeightOnlyConfig(128, 256, 1, 8, 3, "gemm", stack=False)


def check(out) -> bool:
    ok = True
    for (name, (fmt, opts)), dtype in itertools.product(CHECK_FORMATS.items(), (torch.bfloat16, torch.float16)):
        n, k = 1000, 1000  # odd tails: N not a multiple of 256, K not of 128
        g = torch.Generator(device="cuda").manual_seed(1)
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        qt = quantize_tensor(w, fmt, **opts)
        pw = pack_weight(qt, dtype=dtype)
        kw = kernel_weight(pw).double()
        ref_w = qt.dequantize().double()
        from lowbit.kernels._weight_only_triton import dequantize_t

        try:
            dq = dequantize_t(pw, dtype).t().double()
            bad = int((dq != kw).sum())
            print(f"{'ok  ' if bad == 0 else 'FAIL'} {name:18s} {str(dtype):15s} dequantize kernel vs kernel_weight: "
                  f"{bad} of {kw.numel()} values differ (max {float((dq - kw).abs().max()):.3g})", file=out, flush=True)
            ok &= bad == 0
        except Exception as e:
            print(f"FAIL {name} {dtype} dequantize: {type(e).__name__}: {str(e)[:300]}", file=out, flush=True)
            ok = False
        for m, mode, bm, stack in ((1, "gemv", 1, False), (3, "gemv", 1, False), (5, "swap", 16, True),
                                   (5, "swap", 16, False), (77, "gemm", 64, True), (300, "gemm", 128, False)):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            b = torch.randn(n, device="cuda", generator=g).to(dtype)
            cfg = WeightOnlyConfig(bm, 64, 2 if m < 10 else 1, 4, 3, mode, stack=stack)
            try:
                y = weight_only_matmul(x, pw, b, backend="triton", config=cfg).double()
            except Exception as e:
                print(f"FAIL {name} {dtype} M={m} {mode}: {type(e).__name__}: {str(e)[:300]}", file=out, flush=True)
                ok = False
                continue
            exact = x.double() @ kw.t() + b.double()
            s = x.double().abs() @ kw.abs().t() + b.double().abs()
            err = float(((y - exact).abs() / s).max())
            ref = x.double() @ ref_w.t() + b.double()
            err_ref = float(((y - ref).abs()).max() / s.max())
            tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
            status = "ok  " if err <= tol else "FAIL"
            ok &= err <= tol
            print(f"{status} {name:18s} {str(dtype):15s} M={m:<4d} {mode}: err/|x||W| {err:.2e} (tol {tol:.1e}); "
                  f"vs fp32 dequant {err_ref:.2e}", file=out, flush=True)
    return ok


def isa_mix(compiled) -> str:
    lines = []
    for key in ("sass", "ptx"):
        try:
            text = compiled.asm[key]
        except Exception as e:
            lines.append(f"{key}: unavailable ({type(e).__name__})")
            continue
        ops = collections.Counter()
        for line in text.splitlines():
            mt = re.match(r"\s*(?:/\*[0-9a-f]+\*/)?\s*(?:@!?U?P\w+\s+)?([A-Za-z][\w.]*)", line)
            if mt and (key == "sass" and mt.group(1).isupper() or key == "ptx" and not line.strip().startswith(".")):
                ops[mt.group(1)] += 1
        lines.append(f"{key} ({sum(ops.values())} instructions): " + ", ".join(f"{o} {c}" for o, c in ops.most_common(40)))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=360)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t_start = time.time()
    import sys

    with open(f"{args.out}/check.txt", "w") as f:
        class Tee:
            def write(self, s):
                f.write(s)
                sys.stdout.write(s)

            def flush(self):
                f.flush()
                sys.stdout.flush()

        ok = check(Tee())
    print(f"correctness: {'all ok' if ok else 'FAILURES'} ({time.time() - t_start:.0f} s)", flush=True)

    from lowbit.kernels import _weight_only_triton as wt

    results, isa = [], []
    cases = [((28672, 4096), 1), ((8192, 28672), 1), ((4096, 4096), 1), ((1536, 576), 1), ((28672, 4096), 16),
             ((8192, 28672), 16), ((28672, 4096), 256), ((28672, 4096), 512)]
    summary = []
    top_int4 = {}
    for ((n, k), m), name in itertools.product(cases, FORMATS):
        if name != "int4-g128" and (m > 16 or n * k < 2**24):
            continue
        if time.time() - t_start > args.budget_s:
            print("time budget spent; stopping")
            break
        fmt, opts = FORMATS[name]
        copies = max(1, -(-200_000_000 // (n * k // 2)))  # weights cycled: > 4x L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(min(copies, 4))]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        pws = [pack_weight(quantize_tensor(w, fmt, **opts), "cuda") for w in ws]
        ref = F.linear(x, kernel_weight(pws[0]))
        it = itertools.cycle(range(len(ws)))
        bf16_us = time_cuda_graph(lambda: F.linear(x, ws[next(it)]))
        rows = []
        grid = list(configs(m)) if name == "int4-g128" else top_int4.get((n, k, m), [])[:5]
        for cfg in grid:
            if time.time() - t_start > args.budget_s:
                break
            try:
                cfg.check(pws[0])
                y = weight_only_matmul(x, pws[0], backend="triton", config=cfg)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                if not err <= 1e-2:
                    rows.append({"config": repr(cfg), "error": f"rel_err {err:.3g}"})
                    continue
                us = time_cuda_graph(lambda: weight_only_matmul(x, pws[next(it)], backend="triton", config=cfg),
                                     rep_ms=5.0)
            except Exception as e:  # out of shared memory, registers ...
                rows.append({"config": repr(cfg), "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            rows.append({"config": repr(cfg), "us": us, "speedup": bf16_us / us, "cfg": cfg})
        if m >= 256:
            from lowbit.kernels._weight_only_triton import dequantize_t

            dq_us = time_cuda_graph(lambda: torch.matmul(x, dequantize_t(pws[next(it)], torch.bfloat16)), rep_ms=5.0)
            deq_only = time_cuda_graph(lambda: dequantize_t(pws[next(it)], torch.bfloat16), rep_ms=5.0)
            print(f"  dequantize+cuBLAS {dq_us:.1f} us ({bf16_us / dq_us:.2f}x); dequantize alone {deq_only:.1f} us")
        good = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        if name == "int4-g128":
            top_int4[(n, k, m)] = [r["cfg"] for r in good]
        label = f"{n}x{k} M={m} {name}"
        print(f"\n{label}: bf16 {bf16_us:.1f} us", flush=True)
        for r in good[:4]:
            print(f"  {r['us']:7.1f} us  {r['speedup']:.2f}x  {r['config']}")
        bad = [r for r in rows if "error" in r]
        for r in bad[:3]:
            print(f"  error: {r['config']}: {r['error']}")
        if good:
            summary.append(f"{label:32s} bf16 {bf16_us:7.1f} us  best {good[0]['us']:7.1f} us {good[0]['speedup']:.2f}x  "
                           f"{good[0]['config']}")
            best_by_mode = {}
            for r in good:
                best_by_mode.setdefault(r["cfg"].mode, r)
            for mode, r in best_by_mode.items():
                handle = wt.launch(x, pws[0], None, torch.empty(m, n, device="cuda", dtype=torch.bfloat16), r["cfg"])
                isa.append(f"=== {label} {mode} {r['config']} {r['us']:.1f} us\n{isa_mix(handle)}")
        results.append({"case": label, "bf16_us": bf16_us, "top": [{k2: v for k2, v in r.items() if k2 != "cfg"}
                                                                   for r in good[:10]],
                        "errors": [r for r in rows if "error" in r][:10]})
        print(f"  ({len(good)} configs ran, {len(bad)} failed; {time.time() - t_start:.0f} s so far)", flush=True)
        del ws, pws
    with open(f"{args.out}/sweep.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(f"{args.out}/isa.txt", "w") as f:
        f.write("\n\n".join(isa))
    print("\n== summary ==")
    print("\n".join(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
