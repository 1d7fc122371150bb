"""Compile every kernel variant the GPU runs for Hopper (sm_90) on a machine without a GPU
(run by test_sm90_compile.py in a process of its own: Triton decides at import whether its
library functions are interpreted, and the interpreter tests need them so).

Triton's interpreter runs Python semantics, so code Triton's compiler rejects can pass every
interpreter test (b2fb166: two device functions returning from two constexpr branches ran in
the interpreter and failed to compile on the H200). Here Triton's driver is replaced by one
that reports an sm_90 target and every launch becomes a warm-up (compile only). The calls go
through lowbit's own launch code with the GPU's arguments (inline PTX, FP8 views, the GPU's
constexprs) on CPU tensors whose contents do not matter; ptxas assembles the result, so PTX
errors show too. Prints one line per case ("ok" or "FAILED ..."); exit status 1 on a failure.
"""

import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from lowbit import quantize_tensor  # noqa: E402
from lowbit.kernels import a8w8 as A  # noqa: E402
from lowbit.kernels import act_quant, dispatch, packing, weight_only  # noqa: E402
from lowbit.kernels.config import WeightOnlyConfig  # noqa: E402


class _Hopper:
    """A Triton driver for compiling only: an sm_90 target, device 0, no stream."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


_run = jit.JITFunction.run
jit.JITFunction.run = lambda self, *a, grid, warmup, **kw: _run(self, *a, grid=grid, warmup=True, **kw)
driver.set_active(_Hopper())

DTYPES = (torch.bfloat16, torch.float16)
WEIGHTS = {
    "int4-g128": ("int4", {"group_size": 128}),
    "int4-g128-sym": ("int4", {"group_size": 128, "symmetric": True}),
    "int4-g32": ("int4", {"group_size": 32}),
    "int2-g64": ("int2", {"group_size": 64}),
    "int8": ("int8", {}),
    "fp8": ("fp8_e4m3", {}),
    "fp8-e5m2": ("fp8_e5m2", {}),
    "mxfp8": ("mxfp8_e4m3", {}),
    "mxfp4": ("mxfp4", {}),
    "nvfp4": ("nvfp4", {}),
}
N, K = 256, 512


def _weight(fmt, opts):
    g = torch.Generator().manual_seed(0)
    return quantize_tensor(torch.randn(N, K, generator=g) * 0.02, fmt, **opts)


def weight_only_cases():
    from lowbit.kernels import _weight_only_triton

    for name, (fmt, opts) in WEIGHTS.items():
        for dtype in DTYPES:
            pw = packing.pack_weight(_weight(fmt, opts), dtype=dtype)
            if not pw.triton_supported:
                raise ValueError(f"{name}: {pw.unsupported}")
            configs = {dispatch.default_config(m, N, K, pw) for m in (1, 16, 128, 1024)}
            configs.add(WeightOnlyConfig(16, 64, split_k=3, mode="swap"))
            if packing.row_supported(pw.layout) is None:
                configs.add(dispatch.ROW_CONFIG)
            for cfg in sorted(configs, key=repr):
                m = 1 if cfg.mode in ("gemv", "row") else max(cfg.block_m, 16)
                yield (f"weight-only {name} {dtype} {cfg}",
                       lambda pw=pw, cfg=cfg, m=m, dtype=dtype: weight_only._triton_matmul(
                           torch.zeros(m, K, dtype=dtype), pw, torch.zeros(N, dtype=dtype), cfg.check(pw)))
            if packing.kmajor_supported(pw) is None:
                pwk = packing.with_kmajor(pw)
                for m in (16, 64):
                    cfg = dispatch.kmajor_config(m, N, pw.layout.n_tiles)
                    yield (f"weight-only {name} {dtype} {cfg}",
                           lambda pwk=pwk, cfg=cfg, m=m, dtype=dtype: weight_only._triton_matmul(
                               torch.zeros(m, K, dtype=dtype), pwk, None, cfg))
            yield f"dequantize {name} {dtype}", lambda pw=pw, dtype=dtype: _weight_only_triton.dequantize_t(pw, dtype)


def a8w8_cases():
    for fmt in ("fp8_e4m3", "int8"):
        for group in (None, 128):
            for dtype in DTYPES:
                for m, k in ((3, 512), (1, 20000), (80, 20000)):  # one pass, split rows, two passes
                    yield (f"quantize_activation {fmt} group {group} {dtype} {m}x{k}",
                           lambda fmt=fmt, group=group, dtype=dtype, m=m, k=k: act_quant.quantize_activation(
                               torch.zeros(m, k, dtype=dtype), fmt, group))
                opts = {"granularity": "block", "block_shape": (128, 128)} if group else {"granularity": "channel"}
                pa = A.pack_a8w8(quantize_tensor(torch.randn(N, K) * 0.02, fmt, **opts))
                configs = {A.default_a8w8_config(m, N, pa.kq, 132, A.two_accumulators(pa)) for m in (1, 16, 128, 1024)}
                if fmt == "int8" and not group:
                    configs.add(A.ROW_CONFIG)
                for cfg in sorted(configs, key=repr):
                    m = 1 if cfg.row else max(cfg.block_m, 16)

                    def launch(pa=pa, cfg=cfg, m=m, dtype=dtype, fmt=fmt, group=group):
                        codes, sa = act_quant.quantize_activation(torch.zeros(m, K, dtype=dtype), fmt, group)
                        A._launch(codes, sa, pa, torch.zeros(N, dtype=dtype), torch.empty(m, N, dtype=dtype), cfg.check())

                    yield f"a8w8 {fmt} group {group} {dtype} {cfg}", launch


def activation_cases():
    for dtype in DTYPES:
        x = torch.zeros(5, 520, dtype=dtype)
        for fmt in act_quant.MX_FORMATS:
            yield f"quantize_activation_mx {fmt} {dtype}", lambda x=x, fmt=fmt: act_quant.quantize_activation_mx(x, fmt)
            yield (f"fake_quantize_activation_mx {fmt} {dtype}",
                   lambda x=x, fmt=fmt: act_quant.fake_quantize_activation_mx(x, fmt))
        yield f"quantize_activation_nvfp4 {dtype}", lambda x=x: act_quant.quantize_activation_nvfp4(x)


def w4a8_cases():
    from lowbit.kernels.w4a8 import FOLD_TILE, fold_weight, pack_w4a8

    pw = pack_w4a8(_weight("mxfp4", {}), dtype=None)
    for tile in (FOLD_TILE, (16, 64, 4)):
        yield f"w4a8 fold {tile}", lambda tile=tile: fold_weight(pw, tile)


def main() -> int:
    failed = total = 0
    for cases in (weight_only_cases, a8w8_cases, activation_cases, w4a8_cases):
        for name, compile_case in cases():
            total += 1
            try:
                compile_case()
                print(f"ok {name}", flush=True)
            except Exception as e:
                failed += 1
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                print(f"FAILED {name}: {type(cause).__name__}: {str(cause)[-800:]}", flush=True)
                traceback.print_exception(e, file=sys.stderr)
    print(f"{total - failed} of {total} compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
