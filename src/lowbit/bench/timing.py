"""Timing (CUDA-graph replay, median) and the roofline of a matmul.

Timing
------
``time_cuda_graph(fn)`` captures many calls of ``fn`` in one CUDA graph and times
its replays (``triton.testing.do_bench_cudagraph(fn, rep, return_mode="median")``):
what a serving engine does for decode, and free of Python launch overhead. Without
triton, the same is done with ``torch.cuda.graph`` and CUDA events (warm-up call,
5-call estimate, capture of enough calls to fill ``rep_ms``, 10 replays, median
per call). ``time_eager(fn)`` times plain launches (``triton.testing.do_bench``,
median, L2 flushed between calls; CUDA events without triton; ``perf_counter`` on
the CPU). All return microseconds per call.

Roofline
--------
For y[M, N] = x[M, K] @ W[N, K]^T:

    bytes  = weight_bytes + M*K*2 (bf16 activations) + M*N*2 (bf16 output)
    flops  = 2*M*N*K
    ideal  = max(bytes / COPY_BW, flops / MMA_RATE)        (seconds)
    roofline_pct = 100 * ideal / measured

COPY_BW = 4.27e12 B/s (device-to-device copy on the H200, bytes read + written);
MMA_RATE = 672e12 FLOP/s for bf16 tensor cores (every weight-only method and bf16
itself), 1269e12 for an FP8 matmul (the FP8 peer); both measured on the H200
(shared/GPU.md). Whichever bound is tighter (the larger time) is the ideal.

weight_bytes is what an ideal kernel must read: bf16 weights 2 bytes/element;
a quantized weight its packed codes plus its scales, zero points and global scale,
where software scales count as 16-bit (bf16: what a kernel keeps; the canonical
QTensor may store them as float32) and 8-bit scales (MX E8M0, NVFP4 E4M3) as
1 byte: ``nominal_weight_bytes(qt)``. So int4 g128 affine costs
0.5 + 4/128 bytes/element (62.4 MB for 28672x4096) and MXFP4 0.5 + 1/32.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

COPY_BW = 4.27e12  # B/s
BF16_FLOPS = 672e12  # FLOP/s
FP8_FLOPS = 1269e12  # FLOP/s


def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def matmul_bytes(m: int, n: int, k: int, weight_bytes: int, act_bytes: int = 2, out_bytes: int = 2) -> int:
    """Fewest bytes an [M,K] x [N,K]^T matmul moves: weights once, activations once, output once."""
    return int(weight_bytes) + m * k * act_bytes + m * n * out_bytes


def ideal_us(
    m: int, n: int, k: int, weight_bytes: int, flops_rate: float = BF16_FLOPS, bandwidth: float = COPY_BW
) -> float:
    """The roofline time in microseconds: max(bytes / bandwidth, flops / flops_rate)."""
    t_mem = matmul_bytes(m, n, k, weight_bytes) / bandwidth
    t_math = matmul_flops(m, n, k) / flops_rate
    return 1e6 * max(t_mem, t_math)


def roofline_pct(
    us: float,
    m: int,
    n: int,
    k: int,
    weight_bytes: int,
    flops_rate: float = BF16_FLOPS,
    bandwidth: float = COPY_BW,
) -> float:
    """100 * ideal time / measured time (100 = at the roofline)."""
    if not us or us <= 0 or not math.isfinite(us):
        return float("nan")
    return 100.0 * ideal_us(m, n, k, weight_bytes, flops_rate, bandwidth) / us


def bf16_weight_bytes(n: int, k: int) -> int:
    return 2 * n * k


def nominal_weight_bytes(qt) -> int:
    """Bytes an ideal kernel reads for a QTensor: codes + scales/zeros at 16 bits at most
    (8-bit scales stay 1 byte) + a global scale (see the module docstring)."""
    total = qt.codes.numel() * qt.codes.element_size()
    for t in (qt.scales, qt.zeros):
        if t is not None:
            total += t.numel() * min(t.element_size(), 2)
    if qt.global_scale is not None:
        total += qt.global_scale.numel() * qt.global_scale.element_size()
    return int(total)


# --------------------------------------------------------------------------- timing


def _triton_testing():
    try:
        import triton.testing as tt
    except Exception:  # triton absent or broken: the torch fallbacks below
        return None
    return tt


def time_cuda_graph(fn: Callable[[], object], rep_ms: float = 20.0) -> float:
    """Median microseconds per call of ``fn`` replayed in a CUDA graph.

    ``fn`` takes no argument and must be capturable (no host syncs, no CPU tensors).
    It is called a few times eagerly first (warm-up, compilation, autotuning).
    """
    tt = _triton_testing()
    if tt is not None and hasattr(tt, "do_bench_cudagraph"):
        try:
            ms = tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        except TypeError:  # a triton without return_mode
            return _torch_graph_us(fn, rep_ms)
        return 1000.0 * float(ms)
    return _torch_graph_us(fn, rep_ms)


def _torch_graph_us(fn: Callable[[], object], rep_ms: float, replays: int = 10) -> float:
    """The fallback of time_cuda_graph: torch.cuda.graph capture + CUDA events."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        est_ms = start.elapsed_time(end) / 5
    n = max(1, int(rep_ms / est_ms)) if est_ms > 0 else 1000
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    del graph
    return 1000.0 * statistics.median(times)


def time_eager(fn: Callable[[], object], rep_ms: float = 100.0, device: str = "cuda") -> float:
    """Median microseconds per eager call (Python launch overhead included)."""
    if not str(device).startswith("cuda"):
        return _cpu_us(fn, rep_ms)
    tt = _triton_testing()
    if tt is not None:
        try:
            return 1000.0 * float(tt.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        except TypeError:
            pass
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 5 or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= 10000:
            break
    return 1000.0 * statistics.median(times)


def _cpu_us(fn: Callable[[], object], rep_ms: float) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def rotation_copies(weight_bytes: int, l2_bytes: int, factor: float = 4.0, cap: int = 64) -> int:
    """How many copies of a weight to cycle through so that the set is >= factor x L2
    (then replayed calls stream weights from HBM, as a decode step does, not from L2)."""
    if weight_bytes <= 0:
        return 1
    return int(min(cap, max(1, math.ceil(factor * l2_bytes / weight_bytes))))


DEFAULT_L2 = 50 * 2**20  # bytes; the H200's is 60 MiB


def l2_bytes(device) -> int:
    """The GPU's L2 cache size in bytes (DEFAULT_L2 elsewhere)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2)
    return DEFAULT_L2


def cycle_calls(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One zero-argument call that runs fns[0], fns[1], ... in turn, so that a CUDA graph
    capturing it many times walks through weight copies (``rotation_copies``)."""
    state = {"i": 0}

    def fn():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return fn


def weight_copies(first, make: Callable[[], object], weight_bytes: int, device) -> list:
    """[first] plus make()'s new copies (each with its own tensors), so that the set of
    weight_bytes each totals >= 4x the device's L2 (``rotation_copies``)."""
    return [first] + [make() for _ in range(rotation_copies(weight_bytes, l2_bytes(device)) - 1)]
