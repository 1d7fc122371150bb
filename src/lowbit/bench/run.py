"""The benchmark: lowbit's quantized matmuls (weight-only and A8W8) vs bf16 cuBLAS and peers, on real shapes.

    python -m lowbit.bench.run --out docs/perf                      # the default set
    python -m lowbit.bench.run --shapes llama3-8b.gate_up,llama3-70b.down --m 1,16,128
    python -m lowbit.bench.run --all                                # the whole registry
    python -m lowbit.bench.run --device cpu --backend reference --shapes 256x512 --m 1,4
                                                                    # CPU dry run (no GPU)

For each shape (N x K, shapes.py) the weight is drawn N(0, 0.02) in bf16 and, for
each M, the activations N(0, 1) in bf16 (seeded; never zeros). Then, in this order:

1. bf16 cuBLAS (F.linear): the baseline of every speed-up, timed first in the run;
2. each lowbit recipe: lowbit.quantize_tensor(w, recipe's weight format and options)
   -> kernels.pack_weight -> kernels.weight_only_matmul(x, pw, backend=...); an
   a8w8 recipe -> kernels.a8w8.pack_a8w8 -> a8w8_matmul (activation quantization in
   every timing);
3. each peer (peers.py).

Every method's output is checked before it is timed, on every M: rel_err =
max|y - y_ref| / max|y_ref| against its reference (lowbit: weight_only_matmul_reference,
itself cross-checked against float64 x @ qt.dequantize()^T; peers: the float64
reference of their own quantized weight, see peers.py), recorded beside the time
and flagged above 1e-2; the exit status is 1 when a bf16 or lowbit row fails its
check (a peer's failed check is reported, not counted). Times are CUDA-graph replays, median (timing.py); weights
are cycled through enough copies to exceed 4x the L2 cache, so replays stream them
from HBM as a decode step does (--no-rotate turns that off). A method that cannot
run (a recipe the kernels do not support yet, a missing peer, a shape a peer does
not take) is reported as skipped with the reason; the run goes on.

Output: <out>/<gpu>.json (top-level gpu, date, commit, torch, triton, rows; each
row {shape, n, k, m, method, us, speedup_vs_bf16, roofline_pct, rel_err}) and
<out>/<gpu>.md (a table: shape, M, bf16 us, then each method's speed-up with its
% of roofline; the command that produced it; skipped methods with reasons), both
rewritten after every shape so a run cut short keeps what it measured; a short
table printed last.

TODO (issue 4, item 6): the end-to-end figure (decode tokens/s at batch 1 and 16
on a Llama-3-8B-shaped decoder, random weights, all linears quantized, CUDA graphs;
bf16 vs a16w4-int-g128 vs a16w4-mxfp4 in the same run). ``e2e=True`` / ``--e2e``
raises NotImplementedError until then.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import zlib
from typing import Callable

import torch

from .peers import TOL, Peer, PeerUnavailable, Prepared, bf16_baseline, f64_linear, rel_err, select_peers
from .shapes import M_VALUES, Shape, describe_registry, parse_ms, select_shapes
from .timing import (FP8_FLOPS, cycle_calls, l2_bytes, nominal_weight_bytes, roofline_pct, rotation_copies,
                     time_cuda_graph, time_eager)

DEFAULT_RECIPES: tuple[str, ...] = ("a16w4-int-g128", "a16w4-mxfp4", "a16w4-nvfp4", "a16w8-int8", "a16w8-fp8", "a16w2-int-g64",
                                    "a8w8-fp8", "a8w8-int8", "a8w8-fp8-b128", "a8w8-mxfp8", "a8w4-mxfp4", "a8w4-fp8-mxfp4",
                                    "a4w4-mxfp4", "a4w4-nvfp4")
TOP_KEYS: tuple[str, ...] = ("gpu", "date", "commit", "torch", "triton", "rows")
ROW_KEYS: tuple[str, ...] = ("shape", "n", "k", "m", "method", "us", "speedup_vs_bf16", "roofline_pct", "rel_err")


class BenchRows(list):
    """The rows (dicts with ROW_KEYS), plus what the files say besides them."""

    def __init__(self, rows=(), meta=None, skipped=None, failed=None):
        super().__init__(rows)
        self.meta: dict = meta or {}
        self.skipped: list[dict] = skipped or []  # {shape, m, method, reason}; m None = every M
        self.failed: list[dict] = failed or []  # {shape, m, method, what, error}


# --------------------------------------------------------------------------- methods


def lowbit_method(recipe: str, w: torch.Tensor, backend: str = "auto") -> Prepared:
    """Quantize w with the recipe's weight format, pack it for the kernels, bind the op."""
    from ..formats import quantize_tensor
    from ..nn.recipes import parse_recipe

    rc = parse_recipe(recipe)
    if rc.activation.fmt is not None:
        from ..kernels.mx import ACT_FORMATS

        if rc.activation.fmt in ACT_FORMATS:
            return mx_method(recipe, rc, w, backend)
        if rc.activation.fmt == "nvfp4":
            return nvfp4_method(recipe, rc, w, backend)
        if rc.weight_fmt == "mxfp4":
            return w4a8_method(recipe, rc, w, backend)
        return a8w8_method(recipe, rc, w, backend)
    try:
        from ..kernels import pack_weight, weight_only_matmul, weight_only_matmul_reference
    except Exception as e:
        raise PeerUnavailable(f"lowbit.kernels is not importable: {type(e).__name__}: {e}") from None
    qt = quantize_tensor(w, rc.weight_fmt, **rc.weight_options)
    device = w.device
    pw = pack_weight(qt, device)

    def bind(p):
        return lambda x: weight_only_matmul(x, p, backend=backend)

    def precheck(x):
        # backend="auto" runs the (slow) reference where the Triton kernels cannot run:
        # that is no kernel to time, so such a recipe is reported as skipped, with why
        if backend == "reference" or x.device.type != "cuda":
            return
        why = _triton_unsupported(x, pw)
        if why:
            raise PeerUnavailable(f"the Triton kernels do not run it ({why})")

    # a format the kernels do not take is skipped once for the shape, not at every M
    precheck(torch.empty(1, w.shape[1], dtype=torch.bfloat16, device=device))
    w64_cache: list = []

    def vs_float64(x, y_ref):
        if not w64_cache:
            w64_cache.append(qt.dequantize().double())
        return rel_err(y_ref, f64_linear(x, w64_cache[0]))

    return Prepared(
        method=f"lowbit:{recipe}",
        # a copy with its own tensors: re-packing qt would share its codes, which the
        # row GEMV reads directly (``PackedWeight.row_codes``), and defeat the rotation
        make=lambda: bind(pack_weight(quantize_tensor(w, rc.weight_fmt, **rc.weight_options), device)),
        reference=lambda x: weight_only_matmul_reference(x, pw).double(),
        weight_bytes=nominal_weight_bytes(qt),
        checked_against="weight_only_matmul_reference (cross-checked: float64 x @ qt.dequantize()^T)",
        first=bind(pw),
        precheck=precheck,
        extra_checks=[("weight_only_matmul_reference vs float64 x @ qt.dequantize()^T", vs_float64)],
    )


def a8w8_method(recipe: str, rc, w: torch.Tensor, backend: str = "auto") -> Prepared:
    """An activation-quantized recipe: the activation quantization kernel and the
    A8W8 GEMM, both inside every timing."""
    from ..formats import quantize_tensor
    from ..kernels.a8w8 import a8w8_matmul, a8w8_reference, a8w8_unsupported, dequantized_weight, pack_a8w8
    from ..kernels.act_quant import quantize_activation_reference

    qt = quantize_tensor(w, rc.weight_fmt, **rc.weight_options)
    why = a8w8_unsupported(qt) if rc.activation.fmt == rc.weight_fmt else f"{rc.activation.fmt} activations"
    if why is not None:
        raise PeerUnavailable(f"no A8W8 kernel for {recipe} ({why}) yet")
    device = w.device
    pa = pack_a8w8(qt, device)
    kb = "auto" if backend == "auto" else ("reference" if backend == "reference" else "triton")

    def bind(p):
        return lambda x: a8w8_matmul(x, p, backend=kb)

    def vs_float64(x, y_ref):
        codes, sa = quantize_activation_reference(x, pa.fmt, pa.act_group)
        a = codes.view(torch.float8_e4m3fn).double() if pa.fmt == "fp8_e4m3" else codes.double()
        a = a * (sa.double()[:, None] if pa.act_group is None else sa.double().repeat_interleave(128, 1))
        return rel_err(y_ref, a[:, : pa.k] @ dequantized_weight(pa).double().T)

    return Prepared(
        method=f"lowbit:{recipe}",
        make=lambda: bind(pack_a8w8(qt, device)),
        reference=lambda x: a8w8_reference(x, pa).double(),
        weight_bytes=nominal_weight_bytes(qt),
        flops_rate=FP8_FLOPS,
        checked_against="a8w8_reference (the same activation quantization, float32 products; cross-checked "
                        "against float64)",
        first=bind(pa),
        extra_checks=[("a8w8_reference vs float64", vs_float64)],
    )


def w4a8_method(recipe: str, rc, w: torch.Tensor, backend: str = "auto") -> Prepared:
    """a8w4-fp8-mxfp4: the FP8 activation quantization and the W4A8 strategy that
    ``w4a8_matmul`` picks by M (the fold into E4M3 and the FP8 GEMM, or the weight-only
    kernels on the codes), all inside every timing."""
    from ..formats import quantize_tensor
    from ..kernels.act_quant import quantize_activation_reference
    from ..kernels.w4a8 import pack_w4a8, w4a8_matmul, w4a8_reference

    qt = quantize_tensor(w, rc.weight_fmt, **rc.weight_options)
    device = w.device
    pw = pack_w4a8(qt, torch.bfloat16, device)
    kb = "reference" if backend == "reference" else "auto"
    w64_cache: list = []

    def bind(p):
        return lambda x: w4a8_matmul(x, p, backend=kb)

    def vs_float64(x, y_ref):
        if not w64_cache:
            w64_cache.append(qt.dequantize().double())
        codes, sa = quantize_activation_reference(x, "fp8_e4m3")
        a = codes.view(torch.float8_e4m3fn).double()[:, : pw.k] * sa.double()[:, None]
        return rel_err(y_ref, a @ w64_cache[0].to(a.device).T)

    return Prepared(
        method=f"lowbit:{recipe}",
        # re-quantized: a copy of its own (the fold reads the canonical codes)
        make=lambda: bind(pack_w4a8(quantize_tensor(w, rc.weight_fmt, **rc.weight_options), torch.bfloat16, device)),
        reference=lambda x: w4a8_reference(x, pw).double(),
        weight_bytes=nominal_weight_bytes(qt),
        flops_rate=FP8_FLOPS,
        checked_against="w4a8_reference (the same FP8 activation quantization, float32 products; cross-checked "
                        "against float64)" + ("" if pw.fold_unsupported is None else f"; {pw.fold_unsupported}"),
        first=bind(pw),
        extra_checks=[("w4a8_reference vs float64", vs_float64)],
    )


def nvfp4_method(recipe: str, rc, w: torch.Tensor, backend: str = "auto") -> Prepared:
    """a4w4-nvfp4 as QuantLinear runs it without FP4 tensor cores (Hopper): the NVFP4
    activations' e2m1 * s_b (exact in x's dtype) through the weight-only kernels, the
    tensor scales applied to the sums (``kernels.mx.nvfp4_upcast_matmul``); the
    activation quantization (a tensor amax, then one pass) is inside every timing."""
    from ..formats import fake_quantize, quantize_tensor
    from ..kernels import pack_weight, weight_only_matmul_reference
    from ..kernels.mx import nvfp4_upcast_matmul

    qt = quantize_tensor(w, rc.weight_fmt, **rc.weight_options)
    if qt.fmt != "nvfp4":
        raise PeerUnavailable(f"no kernel for {recipe}: NVFP4 activations with {qt.fmt} weights")
    device = w.device
    pw = pack_weight(qt, device)
    if not pw.triton_supported:
        raise PeerUnavailable(f"the Triton kernels do not run it ({pw.unsupported})")
    w64_cache: list = []

    def bind(p):
        return lambda x: nvfp4_upcast_matmul(x, p, backend=backend)

    def reference(x):
        return weight_only_matmul_reference(fake_quantize(x, "nvfp4").to(x.dtype), pw).double()

    def vs_float64(x, y_ref):
        if not w64_cache:
            w64_cache.append(qt.dequantize().double())
        return rel_err(y_ref, f64_linear(fake_quantize(x, "nvfp4").double(), w64_cache[0]))

    return Prepared(
        method=f"lowbit:{recipe}",
        make=lambda: bind(pack_weight(qt, device)),
        reference=reference,
        weight_bytes=nominal_weight_bytes(qt),
        checked_against="weight_only_matmul_reference of the NVFP4-quantized x (cross-checked against float64)",
        first=bind(pw),
        extra_checks=[("reference vs float64", vs_float64)],
    )


def mx_method(recipe: str, rc, w: torch.Tensor, backend: str = "auto") -> Prepared:
    """An MX recipe (a8w8-mxfp8, a8w4-mxfp4, a4w4-mxfp4), as QuantLinear runs it: on a GPU
    with block-scaled MMA the MX activation quantization kernel and the tl.dot_scaled
    GEMM; elsewhere (Hopper) the upcast path (the MX activations dequantized exactly,
    then the weight-only kernels with the MXFP4 or MXFP8 weight). The activation
    quantization is inside every timing."""
    from ..formats import quantize_tensor
    from ..kernels import pack_weight
    from ..kernels.act_quant import quantize_activation_mx_reference
    from ..kernels.mx import (_dequantize, mx_matmul, mx_native, mx_reference, mx_unsupported, mx_upcast_matmul,
                              pack_mx)

    qt = quantize_tensor(w, rc.weight_fmt, **rc.weight_options)
    why = mx_unsupported(qt)
    if why is not None:
        raise PeerUnavailable(f"no MX kernel for {recipe} ({why}) yet")
    device = w.device
    pm = pack_mx(qt, device)
    act = rc.activation.fmt
    kb = "reference" if backend == "reference" else "triton"
    upcast = backend == "auto" and not (device.type == "cuda" and mx_native(device))

    def bind(p):
        if upcast:
            return lambda x: mx_upcast_matmul(x, p, act)
        return lambda x: mx_matmul(x, p, act, backend=kb)

    def pack():
        return pack_weight(qt, device) if upcast else pack_mx(qt, device)

    def vs_float64(x, y_ref):
        codes, scales = quantize_activation_mx_reference(x, act)
        a = _dequantize(codes, scales, act, pm.k).double()
        return rel_err(y_ref, a @ _dequantize(pm.codes, pm.scales, pm.fmt, pm.k).double().T)

    return Prepared(
        method=f"lowbit:{recipe}",
        make=lambda: bind(pack()),
        reference=lambda x: mx_reference(x, pm, act).double(),
        weight_bytes=nominal_weight_bytes(qt),
        flops_rate=FP8_FLOPS,
        checked_against="mx_reference (the same MX activation quantization, float32 products; cross-checked "
                        "against float64)" + ("; upcast path (no block-scaled MMA)" if upcast else ""),
        first=bind(pack()),
        extra_checks=[("mx_reference vs float64", vs_float64)],
    )


def _triton_unsupported(x: torch.Tensor, pw) -> str | None:
    """Why lowbit's Triton kernels cannot run (x, pw), or None."""
    from ..kernels import weight_only

    fn = getattr(weight_only, "triton_unsupported", None)
    if fn is not None:
        return fn(x, pw)
    if not getattr(pw, "triton_supported", True):
        return getattr(pw, "unsupported", None) or "not supported by the Triton kernels"
    return None


# --------------------------------------------------------------------------- environment


def git_commit(root: str | None = None) -> str:
    """$LOWBIT_COMMIT when set (a snapshot run elsewhere: the device machine's copy may
    carry another checkout's .git), else HEAD of the repository (+dirty for modified
    tracked files)."""
    if os.environ.get("LOWBIT_COMMIT"):
        return os.environ["LOWBIT_COMMIT"]
    root = root or os.getcwd()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        import platform

        gpu = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "gpu": gpu,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton_version,
    }


def file_stem(gpu: str) -> str:
    """'NVIDIA H200' -> 'h200'; 'cpu (x86_64)' -> 'cpu'."""
    s = gpu.lower()
    if s.startswith("cpu"):
        return "cpu"
    s = re.sub(r"\bnvidia\b|\bgeforce\b", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "gpu"


# --------------------------------------------------------------------------- the run


def _seed(seed: int, *parts) -> int:
    return (zlib.crc32(":".join(str(p) for p in parts).encode()) + 7919 * seed) % (2**63)


def _randn(shape, seed: int, device: torch.device, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)
    return t.mul_(scale) if scale != 1.0 else t


def _finite(v, digits: int | None = None):
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return round(float(v), digits) if digits is not None else float(v)


def _sig(v, digits: int = 3):
    v = _finite(v)
    return None if v is None else float(f"{v:.{digits}g}")


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_bench(
    shapes=None,
    ms=None,
    recipes=DEFAULT_RECIPES,
    peers=None,
    out_dir: str | None = "docs/perf",
    e2e: bool = False,
    *,
    device: str | None = None,
    backend: str = "auto",
    timing: str | None = None,
    rep_ms: float = 20.0,
    rotate: bool = True,
    budget_s: float | None = None,
    seed: int = 0,
    name: str | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> BenchRows:
    """Check and time bf16, each lowbit recipe and each peer on every (shape, M).

    shapes: Shape objects or a spec for shapes.select_shapes (None: the defaults);
    ms: batch sizes (None: 1, 16, 128, 1024, 8192); recipes: lowbit recipe names;
    peers: names or Peer objects (None: all; [] or 'none': none); out_dir: where
    <gpu>.json and <gpu>.md go (None: write nothing). device: 'cuda' (default) or
    'cpu' for a dry run (eager timing, peers unavailable; pass backend='reference');
    timing: 'graph' (CUDA-graph replay, default on CUDA) or 'eager'; budget_s: stop
    starting new shapes/methods after this many seconds (what was left is reported
    as skipped). Returns the rows (BenchRows: .meta, .skipped, .failed).
    """
    if e2e:
        raise NotImplementedError(
            "the end-to-end decode figure (issue 4, item 6) is not built yet; run without e2e/--e2e"
        )
    shape_list: list[Shape] = select_shapes(shapes)
    m_list = parse_ms(ms)
    recipe_list = [recipes] if isinstance(recipes, str) else list(recipes or [])
    if recipe_list:
        from ..nn.recipes import parse_recipe

        for r in recipe_list:  # bad names fail before any work
            parse_recipe(r)
    peer_list: list[Peer] = select_peers(peers)
    dev = torch.device(device or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "lowbit bench needs a CUDA GPU and none is visible (torch.cuda.is_available() is False). "
            "For a CPU dry run of the harness: --device cpu --backend reference "
            "(run_bench(..., device='cpu', backend='reference'))"
        )
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {dev}")
    timing = timing or ("graph" if dev.type == "cuda" else "eager")
    if timing not in ("graph", "eager"):
        raise ValueError(f"timing must be 'graph' or 'eager', got {timing!r}")
    if timing == "graph" and dev.type != "cuda":
        raise ValueError("CUDA-graph timing needs a CUDA device; use timing='eager' on the CPU")

    meta = environment(dev)
    stem = name or file_stem(meta["gpu"])
    l2 = l2_bytes(dev)
    do_rotate = rotate and timing == "graph"
    info = {
        "command": command or "run_bench(...)",
        "timing": (
            (
                f"CUDA-graph replay (triton.testing.do_bench_cudagraph, median, rep {rep_ms:g} ms)"
                + (f"; weights cycled through copies totalling >= 4x L2 ({l2 / 2**20:.0f} MiB)" if do_rotate else "")
            )
            if timing == "graph"
            else "eager launches, median" + (" (CPU dry run: perf_counter)" if dev.type == "cpu" else "")
        ),
        "backend": backend,
        "device": str(dev),
    }
    result = BenchRows(meta=meta)
    ctx = dict(dev=dev, timing=timing, rep_ms=rep_ms, l2=l2, rotate=do_rotate, log=log)
    t0 = time.perf_counter()

    def over_budget() -> bool:
        return budget_s is not None and time.perf_counter() - t0 > budget_s

    log(f"lowbit bench on {meta['gpu']}: torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}")
    log(f"timing: {info['timing']}; lowbit backend={backend}")
    for shape in shape_list:
        methods: list[tuple[str, Callable[[torch.Tensor], Prepared]]] = [("bf16", bf16_baseline)]
        methods += [(f"lowbit:{r}", (lambda w, r=r: lowbit_method(r, w, backend))) for r in recipe_list]
        methods += [(p.method, p.prepare) for p in peer_list]
        if over_budget():
            for method, _ in methods:
                result.skipped.append(dict(shape=shape.key, m=None, method=method, reason="time budget spent"))
            continue
        w = _randn((shape.n, shape.k), _seed(seed, shape.key, "w"), dev, scale=0.02)
        xs = {m: _randn((m, shape.k), _seed(seed, shape.key, m), dev) for m in m_list}
        bf16_us: dict[int, float] = {}
        log(f"\n{shape.title} ({shape.key})")
        for method, prepare in methods:
            if over_budget():
                result.skipped.append(dict(shape=shape.key, m=None, method=method, reason="time budget spent"))
                continue
            _measure(method, prepare, shape, w, xs, bf16_us, result, ctx)
            _free(dev)
        del w, xs
        _free(dev)
        if out_dir:
            write_outputs(out_dir, stem, result, info)
    if out_dir:
        paths = write_outputs(out_dir, stem, result, info)
        log("\nwrote " + ", ".join(paths))
    return result


def _measure(method: str, prepare, shape: Shape, w, xs: dict, bf16_us: dict, result: BenchRows, ctx: dict) -> None:
    """Prepare one method on one weight, then check and time it at every M (rows into result)."""
    dev, log = ctx["dev"], ctx["log"]
    try:
        prep = prepare(w)
    except Exception as e:
        reason = _reason(e)
        result.skipped.append(dict(shape=shape.key, m=None, method=method, reason=reason))
        log(f"  {method:32s} skipped: {reason}")
        return
    copies = None
    times = []
    for m, x in xs.items():
        try:
            if prep.precheck is not None:
                prep.precheck(x)
            op = prep.op()
            y = op(x)
            _sync(dev)
            y_ref = prep.reference(x)
            err = rel_err(y, y_ref)
            if not err <= prep.tol:
                result.failed.append(
                    dict(shape=shape.key, m=m, method=method, what=f"rel_err vs {prep.checked_against}", error=err)
                )
            for label, check in prep.extra_checks:
                e2 = check(x, y_ref)
                if not e2 <= prep.tol:
                    result.failed.append(dict(shape=shape.key, m=m, method=method, what=label, error=e2))
            del y, y_ref
            if ctx["timing"] == "graph":
                if copies is None:
                    n_copies = rotation_copies(prep.weight_bytes, ctx["l2"]) if ctx["rotate"] else 1
                    copies = [op] + [prep.make() for _ in range(n_copies - 1)]
                us = time_cuda_graph(_cycle(copies, x), ctx["rep_ms"])
            else:
                us = time_eager(_cycle([op], x), rep_ms=ctx["rep_ms"], device=dev.type)
        except Exception as e:
            reason = _reason(e)
            result.skipped.append(dict(shape=shape.key, m=m, method=method, reason=reason))
            log(f"  {method:32s} M={m}: skipped: {reason}")
            _free(dev)
            continue
        if method == "bf16":
            bf16_us[m] = us
        base = bf16_us.get(m)
        row = {
            "shape": shape.key,
            "n": shape.n,
            "k": shape.k,
            "m": m,
            "method": method,
            "us": _finite(us, 3),
            "speedup_vs_bf16": _finite(base / us, 3) if base and us > 0 else None,
            "roofline_pct": _finite(roofline_pct(us, m, shape.n, shape.k, prep.weight_bytes, prep.flops_rate), 1),
            "rel_err": _sig(err),
        }
        result.append(row)
        flag = "" if err <= prep.tol else " CHECK FAILED"
        sp = f" {row['speedup_vs_bf16']:.2f}x" if row["speedup_vs_bf16"] is not None else ""
        times.append(f"M={m}: {us:.1f}us{sp} err {err:.1e}{flag}")
    if times:
        log(f"  {method:32s} " + " | ".join(times))


def _cycle(ops: list, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One zero-argument call per op in turn (a graph captures the sequence)."""
    return cycle_calls([lambda op=op: op(x) for op in ops])


# --------------------------------------------------------------------------- output


def json_document(meta: dict, rows: list[dict]) -> dict:
    doc = {k: meta.get(k) for k in TOP_KEYS if k != "rows"}
    doc["rows"] = [{k: r.get(k) for k in ROW_KEYS} for r in rows]
    return doc


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(json_document(meta, rows), f, indent=1, allow_nan=False)
        f.write("\n")


def _methods(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "bf16"))
    order = {"lowbit": 0, "peer": 1}
    return sorted(seen, key=lambda m: order.get(m.split(":")[0], 2))


def _groups(rows: list[dict]) -> list[tuple[str, int, int, int]]:
    return list(dict.fromkeys((r["shape"], r["n"], r["k"], r["m"]) for r in rows))


def _title(key: str, n: int, k: int) -> str:
    from .shapes import SHAPES

    s = SHAPES.get(key)
    return s.title if s else f"{key.split('.')[0]} {n}x{k}"


def markdown(meta: dict, rows: list[dict], skipped=(), failed=(), info: dict | None = None) -> str:
    info = info or {}
    methods = _methods(rows)
    by = {(r["shape"], r["m"], r["method"]): r for r in rows}
    failed_keys = {(f["shape"], f["m"], f["method"]) for f in failed}
    skipped_keys = {(s["shape"], s["m"], s["method"]) for s in skipped}
    out = [
        f"# Quantized matmul speed on {meta.get('gpu')}",
        "",
        f"- GPU: {meta.get('gpu')}; torch {meta.get('torch')}; triton {meta.get('triton')}",
        f"- date: {meta.get('date')}; commit: {meta.get('commit')}",
        f"- command: `{info.get('command', '')}`",
        f"- timing: {info.get('timing', '')}; lowbit backend: {info.get('backend', '')}",
        "- weights N(0, 0.02) bf16, activations N(0, 1) bf16; y = x W^T, W [N, K], x [M, K]",
        "",
        "Each cell: speed-up over bf16 cuBLAS (`F.linear`) on the same shape and M, measured in",
        "the same run, and in parentheses the % of the roofline: ideal time = max(bytes / 4.27 TB/s,",
        "FLOPs / 672 TFLOP/s (1269 for FP8)), bytes = weight (codes + 16-bit scales) + activations +",
        f"output (lowbit/bench/timing.py). `!` = output check failed (rel_err > {TOL:g}), see below;",
        "`skip` = could not run, see below. Numbers drift between runs: compare within one run.",
        "",
    ]
    head = ["shape (N x K)", "M", "bf16 us"] + [m for m in methods]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    last = None
    for key, n, k, m in _groups(rows):
        base = by.get((key, m, "bf16"))
        cells = [_title(key, n, k) if key != last else "", str(m)]
        last = key
        if base and base["us"] is not None:
            mark = " !" if (key, m, "bf16") in failed_keys else ""
            cells.append(f"{base['us']:.1f} ({_pct(base['roofline_pct'])}){mark}")
        else:
            cells.append("skip" if _is_skipped(skipped_keys, key, m, "bf16") else "")
        for method in methods:
            r = by.get((key, m, method))
            if r is None:
                cells.append("skip" if _is_skipped(skipped_keys, key, m, method) else "")
                continue
            mark = " !" if (key, m, method) in failed_keys else ""
            sp = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] is not None else f"{r['us']:.1f} us"
            cells.append(f"{sp} ({_pct(r['roofline_pct'])}){mark}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "## All rows", ""]
    out += ["| shape | N | K | M | method | us | speed-up | roofline % | rel_err |", "|" + "---|" * 9]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['n']} | {r['k']} | {r['m']} | {r['method']} | {_num(r['us'], '.2f')} | "
            f"{_num(r['speedup_vs_bf16'], '.3f')} | {_num(r['roofline_pct'], '.1f')} | {_num(r['rel_err'], '.2e')} |"
        )
    if failed:
        out += ["", f"## Failed checks (rel_err > {TOL:g})", ""]
        for f in failed:
            out.append(f"- {f['method']} on {f['shape']} M={f['m']}: {f['what']}: {_num(f['error'], '.3g')}")
    if skipped:
        out += ["", "## Skipped", ""]
        for (method, reason), where in _skip_groups(skipped).items():
            out.append(f"- {method}: {reason} ({where})")
    return "\n".join(out) + "\n"


def _is_skipped(keys: set, shape: str, m: int, method: str) -> bool:
    return (shape, m, method) in keys or (shape, None, method) in keys


def _skip_groups(skipped) -> dict:
    groups: dict = {}
    for s in skipped:
        groups.setdefault((s["method"], s["reason"]), []).append(
            s["shape"] + ("" if s["m"] is None else f" M={s['m']}")
        )
    return {k: ", ".join(v) for k, v in groups.items()}


def _pct(v) -> str:
    return "?" if v is None else f"{v:.0f}%"


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def write_outputs(out_dir: str, stem: str, result: BenchRows, info: dict) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    pj = os.path.join(out_dir, f"{stem}.json")
    pm = os.path.join(out_dir, f"{stem}.md")
    write_json(pj, result.meta, list(result))
    with open(pm, "w") as f:
        f.write(markdown(result.meta, list(result), result.skipped, result.failed, info))
    return [pj, pm]


def short_table(rows: list[dict], failed=()) -> str:
    """shape, M, bf16 us, then each method's speed-up (for the end of the console output)."""
    from ..table import format_table

    methods = _methods(rows)
    by = {(r["shape"], r["m"], r["method"]): r for r in rows}
    bad = {(f["shape"], f["m"], f["method"]) for f in failed}
    table = []
    for key, _, _, m in _groups(rows):
        base = by.get((key, m, "bf16"))
        line = [key, m, _num(base["us"], ".1f") if base else ""]
        for method in methods:
            r = by.get((key, m, method))
            cell = "" if r is None or r["speedup_vs_bf16"] is None else f"{r['speedup_vs_bf16']:.2f}x"
            line.append(cell + ("!" if (key, m, method) in bad else ""))
        table.append(line)
    heads = ["shape", "M", "bf16 us"] + [m.split(":", 1)[-1] for m in methods]
    return format_table(heads, table, "lrr" + "r" * len(methods))


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default="docs/perf", help="folder for <gpu>.json and <gpu>.md (default: docs/perf)")
    p.add_argument(
        "--shapes",
        help="comma list: model.name (llama3-8b.gate_up), a model (llama3-70b), NxK, or all "
        "(default: llama3-8b.gate_up,llama3-8b.o,llama3-70b.down,smollm2-135m.gate_up; --list shows the registry)",
    )
    p.add_argument("--all", action="store_true", help="every shape of the registry")
    p.add_argument("--m", help=f"batch sizes M, comma list (default: {','.join(map(str, M_VALUES))})")
    p.add_argument(
        "--recipes", default=",".join(DEFAULT_RECIPES), help="lowbit recipes, comma list (default: %(default)s)"
    )
    p.add_argument("--peers", default="all", help="peers, comma list, 'all' or 'none' (default: all)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "dequant", "reference"), help="lowbit kernels backend")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of the harness")
    p.add_argument("--timing", choices=("graph", "eager"), help="CUDA-graph replay (default on CUDA) or eager launches")
    p.add_argument("--rep-ms", type=float, default=20.0, help="milliseconds of replays per measurement (default: 20)")
    p.add_argument("--no-rotate", action="store_true", help="time on one weight copy (may sit in L2)")
    p.add_argument("--budget-s", type=float, help="start no new shape/method after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="file name stem (default: from the GPU name, e.g. h200)")
    p.add_argument("--e2e", action="store_true", help="the end-to-end decode figure (not built yet)")
    p.add_argument("--list", action="store_true", help="print the shape registry and exit")
    return p


def _command_line() -> str:
    """The command as typed: `lowbit bench ...`, `python -m lowbit bench ...` or
    `python -m lowbit.bench.run ...`."""
    argv0 = sys.argv[0] if sys.argv else ""
    path = argv0.replace(os.sep, "/")
    if path.endswith("bench/run.py"):
        prog = "python -m lowbit.bench.run"
    elif path.endswith("lowbit/__main__.py"):
        prog = "python -m lowbit"
    else:
        prog = os.path.basename(argv0) or "python -m lowbit.bench.run"
    return " ".join([prog, shlex.join(sys.argv[1:])]).strip()


def run_from_args(args: argparse.Namespace, command: str | None = None) -> int:
    if args.list:
        print(describe_registry())
        return 0
    if args.all and args.shapes:
        raise ValueError("give --shapes or --all, not both")
    result = run_bench(
        shapes="all" if args.all else args.shapes,
        ms=args.m,
        recipes=[r for r in args.recipes.split(",") if r.strip()],
        peers=args.peers,
        out_dir=args.out,
        e2e=args.e2e,
        device=args.device,
        backend=args.backend,
        timing=args.timing,
        rep_ms=args.rep_ms,
        rotate=not args.no_rotate,
        budget_s=args.budget_s,
        seed=args.seed,
        name=args.name,
        command=command or _command_line(),
    )
    print()
    if result.skipped:
        groups = _skip_groups(result.skipped)
        print(f"skipped ({len(result.skipped)}):")
        for (method, reason), where in groups.items():
            print(f"  {method}: {reason} [{where[:200]}]")
    ours = [f for f in result.failed if not f["method"].startswith("peer:")]
    if result.failed:
        print(f"FAILED CHECKS ({len(result.failed)}; {len(result.failed) - len(ours)} of peers, reported only):")
        for f in result.failed:
            print(f"  {f['method']} {f['shape']} M={f['m']}: {f['what']}: {_num(f['error'], '.3g')}")
    print(f"\n{result.meta.get('gpu')}, commit {result.meta.get('commit')}: speed-up over bf16 ('!' = check failed)")
    print(short_table(list(result), result.failed))
    return 1 if ours else 0  # a peer's numerics are its own: its failed check does not fail the run


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="python -m lowbit.bench.run", description=__doc__.split("\n")[0]))
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        print(f"lowbit bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
