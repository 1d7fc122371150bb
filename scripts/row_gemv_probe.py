"""Probe: a one-token GEMV over 8-bit weights in their canonical [N, K] bytes (H200).

    PYTHONPATH=src python scripts/row_gemv_probe.py [--out DIR] [--budget-s S]

Each program reads BLOCK_N whole rows of the weight, BLOCK_K contiguous bytes at a
time, decodes them to float32 (int8: byte permute into 2^23 + q + 128, one subtraction;
FP8: the hardware's e4m3x2 -> f16x2 conversion, widened), multiplies by x in float32 and
keeps [BLOCK_N, BLOCK_K] partial sums in registers, reduced once at the end. A8W8 int8
uses dp4a on words of four codes (exact int32 sums). Compared, in one process, with
bf16 cuBLAS and what lowbit runs today (weight-only int8/fp8, A8W8 fp8/int8). Not a
benchmark of record; writes DIR/row_gemv_probe.json and prints the fastest configs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lowbit import quantize_tensor
from lowbit.bench.timing import time_cuda_graph
from lowbit.kernels import pack_weight, weight_only_matmul
from lowbit.kernels.a8w8 import a8w8_matmul, a8w8_reference, pack_a8w8
from lowbit.kernels.act_quant import quantize_activation
from lowbit.kernels.packing import kernel_weight

_I8_F32 = tl.constexpr("""
{
.reg .b32 u;
xor.b32 u, $4, 0x80808080;
prmt.b32 $0, u, 0x4B000000, 0x7440;
prmt.b32 $1, u, 0x4B000000, 0x7441;
prmt.b32 $2, u, 0x4B000000, 0x7442;
prmt.b32 $3, u, 0x4B000000, 0x7443;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}
""")
_E4M3_F32 = tl.constexpr("""
{
.reg .b16 lo16, hi16, c0, c1, c2, c3;
.reg .b32 p0, p1;
mov.b32 {lo16, hi16}, $4;
cvt.rn.f16x2.e4m3x2 p0, lo16;
cvt.rn.f16x2.e4m3x2 p1, hi16;
mov.b32 {c0, c1}, p0;
mov.b32 {c2, c3}, p1;
cvt.f32.f16 $0, c0;
cvt.f32.f16 $1, c1;
cvt.f32.f16 $2, c2;
cvt.f32.f16 $3, c3;
}
""")


@triton.jit
def _decode(w, FP8: tl.constexpr):
    if FP8:
        return tl.inline_asm_elementwise(_E4M3_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    return tl.inline_asm_elementwise(_I8_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def _row_block(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, blk, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               FP8: tl.constexpr, XCODES: tl.constexpr, PREFETCH: tl.constexpr, VEC: tl.constexpr):
    """Rows [blk * BLOCK_N, (blk + 1) * BLOCK_N): y[n] = s[n] (xs) sum_k x[k] w[n, k];
    x bf16 (XCODES False) or FP8 codes times xs."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if VEC < 16:  # contiguity VEC along K: byte loads of VEC codes, the layout of VEC x values
        offs_k = tl.max_contiguous((offs_k // VEC) * VEC, VEC) + offs_k % VEC
    wp = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w + offs_k[None, :]
    xp = x_ptr + offs_n[:, None] * 0 + offs_k[None, :]  # [BLOCK_N, BLOCK_K]: the weight tile's shape
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:  # the next step's weight bytes loaded one step ahead, in registers
        w_next = tl.load(wp)
    for k0 in range(0, K, BLOCK_K):
        if PREFETCH:
            w = w_next
            w_next = tl.load(wp + tl.minimum(k0 + BLOCK_K, K - BLOCK_K))
        else:
            w = tl.load(wp + k0)
        if XCODES:
            xf = _decode(tl.load(xp + k0), True)
        else:
            xf = tl.load(xp + k0).to(tl.float32)
        acc += _decode(w, FP8) * xf
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + offs_n)
    if XCODES:
        y = y * tl.load(xs_ptr)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


@triton.jit
def row_gemv(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr, XCODES: tl.constexpr,
             PREFETCH: tl.constexpr, VEC: tl.constexpr = 16):
    _row_block(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, tl.program_id(0), K, stride_w, BLOCK_N, BLOCK_K, FP8, XCODES,
               PREFETCH, VEC)


@triton.jit
def row_gemv_persist(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP8: tl.constexpr, XCODES: tl.constexpr):
    """row_gemv with a fixed grid: each program walks row blocks pid, pid + grid, ..."""
    for blk in range(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.num_programs(0)):
        _row_block(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, blk, K, stride_w, BLOCK_N, BLOCK_K, FP8, XCODES, False, 16)


@triton.jit
def row_gemv_dp4a(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_w,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """A8W8 int8: int32 words of four codes, dp4a, exact int32 sums."""
    pid = tl.program_id(0)
    KW: tl.constexpr = BLOCK_K // 4
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, KW)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (stride_w // 4) + offs_k[None, :]
    xp = x_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * 0 + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, KW), dtype=tl.int32)
    for k0 in range(0, K // 4, KW):
        w = tl.load(wp + k0)
        xw = tl.load(xp + k0)
        acc = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, xw, acc],
                                        dtype=tl.int32, is_pure=True, pack=1)
    y = tl.sum(acc, axis=1).to(tl.float32) * tl.load(s_ptr + offs_n) * tl.load(xs_ptr)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty))


SHAPES = [(28672, 4096), (8192, 28672)]
CONFIGS = [(bn, bk, w, vec) for bn, w, bk, vec in itertools.product((1, 2, 4), (1, 2, 4), (1024, 2048), (8, 16))
           if bk // (32 * w) >= 4]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--focus", action="store_true", help="28672x4096 only: wider grid and the persistent variant")
    args = ap.parse_args()
    if args.focus:
        return focus(args)
    out = []
    for n, k in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        case = {"n": n, "k": k, "bf16_us": time_cuda_graph(lambda: F.linear(x, w))}
        bf = case["bf16_us"]
        print(f"\n{n}x{k}: bf16 {bf:.1f} us", flush=True)
        variants = {}
        for name in ("int8", "fp8_e4m3"):
            qt = quantize_tensor(w, name)
            pw = pack_weight(qt, "cuda")
            ref = F.linear(x.double(), kernel_weight(pw, rounded=False).double()).float()
            case[f"lowbit-a16w8-{name}"] = time_cuda_graph(lambda: weight_only_matmul(x, pw))
            pa = pack_a8w8(qt)
            ref8 = a8w8_reference(x, pa).float()
            case[f"lowbit-a8w8-{name}"] = time_cuda_graph(lambda: a8w8_matmul(x, pa))
            codes = qt.codes.view(torch.uint8).contiguous()
            s = qt.scales.float().reshape(n).contiguous()
            xc, xs = quantize_activation(x, name)
            variants[f"a16w8-{name}"] = (codes, s, ref, False, None)
            variants[f"a8w8-{name}"] = (pa.codes, pa.scales, ref8, True, (xc, xs))
            print(f"  lowbit today: a16w8-{name} {case[f'lowbit-a16w8-{name}']:.1f} us "
                  f"({bf / case[f'lowbit-a16w8-{name}']:.2f}x), a8w8-{name} {case[f'lowbit-a8w8-{name}']:.1f} us "
                  f"({bf / case[f'lowbit-a8w8-{name}']:.2f}x)", flush=True)
        for vname, (codes, s, ref, act, q) in variants.items():
            rows = []
            t_var = time.time()
            for bn, bk, warps, vec in CONFIGS:
                if time.time() - t_var > args.budget_s / 8:
                    break
                if act and vec != 16:
                    continue
                pf = 0
                y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
                grid = (triton.cdiv(n, bn),)
                fp8 = "fp8" in vname
                if vname == "a8w8-int8":
                    def run(xc=None, xs=None):
                        xc, xs = q if xc is None else (xc, xs)
                        row_gemv_dp4a[grid](xc, xs, codes, s, y, n, codes.shape[1], codes.stride(0),
                                            BLOCK_N=bn, BLOCK_K=bk, PREFETCH=pf, num_warps=warps)
                elif act:
                    def run(xc=None, xs=None):
                        xc, xs = q if xc is None else (xc, xs)
                        row_gemv[grid](xc, xs, codes, s, y, n, codes.shape[1], codes.stride(0),
                                       BLOCK_N=bn, BLOCK_K=bk, FP8=fp8, XCODES=True, PREFETCH=pf, VEC=vec,
                                       num_warps=warps)
                else:
                    def run(xc=None, xs=None):
                        row_gemv[grid](x, s, codes, s, y, n, k, codes.stride(0),
                                       BLOCK_N=bn, BLOCK_K=bk, FP8=fp8, XCODES=False, PREFETCH=pf, VEC=vec,
                                       num_warps=warps)
                try:
                    run()
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    row = {"bn": bn, "bk": bk, "warps": warps, "vec": vec, "rel_err": err}
                    if not err <= 1e-2:
                        row["error"] = "wrong result"
                    else:
                        row["us"] = time_cuda_graph(run, rep_ms=5.0)
                        if act:  # whole op: the activation quantization too
                            def whole():
                                xc, xs = quantize_activation(x, vname.split("-", 1)[1])
                                run(xc, xs)
                            row["whole_us"] = time_cuda_graph(whole, rep_ms=5.0)
                except Exception as e:
                    row = {"bn": bn, "bk": bk, "warps": warps, "vec": vec, "error": f"{type(e).__name__}: {e}"[:200]}
                rows.append(row)
            key = "whole_us" if act else "us"
            rows.sort(key=lambda r: r.get(key, 1e9))
            case[vname] = rows
            print(f"  row GEMV {vname}:", flush=True)
            for r in rows[:4]:
                if key in r:
                    extra = f" (GEMV alone {r['us']:.1f})" if act else ""
                    print(f"    {r[key]:6.1f} us {bf / r[key]:.2f}x{extra}  BN {r['bn']} BK {r['bk']} "
                          f"warps {r['warps']} vec {r['vec']} err {r['rel_err']:.1e}", flush=True)
            bad = [r for r in rows if "error" in r]
            if bad:
                print(f"    {len(bad)} failed, first: {bad[0]}", flush=True)
        out.append(case)
    with open(f"{args.out}/row_gemv_probe.json", "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "cases": out}, f, indent=1)
    return 0


def focus(args) -> int:
    """28672x4096, M = 1: a16w8-int8 and a8w8-fp8 over a wider grid (more rows per
    program, shorter steps) and with a fixed grid of persistent programs."""
    n, k = 28672, 4096
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bf = time_cuda_graph(lambda: F.linear(x, w))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"n": n, "k": k, "bf16_us": bf, "rows": []}
    print(f"{n}x{k}: bf16 {bf:.1f} us", flush=True)
    for name in ("int8", "fp8_e4m3"):
        qt = quantize_tensor(w, name)
        pw = pack_weight(qt, "cuda")
        codes = qt.codes.view(torch.uint8).contiguous()
        s = qt.scales.float().reshape(n).contiguous()
        if name == "int8":
            ref = F.linear(x.double(), kernel_weight(pw, rounded=False).double()).float()
            today = time_cuda_graph(lambda: weight_only_matmul(x, pw))
            xin, xs, fp8, act = x, s, False, False
        else:
            pa = pack_a8w8(qt)
            ref = a8w8_reference(x, pa).float()
            today = time_cuda_graph(lambda: a8w8_matmul(x, pa))
            xin, xs = quantize_activation(x, name)
            codes, s, fp8, act = pa.codes, pa.scales, True, True
        label = "a16w8-int8" if name == "int8" else "a8w8-fp8 (GEMV alone)"
        print(f"  {label}: lowbit today {today:.1f} us (whole op)", flush=True)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        rows = []
        grid_cfgs = [(bn, bk, wp, per) for bn in (2, 4, 8) for bk in (256, 512, 1024) for wp in (1, 2, 4)
                     for per in (0, 4, 8, 16) if bn * bk // (32 * wp) <= 256 and bk // (32 * wp) >= 4]
        t0 = time.time()
        for bn, bk, warps, per in grid_cfgs:
            if time.time() - t0 > args.budget_s / 2:
                break
            if per:
                grid = (min(triton.cdiv(n, bn), sms * per),)
                def run():
                    row_gemv_persist[grid](xin, xs, codes, s, y, n, codes.shape[1], codes.stride(0),
                                           BLOCK_N=bn, BLOCK_K=bk, FP8=fp8, XCODES=act, num_warps=warps)
            else:
                grid = (triton.cdiv(n, bn),)
                def run():
                    row_gemv[grid](xin, xs, codes, s, y, n, codes.shape[1], codes.stride(0),
                                   BLOCK_N=bn, BLOCK_K=bk, FP8=fp8, XCODES=act, PREFETCH=0, num_warps=warps)
            r = {"case": label, "bn": bn, "bk": bk, "warps": warps, "persist_per_sm": per}
            try:
                run()
                r["rel_err"] = float((y.float() - ref).abs().max() / ref.abs().max())
                if r["rel_err"] <= 1e-2:
                    r["us"] = time_cuda_graph(run, rep_ms=5.0)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:160]
            rows.append(r)
        rows.sort(key=lambda r: r.get("us", 1e9))
        for r in rows[:6]:
            if "us" in r:
                print(f"    {r['us']:6.1f} us ({bf / r['us']:.2f}x bf16)  BN {r['bn']} BK {r['bk']} warps {r['warps']} "
                      f"persistent {r['persist_per_sm']}/SM", flush=True)
        out["rows"] += rows
        out[f"{label} today_us"] = today
    with open(f"{args.out}/row_gemv_focus.json", "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), **out}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
