"""Which kernel and launch config runs a weight-only matmul: ``plan(m, n, k, pw, device)``.

The decision, in order:

1. CPU (no interpreter), float32/float64 input, or a weight the Triton kernels
   do not take -> ``reference`` (dequantize + ``F.linear``).
2. A weight that carries K-major codes (``packing.with_kmajor``: 4-bit ints,
   groups of a multiple of 128 or one scale per row) and 2 <= M <= 128 ->
   the K-major kernel (``kmajor_config``; not covered by tuning yet).
3. A tuned entry for this GPU and (format, dtype, N, K, M bucket) in the
   user's cache (``cache_path``, written by ``tune`` / ``lowbit tune``).
4. M = 1 and 8-bit int or FP8 codes with one scale per row (the weight keeps
   its canonical [N, K] bytes, ``PackedWeight.row_codes``) -> the row GEMV
   (``ROW_CONFIG``).
5. A tuned entry in the table shipped in kernels/tuned/ for the GPU model (the
   H200's covers the benchmark registry's shapes).
6. Otherwise the default rule, measured on the H200 (sm_90; the H100 is the
   same chip family, run with this rule untuned) in docs/perf/experiments/:

   =========  ==========================================================
   M          kernel
   =========  ==========================================================
   1          ``triton`` GEMV (no MMA; each thread sums its column's
              products; 4/8-bit integer and FP8 codes in float32),
              BLOCK_N 64, 2 warps, split-K 4
   2 - 64     ``triton`` swapped MMA (y^T = W x^T, the weight is the wide
              side), BLOCK_N 128, 8 warps, split-K to fill the SMs
   65 - 383   ``triton`` tiled GEMM 128 x 256, 8 warps
   >= 384     ``dequant``: the kernel's dequantization into a bf16/fp16
              buffer, then cuBLAS (the fused GEMM is slower here)
   =========  ==========================================================

   2-bit codes take ``dequant`` from M = 2 on: their MMA kernels measured
   2-3x slower than it on the H200 at M = 16 and 128 (scripts/int2_probe.py).

M buckets: 1, then powers of two up to 8192 (M is rounded up). The choice is
logged at debug level (logger ``lowbit.kernels``) with its source, once per
(shape, bucket). Everything here is a pure function of shapes and device
properties: no host synchronisation, so a planned call is safe to capture in a
CUDA graph.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .packing import PackedWeight, has_f32_gemv
from .config import WeightOnlyConfig

logger = logging.getLogger("lowbit.kernels")

KERNELS = ("triton", "dequant", "reference")
DEQUANT_FROM_M = 384  # default: dequantize + cuBLAS from this M on
TUNE_TOL = 0.02  # tune: max |y - y_ref| / max |y_ref| a candidate may have (the bench checks 0.01)
CACHE_VERSION = 1


@dataclass(frozen=True)
class Plan:
    """What runs: ``kernel`` in KERNELS, its Triton ``config`` (None for the
    others), where the choice came from, and why."""

    kernel: str
    config: WeightOnlyConfig | None
    source: str
    reason: str

    def __str__(self) -> str:
        cfg = "" if self.config is None else f" {self.config}"
        return f"{self.kernel}{cfg} [{self.source}: {self.reason}]"


def m_bucket(m: int) -> int:
    """1, 2, 4, ..., 8192: M rounded up to a power of two (capped)."""
    b = 1
    while b < m and b < 8192:
        b *= 2
    return b


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


def default_config(m: int, n: int, k: int, pw: PackedWeight, num_sms: int = 132) -> WeightOnlyConfig:
    """The shipped Triton config for an [m, k] x [n, k]^T product (table above)."""
    if pw.layout is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported})")
    return _default_config(m, n, pw.layout.n_tiles, num_sms, has_f32_gemv(pw.layout.family, pw.layout.bits))


@functools.lru_cache(maxsize=4096)
def _default_config(m: int, n: int, n_tiles: int, num_sms: int, f32_gemv: bool = False) -> WeightOnlyConfig:
    if m == 1:  # integer and FP8 codes: the float32 GEMV (for ints the fastest on the H200 at every measured shape)
        split = max(1, min(4, n_tiles // 2))
        return WeightOnlyConfig(1, 64, split, 2, 3, "gemv", int_f32=f32_gemv)
    if m <= 64:
        block_m, block_n = _pow2_at_least(m, 16), 128
        tiles = -(-n // block_n)
        split = max(1, min(4, n_tiles // 2, -(-(3 * num_sms) // (2 * tiles))))
        return WeightOnlyConfig(block_m, block_n, split, 8, 3, "swap")
    block_m, block_n = 128, 256
    tiles = -(-m // block_m) * -(-n // block_n)
    split = 1
    if tiles < num_sms:  # a few row blocks of a short N: split K to fill the SMs
        split = max(1, min(4, n_tiles // 2, -(-num_sms // tiles)))
    return WeightOnlyConfig(block_m, block_n, split, 8, 3, "gemm", stack=False)


KMAJOR_MAX_M = 128  # K-major codes (``packing.with_kmajor``): its kernel from M = 2 to this (as measured)


# M = 1, 8-bit int or FP8 codes with one scale per row (``packing.row_supported``): the
# row GEMV on the canonical [N, K] bytes, before the shipped table (whose M = 1 entries
# for these formats were tuned among the word-layout GEMV configs). 2 rows x 1024 bytes
# per step, 2 warps: the fastest or within 2% of it for int8 and FP8 on 28672x4096 and
# 8192x28672 (docs/perf/experiments/row-gemv-h200.md).
ROW_CONFIG = WeightOnlyConfig(1, 2, 1, 2, 1, "row", block_k=1024)


def _usable(p: "Plan | None", pw: PackedWeight) -> "Plan | None":
    """A cached plan, unless it names the row GEMV for a weight without its row codes."""
    if p is not None and p.config is not None and p.config.mode == "row" and pw.row_codes is None:
        return None
    return p


def kmajor_config(m: int, n: int, n_tiles: int, num_sms: int = 132) -> WeightOnlyConfig:
    """The K-major kernel's config for a weight that carries K-major codes, 2 <= M <=
    KMAJOR_MAX_M (measured on the H200, docs/perf/experiments/kmajor-h200.md): 128-row
    tiles with 8 warps when they fill the SMs, else 64-row tiles with split-K."""
    if m > 64:
        tiles = -(-n // 128) * -(-m // 128)
        split = max(1, min(2, n_tiles // 2, -(-num_sms // tiles)))
        return WeightOnlyConfig(128, 128, split, 8, 3, "kmajor")
    bm = _pow2_at_least(m, 16)
    if -(-n // 128) >= num_sms:
        return WeightOnlyConfig(bm, 128, 1, 8, 3, "kmajor")
    tiles = -(-n // 64)
    split = max(1, min(4, n_tiles // 2, -(-(3 * num_sms) // tiles)))
    return WeightOnlyConfig(bm, 64, split, 4, 3, "kmajor")


# ---------------------------------------------------------------- tuning cache


def gpu_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu-interpreter"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def cache_dir() -> Path:
    """$LOWBIT_CACHE_DIR, else ~/.cache/lowbit (XDG_CACHE_HOME honoured)."""
    env = os.environ.get("LOWBIT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit"


def cache_path(device: torch.device) -> Path:
    return cache_dir() / "tuning" / f"{_slug(gpu_name(device))}.json"


def cache_key(pw: PackedWeight, n: int, k: int, m: int, dtype: torch.dtype) -> str:
    lay = pw.layout
    group = "channel" if lay.group == 0 else f"g{lay.group}"
    dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    fam = lay.family if lay.family[-1].isdigit() else f"{lay.family}{lay.bits}"  # int4, mx8, fp8, nvfp4
    return f"{fam}-{group}-{dt}-{n}x{k}-m{m_bucket(m)}"


class TuningCache:
    """The on-disk tuning results of one GPU: {key: {"kernel", "config", "us", "bf16_us"}}."""

    def __init__(self, path: Path, gpu: str):
        self.path = Path(path)
        self.gpu = gpu
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                logger.warning("ignoring the unreadable tuning cache %s (%s); `lowbit tune` rewrites it", self.path, e)
                data = {}
            if data.get("version") == CACHE_VERSION and data.get("gpu") == gpu:
                self.entries = dict(data.get("entries", {}))
            elif data:
                logger.warning("ignoring tuning cache %s: written for %s (version %s), not %s (version %s)",
                               self.path, data.get("gpu"), data.get("version"), gpu, CACHE_VERSION)

    def get(self, key: str) -> Plan | None:
        e = self.entries.get(key)
        if e is None:
            return None
        cfg = None if e.get("config") is None else WeightOnlyConfig(**e["config"])
        return Plan(e["kernel"], cfg, f"tuned ({self.path.name})", f"{e.get('us', float('nan')):.1f} us when tuned")

    def put(self, key: str, kernel: str, config: WeightOnlyConfig | None, us: float, bf16_us: float | None) -> None:
        self.entries[key] = {"kernel": kernel, "config": None if config is None else asdict(config),
                             "us": us, "bf16_us": bf16_us}

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "gpu": self.gpu, "torch": torch.__version__,
                                   "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "entries": self.entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        return self.path


@functools.lru_cache(maxsize=None)
def _cache_for(path: str, gpu: str) -> TuningCache:
    return TuningCache(Path(path), gpu)


def load_cache(device: torch.device) -> TuningCache:
    return _cache_for(str(cache_path(device)), gpu_name(device))


SHIPPED_DIR = Path(__file__).parent / "tuned"


def shipped_cache(device: torch.device) -> TuningCache:
    """The tuning results shipped with lowbit for this GPU model (kernels/tuned/<gpu>.json),
    measured with ``lowbit tune`` on that GPU; empty for other GPUs."""
    return _cache_for(str(SHIPPED_DIR / f"{_slug(gpu_name(device))}.json"), gpu_name(device))


def forget_loaded_caches() -> None:
    """Re-read the cache files on the next plan (after ``tune`` or for tests)."""
    _cache_for.cache_clear()
    _logged.clear()


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: keep grids small


_logged: set = set()


def plan(m: int, n: int, k: int, pw: PackedWeight, device: torch.device, dtype: torch.dtype,
         triton_ok: str | None = None) -> Plan:
    """The kernel for y[m, n] = x[m, k] @ W^T with x of ``dtype`` on ``device``.

    ``triton_ok``: why the Triton kernels cannot run this call (None if they
    can; ``weight_only.triton_unsupported`` computes it).
    """
    if triton_ok is not None:
        p = Plan("reference", None, "rule", triton_ok)
    elif pw.kbytes is not None and 2 <= m <= KMAJOR_MAX_M:
        cfg = kmajor_config(m, n, pw.layout.n_tiles, num_sms(device))
        p = Plan("triton", cfg, "kmajor", f"M={m}: the weight carries K-major codes")
    else:
        key = cache_key(pw, n, k, m, dtype)
        p = _usable(load_cache(device).get(key), pw)
        if p is None and m == 1 and pw.row_codes is not None:
            p = Plan("triton", ROW_CONFIG, "row", "M=1, 8-bit codes one scale per row: the row GEMV")
        p = p or _usable(shipped_cache(device).get(key), pw)
        if p is None:
            sms = num_sms(device)
            if m >= DEQUANT_FROM_M and device.type == "cuda":
                p = Plan("dequant", None, "default", f"M={m} >= {DEQUANT_FROM_M}: dequantize + cuBLAS")
            elif m > 1 and pw.layout.bits == 2 and device.type == "cuda":
                p = Plan("dequant", None, "default", f"M={m}, 2-bit codes: dequantize + cuBLAS "
                         "(their MMA kernels measured 2-3x slower, scripts/int2_probe.py)")
            else:
                cfg = default_config(m, n, k, pw, sms)
                p = Plan("triton", cfg, "default", f"M={m}: {cfg.mode}")
    if logger.isEnabledFor(logging.DEBUG):
        key = (pw.fmt, n, k, m_bucket(m), str(dtype), device.type)
        if key not in _logged:
            _logged.add(key)
            logger.debug("weight_only_matmul %s W[%d, %d] M=%d %s on %s: %s", pw.fmt, n, k, m, dtype, device, p)
    return p


# ---------------------------------------------------------------- tuning


def candidate_configs(m: int, fmt_family: str, n: int = 4096, n_tiles: int = 32, num_sms: int = 132,
                      bits: int = 4, row: bool = False) -> list:
    """The launch configs ``tune`` times for M (a short list around the defaults);
    "dequant" stands for dequantize + cuBLAS. row: the weight has row codes (the row GEMV)."""
    out: list = []
    if m == 1 and row:
        out += [WeightOnlyConfig(1, bn, 1, warps, 1, "row", block_k=bk)
                for bn, warps, bk in itertools.product((1, 2, 4), (1, 2, 4), (1024, 2048))]
    if m == 1:
        f32 = has_f32_gemv(fmt_family, bits)  # the float32 GEMV (the 16-bit one as a fallback below)
        for (bn, warps), pf, split in itertools.product(((32, 1), (32, 2), (64, 2), (64, 4), (128, 4)), (1, 2),
                                                        (1, 2, 4, 6, 8)):
            out.append(WeightOnlyConfig(1, bn, split, warps, 3, "gemv", int_f32=f32, prefetch=pf))
            if f32 and bits == 4 and warps == 4:  # 72 registers: 7 programs per SM, no spill
                out.append(WeightOnlyConfig(1, bn, split, warps, 3, "gemv", int_f32=True, prefetch=pf, max_regs=72))
        if f32:
            out += [WeightOnlyConfig(1, 64, s, 4, 3, "gemv") for s in (4, 8)]
        out += [WeightOnlyConfig(16, 128, s, 8, 3, "swap") for s in (2, 4)]
    elif m <= 64:
        bm = _pow2_at_least(m, 16)
        out += [WeightOnlyConfig(bm, bn, s, 8, 3, "swap") for bn in (128, 256) for s in (1, 2, 4)]
    else:
        for bm, bn, w in ((64, 128, 4), (64, 256, 8), (128, 128, 8), (128, 256, 8)):
            if bm == 64 and m > 256:
                continue
            tiles = -(-m // bm) * -(-n // bn)
            splits = {1, max(1, min(8, n_tiles // 2, -(-num_sms // tiles)))}  # and enough to fill the SMs
            out += [WeightOnlyConfig(bm, bn, sp, w, 3, "gemm", stack=False) for sp in sorted(splits)]
    if m >= 128:
        out.append("dequant")
    return out


def confirm_fastest(timed: list[tuple], time_again, top: int = 3, rounds: int = 2) -> tuple:
    """timed: (microseconds, ...) per candidate from one pass. Candidates within a few
    percent of each other are ranked by the GPU's drift in a single pass (the H200 moved
    5-10% between runs), so the ``top`` fastest are timed ``rounds`` more times,
    interleaved (``time_again(entry)`` -> microseconds); the one with the lowest median
    wins, returned with that median as its time."""
    finalists = sorted(timed, key=lambda t: t[0])[:top]
    samples = [[t[0]] for t in finalists]
    for _ in range(rounds):
        for i, t in enumerate(finalists):
            samples[i].append(time_again(t))
    medians = [sorted(v)[len(v) // 2] for v in samples]
    i = min(range(len(finalists)), key=medians.__getitem__)
    return (medians[i],) + tuple(finalists[i][1:])


def tune(shapes, recipes, ms, device=None, dtype=torch.bfloat16, cache: TuningCache | None = None,
         budget_s: float | None = None, log=print) -> TuningCache:
    """Time the candidate kernels for every (recipe, shape [(n, k), ...], M) on a CUDA
    device and record the fastest in the tuning cache (saved to disk). Returns the cache."""
    from ..formats import quantize_tensor
    from ..nn.recipes import parse_recipe
    from .packing import pack_weight
    from .weight_only import weight_only_matmul

    device = torch.device(device or "cuda")
    if device.type != "cuda":
        raise ValueError("tune times kernels on a CUDA GPU; this machine has none (the defaults apply)")
    from ..bench.timing import cycle_calls, time_cuda_graph, weight_copies

    cache = cache or load_cache(device)
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(0)
    from tqdm.auto import tqdm

    from .w4a8 import FOLD_MIN_M, tuned_recipes

    expanded: list[str] = []
    for recipe in recipes:  # a W4A8 recipe runs other recipes' kernels: tune those
        parts = tuned_recipes(recipe)
        if parts:
            log(f"{recipe}: its kernels are {' and '.join(parts)}'s (the FP8 GEMM after the fold, the "
                f"weight-only kernels below {FOLD_MIN_M} tokens); tuning those")
        expanded += [p for p in (parts or (recipe,)) if p not in expanded]
    recipes = expanded
    bar = tqdm(total=len(recipes) * len(shapes) * len(ms), desc="tune", unit="case")
    for recipe in recipes:
        r = parse_recipe(recipe)
        if r.activation.fmt is not None:
            from .a8w8 import tune_a8w8

            def budget_left():
                return budget_s is None or time.time() - t0 <= budget_s

            tune_a8w8(recipe, shapes, ms, device, dtype, cache, log=log, budget_left=budget_left, bar=bar)
            continue
        for n, k in shapes:
            w = torch.randn(n, k, device=device, generator=gen, dtype=torch.float32) * 0.02
            pw = pack_weight(quantize_tensor(w, r.weight_fmt, **r.weight_options), dtype=dtype)
            wb = w.to(dtype)
            del w
            if not pw.triton_supported:
                log(f"{recipe} {n}x{k}: no kernel ({pw.unsupported}); the reference runs")
                bar.update(len(ms))
                continue
            # timed calls cycle through weight copies totalling >= 4x L2, as the benchmark
            # does: one copy of a weight a few times the L2 still partly hits it between
            # replays (about 10% on 8192x28672 int8, docs/perf/experiments/row-gemv-h200.md)
            pws = weight_copies(pw, lambda: pack_weight(quantize_tensor(
                torch.randn(n, k, device=device, generator=gen) * 0.02, r.weight_fmt, **r.weight_options), dtype=dtype),
                pw.nbytes, device)
            wbs = weight_copies(wb, lambda: torch.randn(n, k, device=device, generator=gen).to(dtype),
                                wb.numel() * wb.element_size(), device)
            for m in ms:
                bar.update(1)
                if budget_s is not None and time.time() - t0 > budget_s:
                    log("tuning budget spent; stopping (what was measured is saved)")
                    bar.close()
                    cache.save()
                    forget_loaded_caches()
                    return cache
                x = torch.randn(m, k, device=device, generator=gen).to(dtype)
                bf16_us = time_cuda_graph(cycle_calls([lambda w=w: torch.nn.functional.linear(x, w) for w in wbs]),
                                          rep_ms=5.0)
                y_ref = weight_only_matmul(x, pw, backend="reference").float()

                def rotated(kernel, cfg):
                    return cycle_calls([lambda p=p: weight_only_matmul(x, p, backend=kernel, config=cfg)
                                        for p in pws])

                ref_max = float(y_ref.abs().max()) or 1.0
                timed = []
                for cand in candidate_configs(m, pw.layout.family, n, pw.layout.n_tiles, num_sms(device),
                                              pw.layout.bits, row=pw.row_codes is not None):
                    kernel, cfg = ("dequant", None) if cand == "dequant" else ("triton", cand)
                    try:
                        fn = (lambda: weight_only_matmul(x, pw, backend=kernel, config=cfg))
                        err = float((fn().float() - y_ref).abs().max()) / ref_max
                        if not err <= TUNE_TOL:  # a wrong result is never recorded, however fast
                            log(f"tune: {kernel} {cfg} rejected: relative error {err:.3g} > {TUNE_TOL}")
                            continue
                        us = time_cuda_graph(rotated(kernel, cfg), rep_ms=5.0)
                    except Exception as e:  # a config that does not fit (shared memory, registers)
                        logger.debug("tune: %s %s failed: %s", kernel, cfg, e)
                        continue
                    timed.append((us, kernel, cfg))
                if not timed:
                    continue
                us, kernel, cfg = confirm_fastest(timed, lambda t: time_cuda_graph(rotated(t[1], t[2]), rep_ms=5.0))
                cache.put(cache_key(pw, n, k, m, dtype), kernel, cfg, us, bf16_us)
                log(f"{recipe} {n}x{k} M={m}: {kernel} {'' if cfg is None else cfg} {us:.1f} us "
                    f"(bf16 {bf16_us:.1f} us, {bf16_us / us:.2f}x)")
            del pw, wb, pws, wbs
    bar.close()
    path = cache.save()
    log(f"tuning cache: {path}")
    forget_loaded_caches()
    return cache
