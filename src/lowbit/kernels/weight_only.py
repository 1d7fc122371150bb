"""Weight-only matmul (A16Wn): y = x W^T (+ bias), W a quantized weight [N, K].

```python
pw = pack_weight(qt, dtype=torch.bfloat16)   # once, at load time
y = weight_only_matmul(x, pw, bias=None)     # x [..., K] bf16/fp16 -> [..., N] in x.dtype
```

Backends (``backend=``):

- ``"reference"``: pure torch on any device and float dtype
  (``weight_only_matmul_reference``: dequantize, ``F.linear``).
- ``"triton"``: the fused Triton kernels (``_weight_only_triton``) on CUDA
  tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).
- ``"dequant"``: the Triton dequantization kernel writes W^T in x's dtype into a
  temporary buffer, then cuBLAS (``torch.matmul``) multiplies: for large M.
- ``"auto"``: ``dispatch.plan``: the tuned or default choice by shape on CUDA;
  the reference on the CPU or where the Triton kernels cannot run.

"triton" and "dequant" need x in the dtype the weight was packed for (bf16 or
fp16) and a format the kernels support (``PackedWeight.triton_supported``);
otherwise they raise, naming the constraint. They never fall back. ``config=``
overrides the Triton launch config. Every path is CUDA-graph safe: no host
synchronisation; the output, split-K workspace and dequantized buffer come from
the caching allocator (a graph's private pool under capture). Run one call
before capturing, so that the kernels are compiled outside the graph.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

from . import dispatch
from .config import WeightOnlyConfig
from .packing import PackedWeight
from .ref import check_weight_only_args, weight_only_matmul_reference

logger = logging.getLogger("lowbit.kernels")

BACKENDS = ("auto", "triton", "dequant", "reference")
TRITON_X_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable ({type(e).__name__}: {e}); install it with `pip install triton`"
    return None


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unsupported(x: torch.Tensor, pw: PackedWeight) -> str | None:
    """Why the Triton backend cannot run this call, or None if it can."""
    err = _triton_import_error()
    if err:
        return err
    if not pw.triton_supported:
        return pw.unsupported
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpret()):
        return f"x is on {x.device}: the Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    if pw.device != x.device:
        return f"the weight is on {pw.device} and x on {x.device}: pack the weight on x's device"
    if x.dtype not in TRITON_X_DTYPES:
        return f"x is {x.dtype}: the Triton kernels take bfloat16 or float16 activations"
    if x.dtype != pw.dtype:
        return (f"the weight was packed for {pw.dtype} activations and x is {x.dtype}: "
                f"pack it with pack_weight(qtensor, dtype={x.dtype})")
    return None


def choose_backend(x: torch.Tensor, pw: PackedWeight) -> tuple[str, str]:
    """backend="auto": (backend, reason), from ``dispatch.plan``."""
    why = triton_unsupported(x, pw)
    if why is None and x.device.type != "cuda":
        why = f"x is on {x.device} (the kernels run on CUDA)"
    m = x.numel() // max(1, x.shape[-1])
    p = dispatch.plan(m, pw.n, pw.k, pw, x.device, x.dtype, why)
    return p.kernel, str(p)


def weight_only_matmul(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    config: WeightOnlyConfig | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W = ``pw`` (``pack_weight(qtensor, dtype=x.dtype)``).

    x [..., K] (bf16/fp16 for the kernels; any float for the reference) -> [..., N]
    in x.dtype, or in float32 with ``out_dtype=torch.float32`` (the float32 sums
    plus bias, not rounded to x's dtype: for callers that scale them further; "auto"
    then runs the Triton kernels where it would dequantize for cuBLAS).
    ``backend`` is "auto", "triton", "dequant" or "reference" (module docstring);
    ``config`` overrides the Triton launch config.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_weight_only_args(x, pw, bias)
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype ({x.dtype}) or torch.float32, got {out_dtype}")
    f32 = out_dtype == torch.float32 and x.dtype != torch.float32
    if config is not None and backend not in ("auto", "triton"):
        raise ValueError("config= applies to the Triton backend only")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    if backend == "auto":
        why = triton_unsupported(x, pw)
        if why is None and x.device.type != "cuda":
            why = f"x is on {x.device} (the kernels run on CUDA)"
        p = dispatch.plan(m, pw.n, pw.k, pw, x.device, x.dtype, why)
        if config is not None and p.kernel != "triton":
            raise ValueError(f"config= applies to the Triton backend; this call runs {p.kernel} ({p.reason})")
        backend, config = p.kernel, config or p.config
        if f32 and backend == "dequant":  # cuBLAS would round to x's dtype (in float32: ~10x slower)
            backend, config = "triton", None
    elif backend in ("triton", "dequant"):
        why = triton_unsupported(x, pw)
        if why:
            raise ValueError(f"backend={backend!r} cannot run this call: {why}")
    if backend == "reference":
        if f32:  # the same products, summed and returned in float32
            return weight_only_matmul_reference(x, pw, bias, out_dtype=torch.float32)
        return weight_only_matmul_reference(x, pw, bias)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # the reference adds bias in x's dtype
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # Triton launches on the current device
        if backend == "dequant":
            y = _dequant_matmul(x2, pw, bias, f32)
        else:
            y = _triton_matmul(x2, pw, bias, config, torch.float32 if f32 else x2.dtype)
    return y.reshape(*lead, pw.n)


def _dequant_matmul(x2, pw, bias, f32: bool = False):
    from . import _weight_only_triton

    m = x2.shape[0]
    if m == 0:
        return torch.empty((0, pw.n), dtype=torch.float32 if f32 else x2.dtype, device=x2.device)
    wt = _weight_only_triton.dequantize_t(pw, x2.dtype)  # [K, N]
    if f32:  # float32 sums of the same products (x and W^T exact in float32)
        y = torch.matmul(x2.float(), wt.float())
        return y if bias is None else y + bias.float()
    if bias is not None:  # added before the output's rounding, as F.linear does
        return torch.addmm(bias, x2, wt)
    return torch.matmul(x2, wt)


def _triton_matmul(x2, pw, bias, config, out_dtype=None):
    from . import _weight_only_triton

    m = x2.shape[0]
    y = torch.empty((m, pw.n), dtype=out_dtype or x2.dtype, device=x2.device)
    if m == 0:
        return y
    if config is None:
        cfg = dispatch.default_config(m, pw.n, pw.k, pw, dispatch.num_sms(x2.device))
    else:
        cfg = config.check(pw)
    if cfg.mode == "row":
        if m != 1:
            raise ValueError(f"mode 'row' runs one token; x has {m} rows")
        from . import _row_gemv_triton

        _row_gemv_triton.launch_weight_only(x2, pw, bias, y, cfg)
        return y
    if cfg.mode == "kmajor":
        from . import _kmajor_triton

        _kmajor_triton.launch(x2, pw, bias, y, cfg)
        return y
    _weight_only_triton.launch(x2, pw, bias, y, cfg)
    return y
