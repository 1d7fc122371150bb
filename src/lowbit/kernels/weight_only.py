"""Weight-only matmul (A16Wn): y = x W^T (+ bias), W a quantized weight [N, K].

```python
pw = pack_weight(qt)                         # once, at load time
y = weight_only_matmul(x, pw, bias=None)     # x [..., K] bf16/fp16 -> [..., N] in x.dtype
```

Backends (``backend=``):

- ``"reference"``: pure torch on any device and float dtype
  (``weight_only_matmul_reference``: dequantize, ``F.linear``).
- ``"triton"``: the Triton kernels (``_weight_only_triton``) on CUDA tensors, or
  on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``). Needs
  x in bfloat16 or float16 and a weight whose format the kernels support
  (``PackedWeight.triton_supported``); otherwise it raises, naming the
  constraint. It never falls back.
- ``"auto"``: ``choose_backend`` below: Triton on CUDA when triton imports, the
  format is supported and x is bf16/fp16; the reference otherwise. The choice
  and its reason are logged at debug level (logger ``lowbit.kernels``).

The kernel config (orientation, tile sizes, split-K, warps, stages) comes from
``default_config(m, n, k, pw)``, a fixed function of the shape (no autotuning at
call time), unless ``config=`` gives one. The Triton path is CUDA-graph safe:
no host synchronisation, the output and the split-K workspace come from the
caching allocator (a graph's private pool under capture). Run one call before
capturing, so that the kernels are compiled outside the graph.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .packing import PackedWeight
from .ref import check_weight_only_args, weight_only_matmul_reference

logger = logging.getLogger("lowbit.kernels")

BACKENDS = ("auto", "triton", "reference")
TRITON_X_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Launch config of the Triton weight-only kernel.

    mode: "swap" computes y^T = W x^T (the weight is the MMA's wide side; for
    small M), "gemm" the tiled y = x W^T (larger M), "gemv" sums products on
    the CUDA cores without the MMA (M of 1 to a few). K is walked in tiles of
    128. split_k > 1 splits K over that many programs per output tile (float32
    partials summed by a second kernel).
    """

    block_m: int
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    mode: str = "gemm"
    group_m: int = 8
    stack: bool = True  # one dot per 128-element K tile (False: one per chunk of R)

    def check(self, pw: PackedWeight) -> "WeightOnlyConfig":
        if self.mode not in ("gemm", "swap", "gemv"):
            raise ValueError(f"mode={self.mode!r}: must be 'gemm', 'swap' or 'gemv'")
        low = 1 if self.mode == "gemv" else 16
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < low or v & (v - 1):
                raise ValueError(f"{name}={v}: must be a power of two >= {low} for mode {self.mode!r}")
        if self.mode == "gemv" and self.block_m != 1:
            raise ValueError(f"block_m={self.block_m}: mode 'gemv' takes one token per program (block_m=1)")
        if self.mode == "swap" and self.block_n < 64:
            raise ValueError(f"block_n={self.block_n}: mode 'swap' needs block_n >= 64 (the MMA's 64 rows)")
        if self.block_n > 256:
            raise ValueError(f"block_n={self.block_n}: at most 256 (the packed N padding)")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"split_k, group_m and num_stages must be >= 1, got {self}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps}: must be 1, 2, 4, 8 or 16")
        return self


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the CPU interpreter: keep grids small


def _pow2_at_least(v: int, lo: int) -> int:
    p = lo
    while p < v:
        p *= 2
    return p


def default_config(m: int, n: int, k: int, pw: PackedWeight, num_sms: int = 132) -> WeightOnlyConfig:
    """The config for an [m, k] x [n, k]^T product: a fixed function of the shape.

    - M <= 64: the swapped orientation (y^T = W x^T): BLOCK_N 128 weight rows,
      BLOCK_M = M rounded up to 16, 32 or 64 tokens; 4 warps, 4 stages.
    - M > 64: the tiled GEMM, 64x128 (M <= 128, 4 warps) or 128x128 (8 warps), 3 stages.
    - Split-K when the output tiles give fewer than two programs per SM: up to
      that many splits, at least two K tiles per split, and a float32 workspace
      of at most a quarter of the weight's bytes.
    """
    if pw.layout is None:
        raise ValueError(f"{pw.fmt}: no Triton layout ({pw.unsupported})")
    return _default_config(m, n, k, pw.layout, num_sms)


@functools.lru_cache(maxsize=4096)
def _default_config(m: int, n: int, k: int, lay, num_sms: int) -> WeightOnlyConfig:
    if m <= 64:
        mode, block_m, block_n = "swap", _pow2_at_least(m, 16), 128
        num_warps, num_stages = 4, 4
    else:
        mode = "gemm"
        block_m = 64 if m <= 128 else 128
        block_n = 128
        num_warps = 4 if block_m == 64 else 8
        num_stages = 3
    tiles = -(-m // block_m) * -(-n // block_n)
    split = 1
    if tiles < 2 * num_sms:
        by_sms = -(-2 * num_sms // tiles)
        by_workspace = (k * lay.bits) // (128 * m)  # split * m * n * 4 bytes <= n * k * bits / 32
        split = max(1, min(by_sms, lay.n_tiles // 2, by_workspace, 16))
    return WeightOnlyConfig(block_m, block_n, split, num_warps, num_stages, mode)


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
    """backend="auto": (backend, reason). Triton on CUDA when it can run, else the reference."""
    if x.device.type != "cuda":
        return "reference", f"x is on {x.device} (the Triton backend runs on CUDA)"
    why = triton_unsupported(x, pw)
    if why:
        return "reference", why
    return "triton", "CUDA input, supported format and dtype"


def weight_only_matmul(
    x: torch.Tensor,
    pw: PackedWeight,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    *,
    config: WeightOnlyConfig | None = None,
) -> torch.Tensor:
    """y = x W^T + bias with W = ``pw`` (``pack_weight(qtensor)``).

    x [..., K] (bf16/fp16 for Triton; any float for the reference) -> [..., N]
    in x.dtype. ``backend`` is "auto", "triton" or "reference" (module
    docstring); ``config`` overrides the Triton launch config.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_weight_only_args(x, pw, bias)
    if backend == "auto":
        backend, why = choose_backend(x, pw)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "weight_only_matmul %s W[%d, %d], x %s %s on %s: backend=%s (%s)",
                pw.fmt, pw.n, pw.k, list(x.shape), x.dtype, x.device, backend, why,
            )
    elif backend == "triton":
        why = triton_unsupported(x, pw)
        if why:
            raise ValueError(f"backend='triton' cannot run this call: {why}")
    if backend == "reference":
        if config is not None:
            raise ValueError("config= applies to the Triton backend only")
        return weight_only_matmul_reference(x, pw, bias)
    return _triton_matmul(x, pw, bias, config)


def _triton_matmul(x, pw, bias, config):
    from . import _weight_only_triton

    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, pw.n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, pw.n)
    if config is None:
        cfg = default_config(m, pw.n, pw.k, pw, _num_sms(x.device))
    else:
        cfg = config.check(pw)
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()  # the reference adds bias in x's dtype
    if x.is_cuda:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            _weight_only_triton.launch(x2, pw, bias, y, cfg)
    else:
        _weight_only_triton.launch(x2, pw, bias, y, cfg)
    return y.reshape(*lead, pw.n)
