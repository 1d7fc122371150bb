"""Benchmarks are programs, not timed tests (DESIGN.md, convention 10).

    shapes.py   registry of real linear shapes (Llama-3-8B, Llama-3-70B, SmolLM2-135M), M values
    timing.py   CUDA-graph replay timing (median) and the roofline of a matmul
    peers.py    bf16 cuBLAS baseline and peers (tinygemm, gemlite, cuBLAS FP8), each checked
    run.py      run_bench(...) and `python -m lowbit.bench.run`: rows -> docs/perf/<gpu>.json/.md

Run on the H200: `bash scripts/gpu_session.sh` (GPU tests, then the benchmark).
"""

from .shapes import DEFAULT_SHAPES, M_VALUES, SHAPES, Shape, select_shapes

__all__ = ["DEFAULT_SHAPES", "M_VALUES", "SHAPES", "Shape", "run_bench", "select_shapes"]


def run_bench(*args, **kwargs):
    """See lowbit.bench.run.run_bench (imported on use)."""
    from .run import run_bench as _run

    return _run(*args, **kwargs)
