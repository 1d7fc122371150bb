"""weight_only_matmul: the Triton kernels (run by Triton's CPU interpreter) against
independent references, on small odd shapes, for every supported format.

Two checks per call:

- tight, against the exact product (float64) of x with ``kernel_weight(pw)``,
  the weight values the kernels document (scales and biases rounded to the
  activation dtype for 4-bit ints), per output element
  |y - y_exact| <= EPS[dtype] * |y_exact| + 1e-5 * S,  S = |x| @ |W|^T (+ |bias|),
  EPS two units in the last place (the output is rounded once, the bias may
  add a second rounding);
- loose, against ``weight_only_matmul_reference`` (the canonical float32
  dequantization): max|y - y_ref| <= REF_TOL[dtype] * max(S).

The failure message gives the worst element's coordinates and the normalised
max error max|y - y_exact| / max(S).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this module

import logging

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from lowbit import quantize_tensor  # noqa: E402
from lowbit.kernels import (  # noqa: E402
    PackedWeight,
    WeightOnlyConfig,
    default_config,
    pack_weight,
    weight_only_matmul,
    weight_only_matmul_reference,
)
from lowbit.kernels import dispatch  # noqa: E402
from lowbit.kernels._weight_only_triton import dequantize_t  # noqa: E402
from lowbit.kernels.ops import weight_only_linear  # noqa: E402
from lowbit.formats.elements import decode  # noqa: E402
from lowbit.kernels.packing import (  # noqa: E402
    NVFP4_SHIFT,
    has_f32_gemv,
    kernel_weight,
    mx_exponents,
    unpack_codes_from_layout,
    with_kmajor,
)

torch.set_num_threads(1)



EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
REF_TOL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}

# (fmt, options) the Triton backend supports
COMBOS = [
    (f"int{bits}", dict(symmetric=sym, **({"group_size": g} if g else {"granularity": "channel"})))
    for bits in (4, 8)
    for sym in (False, True)
    for g in (32, 64, 128, None)
] + [
    ("mxfp4", {}),
    ("int4", dict(group_size=256)),  # a group of two 128-element tiles
    ("int4", dict(zero_point="integer", group_size=64)),
    ("int4", dict(group_size=128, scale_dtype=torch.bfloat16)),
    ("int8", dict(granularity="block", block_shape=(16, 128))),  # one scale per 16 rows
    ("int8", dict(granularity="tensor", symmetric=False, scale_dtype=torch.float16)),
    ("int2", dict(group_size=64)),
    ("int2", dict(group_size=32, symmetric=True)),
    ("int2", dict(granularity="channel")),
    ("fp8_e4m3", {}),
    ("fp8_e5m2", dict(granularity="block", block_shape=(128, 128))),
    ("fp8_e4m3", dict(granularity="tensor", scale_dtype=torch.bfloat16)),
    ("fp8_e5m2", dict(group_size=64)),
    ("mxfp8_e4m3", {}),
    ("mxfp8_e5m2", {}),
    ("nvfp4", {}),
]


def _id(c):
    fmt, opts = c
    return fmt + "".join(f"-{k}={getattr(v, '__name__', str(v).replace('torch.', ''))}" for k, v in opts.items())


def check_close(y, x, pw, bias, tag, config=None, backend="triton"):
    """y against the exact product with the kernels' weight values (tight) and
    against the reference (loose); see the module docstring. config: the launch
    config that ran (None: the default for this M); backend: "triton" or "dequant"."""
    y_ref = weight_only_matmul_reference(x, pw, bias)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, f"{tag}: {y.shape} {y.dtype} vs {y_ref.shape}"
    if y.numel() == 0:
        return
    k = x.shape[-1]
    m = x.numel() // k
    cfg = config or dispatch.default_config(m, pw.n, k, pw, dispatch.num_sms(x.device))
    f32_gemv = cfg.mode == "gemv" and cfg.int_f32 and has_f32_gemv(pw.layout.family, pw.layout.bits)
    # NVFP4: the matmul kernels' values are exact (the tensor scale is applied to the sums)
    exact_values = f32_gemv or (pw.layout.family == "nvfp4" and backend != "dequant")
    kw = kernel_weight(pw, rounded=not exact_values).double()
    x2 = x.reshape(-1, k).double()
    exact = x2 @ kw.t()
    s = x2.abs() @ kw.abs().t()
    if bias is not None:
        exact = exact + bias.to(x.dtype).double()
        s = s + bias.to(x.dtype).double().abs()
    exact, s = exact.reshape(y.shape), s.reshape(y.shape)
    yd = y.double()
    err = (yd - exact).abs().nan_to_num(float("inf"))
    bound = EPS[y.dtype] * exact.abs() + 1e-5 * s
    excess = err - bound
    worst = int(torch.argmax(excess))
    nmax = float(err.max() / s.max())
    if excess.reshape(-1)[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), y.shape))
        raise AssertionError(
            f"{tag}: y{list(idx)} = {float(yd[idx]):.6g}, exact {float(exact[idx]):.6g}, "
            f"|diff| {float(err[idx]):.3g} > bound {float(bound[idx]):.3g}; "
            f"{int((excess > 0).sum())} of {y.numel()} elements over; normalised max error {nmax:.3g}"
        )
    ref_err = float((yd - y_ref.double()).abs().max() / s.max())
    assert ref_err <= REF_TOL[y.dtype], f"{tag}: normalised error vs the reference {ref_err:.3g} > {REF_TOL[y.dtype]}"


def _data(m, n, k, dtype, bias, seed, lead=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    shape = (*lead, m, k) if lead else (m, k)
    x = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return w, x, b


def run_case(fmt, opts, m, n, k, dtype, bias, seed, lead=None, config=None, backend="triton"):
    w, x, b = _data(m, n, k, dtype, bias, seed, lead)
    qt = quantize_tensor(w, fmt, **opts)
    pw = pack_weight(qt, dtype=dtype)
    y = weight_only_matmul(x, pw, b, backend=backend, config=config)
    check_close(y, x, pw, b, f"{fmt} {opts} x{list(x.shape)} W[{n}, {k}] {dtype} bias={bias} {backend} {config}",
                config, backend)
    return pw


# Each combination runs three cases drawn in rotation from these lists, so that
# together they cover every M, K, N, dtype, bias and input rank; the default
# configs give the GEMV (M=1), swapped (M=3, 17, 64) and tiled (M=80) kernels.
MS = (1, 3, 17, 64, 80)
KS = (64, 96, 200, 576)
NS = (37, 67)
DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("combo", COMBOS, ids=[_id(c) for c in COMBOS])
def test_triton_matches_reference(combo):
    fmt, opts = combo
    i = COMBOS.index(combo)
    for j in range(3):
        m = MS[(i + j) % 5]
        k = KS[(i + 2 * j + j // 2) % 4]
        n = NS[(i + j) % 2]
        dtype = DTYPES[(i // 2 + j) % 2]
        bias = (i + j) % 3 != 0
        lead = (2,) if j == 2 else None  # a 3-D input [2, M, K]
        run_case(fmt, opts, m, n, k, dtype, bias, seed=100 * i + j, lead=lead)


# Explicit configs: every mode, stacked and per-chunk dots, split-K with a short
# last split, several row and column tiles.
CONFIGS = [
    WeightOnlyConfig(1, 32, split_k=1, mode="gemv", num_warps=1),
    WeightOnlyConfig(1, 64, split_k=3, mode="gemv", num_warps=4),
    WeightOnlyConfig(16, 64, split_k=1, mode="swap"),
    WeightOnlyConfig(32, 64, split_k=2, mode="swap", stack=False),
    WeightOnlyConfig(16, 16, split_k=2, mode="gemm"),
    WeightOnlyConfig(32, 32, split_k=1, mode="gemm", group_m=2, stack=False),
    WeightOnlyConfig(64, 64, split_k=2, mode="gemm"),
    WeightOnlyConfig(1, 32, split_k=1, mode="gemv", num_warps=2, prefetch=2),  # two tiles ahead, 3 tiles
    WeightOnlyConfig(16, 64, split_k=2, mode="swap", prefetch=2),
]


@pytest.mark.parametrize(
    "fmt,opts",
    [("int4", dict(group_size=32)), ("int8", dict(group_size=64)), ("mxfp4", {}), ("nvfp4", {}), ("mxfp8_e4m3", {}),
     ("int2", dict(group_size=32))],
    ids=["int4-g32", "int8-g64", "mxfp4", "nvfp4", "mxfp8", "int2-g32"],
)
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_triton_configs(fmt, opts, config):
    m = 1 if config.mode == "gemv" else 37
    run_case(fmt, opts, m=m, n=67, k=360, dtype=torch.bfloat16, bias=True, seed=7, config=config)


@pytest.mark.parametrize("fmt,opts", [("int4", dict(group_size=64)), ("int8", {}), ("mxfp4", {}), ("nvfp4", {}),
                                      ("fp8_e4m3", {}), ("mxfp8_e5m2", {}), ("int2", dict(group_size=64))],
                         ids=["int4-g64", "int8", "mxfp4", "nvfp4", "fp8", "mxfp8-e5m2", "int2-g64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_dequant_backend(fmt, opts, dtype):
    """backend='dequant': the dequantization kernel's W^T is kernel_weight bit for
    bit, and the product goes through torch.matmul."""
    pw = run_case(fmt, opts, m=5, n=67, k=200, dtype=dtype, bias=True, seed=9, backend="dequant")
    assert torch.equal(dequantize_t(pw, dtype).t(), kernel_weight(pw))


def test_m_zero_and_empty_leading_dims():
    w = torch.randn(37, 96)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    for backend in ("triton", "dequant"):
        for shape in ((0, 96), (2, 0, 96)):
            x = torch.randn(shape).bfloat16()
            y = weight_only_matmul(x, pw, backend=backend)
            assert y.shape == (*shape[:-1], 37) and y.dtype == torch.bfloat16
            assert weight_only_matmul_reference(x, pw).shape == y.shape


def test_strided_input():
    """x with a row stride wider than K, and a transposed (non-unit K stride) x."""
    w, _, b = _data(5, 67, 96, torch.bfloat16, True, seed=11)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    wide = torch.randn(5, 160).bfloat16()
    for x in (wide[:, 16:112], torch.randn(96, 5).bfloat16().t()):
        y = weight_only_matmul(x, pw, b, backend="triton")
        check_close(y, x, pw, b, f"stride {x.stride()}")


@pytest.mark.parametrize("fmt,needle", [("mxfp4", "exponents outside"), ("mxfp8_e4m3", "NaN block scale")])
def test_mx_nan_block_is_reference_only(fmt, needle):
    """A block with NaN gets the NaN scale (E8M0 255), which the kernels cannot
    apply: the weight is reference-only, and the reference propagates the NaN."""
    w, x, _ = _data(3, 37, 96, torch.bfloat16, False, seed=5)
    w[4, 40] = float("nan")
    pw = pack_weight(quantize_tensor(w, fmt))
    assert not pw.triton_supported and needle in pw.unsupported
    with pytest.raises(ValueError, match=needle):
        weight_only_matmul(x, pw, backend="triton")
    y = weight_only_matmul(x, pw)
    assert torch.isnan(y[:, 4]).all() and not torch.isnan(y[:, :4]).any()


@pytest.mark.parametrize("combo", COMBOS, ids=[_id(c) for c in COMBOS])
def test_packing_is_lossless(combo):
    """The Triton layout holds exactly the canonical codes, and the scales and
    biases are the canonical ones rounded once (int), or the E8M0 bytes (mxfp4)."""
    fmt, opts = combo
    n, k = 67, 200
    qt = quantize_tensor(torch.randn(n, k), fmt, **opts)
    for dtype in DTYPES:
        pw = pack_weight(qt, dtype=dtype)
        lay = pw.layout
        assert lay is not None and pw.unsupported is None and pw.dtype == dtype
        assert torch.equal(unpack_codes_from_layout(pw), qt.unpacked_codes())
        assert pw.codes.dtype == torch.int32 and pw.codes.shape == (lay.kpad * lay.bits // 32, lay.npad)
        assert lay.npad % 256 == 0 and lay.kpad % 128 == 0
        rows = torch.arange(n) // qt.tile[0]
        if fmt.startswith("mx"):  # E8M0 exponents, four per int32 word (padding 127)
            assert pw.scales.dtype == torch.int32 and pw.scales.shape == (lay.n_tiles, lay.npad)
            e = mx_exponents(pw)
            assert torch.equal(e[:, : -(-k // 32)], qt.scales.view(torch.uint8)[rows])
            assert bool((e[:, -(-k // 32):] == 127).all())
            continue
        if fmt.startswith("fp8"):
            assert pw.scales.dtype == torch.float32 and pw.biases is None
            groups = qt.scales.shape[1]
            assert torch.equal(pw.scales[:groups, :n].t(), qt.scales.float()[rows])
            continue
        if fmt == "nvfp4":  # s_b 2^shift in the dtype (exact), the tensor scale 2^7
            sb = pw.scales[: -(-k // 16), :n].t().double() * 2.0 ** -NVFP4_SHIFT[dtype]
            assert torch.equal(sb, decode(qt.scales.view(torch.uint8), "fp8_e4m3").double())
            assert float(pw.biases) == float(qt.global_scale) * 128
            continue
        s = qt.scales[rows].float()
        if qt.options["symmetric"]:
            b = -float(1 << (lay.bits - 1)) * s
        else:
            b = -qt.zeros[rows].float() * s
        kdt = dtype if lay.bits <= 4 else torch.float32
        groups = s.shape[1]
        assert pw.scales.dtype == kdt
        assert torch.equal(pw.scales[:groups, :n].t(), s.to(kdt))
        assert torch.equal(pw.biases[:groups, :n].t(), b.to(kdt))
        assert torch.count_nonzero(pw.scales[:, n:]) == 0


def test_kernel_weight_is_close_to_the_reference_weight():
    """The documented deviation of the kernels' 4-bit values from the float32
    dequantization: within one unit in the last place of the dtype of |w| plus
    of |bias| (the rounded scale and bias), i.e. a small part of a quantization step."""
    qt = quantize_tensor(torch.randn(64, 256) * 0.05, "int4", group_size=64)
    w = qt.dequantize().double()
    for dtype, ulp in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        pw = pack_weight(qt, dtype=dtype)
        step = qt.scales.double().repeat_interleave(64, dim=1)
        bias = (qt.zeros.double() * qt.scales.double()).repeat_interleave(64, dim=1)
        err = (kernel_weight(pw).double() - w).abs()
        assert bool((err <= ulp * (2 * w.abs() + bias.abs() + 16 * step)).all())
        assert float(err.max() / step.max()) < 0.1


# ---- backend choice, dispatch, custom op, errors


def test_auto_on_cpu_is_reference(caplog):
    w, x, b = _data(3, 37, 64, torch.bfloat16, True, seed=1)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    dispatch.forget_loaded_caches()
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        y = weight_only_matmul(x, pw, b)
    assert torch.equal(y, weight_only_matmul_reference(x, pw, b))
    assert "reference" in caplog.text and "cpu" in caplog.text


def test_default_plan_by_m():
    pw = pack_weight(quantize_tensor(torch.randn(256, 4096), "int4"))
    modes = {m: default_config(m, 28672, 4096, pw).mode for m in (1, 2, 16, 64, 65, 1024)}
    assert modes == {1: "gemv", 2: "swap", 16: "swap", 64: "swap", 65: "gemm", 1024: "gemm"}
    cfg = default_config(16, 8192, 28672, pw)
    assert cfg.block_m == 16 and cfg.split_k > 1  # 64 column tiles: split K to fill 132 SMs
    cpu = torch.device("cpu")
    for m, kernel in ((1, "triton"), (300, "triton")):
        assert dispatch.plan(m, 28672, 4096, pw, cpu, torch.bfloat16).kernel == kernel
    assert dispatch.plan(3, 28672, 4096, pw, cpu, torch.bfloat16, "no GPU").kernel == "reference"
    assert [dispatch.m_bucket(m) for m in (1, 2, 3, 17, 8192, 10000)] == [1, 2, 4, 32, 8192, 8192]


def test_two_bit_codes_plan_dequant_from_m2(monkeypatch, tmp_path):
    """On CUDA, 2-bit codes take the GEMV at M = 1 and dequantize + cuBLAS above (their
    MMA kernels measured slower); 4-bit codes keep the default rule's MMA kernels."""
    monkeypatch.setattr(dispatch, "gpu_name", lambda device: "Some GPU")
    monkeypatch.setattr(dispatch, "num_sms", lambda device: 132)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    dispatch.forget_loaded_caches()
    cuda = torch.device("cuda")
    two = pack_weight(quantize_tensor(torch.randn(256, 4096), "int2", group_size=64))
    four = pack_weight(quantize_tensor(torch.randn(256, 4096), "int4"))
    for m, kernel in ((1, "triton"), (2, "dequant"), (16, "dequant"), (128, "dequant"), (1024, "dequant")):
        assert dispatch.plan(m, 28672, 4096, two, cuda, torch.bfloat16).kernel == kernel, m
    assert dispatch.plan(16, 28672, 4096, four, cuda, torch.bfloat16).kernel == "triton"
    dispatch.forget_loaded_caches()


def test_tuning_cache_round_trip(tmp_path, monkeypatch, caplog):
    """A tuned entry overrides the default for its (format, dtype, shape, M bucket);
    a cache written for another GPU or version is ignored with a warning."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    dispatch.forget_loaded_caches()
    w, x, b = _data(5, 67, 200, torch.bfloat16, True, seed=3)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=64))
    cpu = torch.device("cpu")
    cache = dispatch.load_cache(cpu)
    tuned = WeightOnlyConfig(16, 32, split_k=2, mode="gemm", stack=False)
    cache.put(dispatch.cache_key(pw, 67, 200, 5, torch.bfloat16), "triton", tuned, 1.5, 3.0)
    path = cache.save()
    assert path == dispatch.cache_path(cpu) and path.exists()
    dispatch.forget_loaded_caches()
    p = dispatch.plan(5, 67, 200, pw, cpu, torch.bfloat16)
    assert p.config == tuned and p.source.startswith("tuned")
    assert dispatch.plan(5, 67, 200, pw, cpu, torch.float16).source == "default"  # other dtype
    assert dispatch.plan(9, 67, 200, pw, cpu, torch.bfloat16).source == "default"  # other M bucket
    check_close(weight_only_matmul(x, pw, b, backend="triton", config=p.config), x, pw, b, "tuned config")
    data = path.read_text().replace('"cpu-interpreter"', '"another GPU"')
    path.write_text(data)
    dispatch.forget_loaded_caches()
    with caplog.at_level(logging.WARNING, logger="lowbit.kernels"):
        assert dispatch.plan(5, 67, 200, pw, cpu, torch.bfloat16).source == "default"
    assert "another GPU" in caplog.text
    path.write_text("{not json")
    dispatch.forget_loaded_caches()
    assert dispatch.plan(5, 67, 200, pw, cpu, torch.bfloat16).source == "default"


def test_custom_op_and_torch_compile():
    w, x, b = _data(3, 67, 200, torch.bfloat16, True, seed=4)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=64))
    y = weight_only_matmul(x, pw, b, backend="triton")
    assert torch.equal(weight_only_linear(x, pw, b), y)
    compiled = torch.compile(lambda t: weight_only_linear(t, pw, b), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y)
    with pytest.raises(ValueError, match="no Triton layout"):
        weight_only_linear(x, pack_weight(quantize_tensor(w, "mxfp6_e2m3")), b)


@pytest.mark.parametrize(
    "fmt,opts,needle",
    [
        ("mxfp6_e2m3", {}, "mxfp6_e2m3"),
        ("int3", {}, "int3"),
        ("mxint8", {}, "mxint8"),
        ("int4", dict(group_size=48), "groups of 48"),
    ],
)
def test_triton_refuses_unsupported_formats(fmt, opts, needle):
    pw = pack_weight(quantize_tensor(torch.randn(5, 96), fmt, **opts))
    assert not pw.triton_supported and needle in pw.unsupported
    for backend in ("triton", "dequant"):
        with pytest.raises(ValueError, match=needle):
            weight_only_matmul(torch.randn(2, 96).bfloat16(), pw, backend=backend)


def test_triton_refuses_bad_calls(monkeypatch):
    pw = pack_weight(quantize_tensor(torch.randn(5, 64), "int4", group_size=32))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="triton")
    with pytest.raises(ValueError, match="packed for torch.bfloat16 activations and x is torch.float16"):
        weight_only_matmul(torch.randn(2, 64).half(), pw, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="cuda")
    with pytest.raises(ValueError, match="K=64"):
        weight_only_matmul(torch.randn(2, 65).bfloat16(), pw)
    with pytest.raises(ValueError, match="bias"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, torch.randn(6).bfloat16())
    with pytest.raises(ValueError, match="mode 'gemv' takes one token"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, backend="triton", config=WeightOnlyConfig(16, 32, mode="gemv"))
    with pytest.raises(ValueError, match="block_n >= 64"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, backend="triton", config=WeightOnlyConfig(16, 32, mode="swap"))
    with pytest.raises(ValueError, match="config= applies"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="reference", config=WeightOnlyConfig(16, 32))
    with pytest.raises(ValueError, match="config= applies"):
        weight_only_matmul(torch.randn(2, 64), pw, config=WeightOnlyConfig(16, 32))  # auto: the reference runs
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        pack_weight(quantize_tensor(torch.randn(5, 64), "int4"), dtype=torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, backend="triton")


def test_pack_weight_validates():
    with pytest.raises(TypeError, match="QTensor"):
        pack_weight(torch.randn(4, 32))
    with pytest.raises(ValueError, match="2-D"):
        pack_weight(quantize_tensor(torch.randn(2, 4, 32), "int4", group_size=32))
    with pytest.raises(ValueError, match="axis=1"):
        pack_weight(quantize_tensor(torch.randn(32, 4), "int4", group_size=32, axis=0))
    pw = pack_weight(quantize_tensor(torch.randn(4, 32), "int8"))
    assert isinstance(pw, PackedWeight) and (pw.fmt, pw.n, pw.k) == ("int8", 4, 32)
    assert "int8" in repr(pw)


@pytest.mark.parametrize("fmt,opts", [("int4", dict(group_size=32)), ("int4", dict(group_size=64, symmetric=True)),
                                      ("int4", dict(group_size=256)), ("int4", dict(granularity="channel")),
                                      ("int8", {}), ("int8", dict(group_size=32, symmetric=False)),
                                      ("int8", dict(group_size=64)), ("fp8_e4m3", {}),
                                      ("fp8_e5m2", dict(granularity="block", block_shape=(128, 128))),
                                      ("fp8_e4m3", dict(group_size=64)), ("fp8_e4m3", dict(group_size=32)),
                                      ("mxfp8_e4m3", {}), ("mxfp8_e5m2", {})],
                         ids=["int4-g32", "int4-g64-sym", "int4-g256", "int4-channel", "int8", "int8-g32", "int8-g64",
                              "fp8", "fp8-e5m2-b128", "fp8-g64", "fp8-g32", "mxfp8", "mxfp8-e5m2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_float32_int_gemv(fmt, opts, dtype):
    """The float32 integer GEMV (codes as float32 C + q, scale and bias applied once
    per group) against the exact product with its values (q * scale + bias unrounded,
    with the 4-bit carry): a tighter match than the bf16 path's."""
    w, x, b = _data(1, 67, 360, dtype, True, seed=21)
    pw = pack_weight(quantize_tensor(w, fmt, **opts), dtype=dtype)
    pf = 2 if dtype == torch.float16 else 1  # prefetch: both depths, across the cases
    y = weight_only_matmul(x, pw, b, backend="triton",
                           config=WeightOnlyConfig(1, 32, 2 if pf == 1 else 1, 1, 3, "gemv", int_f32=True, prefetch=pf))
    kw = kernel_weight(pw, rounded=False)
    exact = x.double() @ kw.t() + b.double()
    s = x.double().abs() @ kw.abs().t() + b.double().abs()
    err = (y.double() - exact).abs()
    assert bool((err <= EPS[dtype] * exact.abs() + 1e-6 * s).all()), float((err / s).max())


def test_tune_candidates_are_valid_and_tune_needs_cuda():
    pw = pack_weight(quantize_tensor(torch.randn(256, 512), "int4", group_size=128))
    for m in (1, 3, 16, 64, 128, 1024):
        cands = dispatch.candidate_configs(m, "int")
        assert cands, m
        for c in cands:
            if c != "dequant":
                c.check(pw)
        assert ("dequant" in cands) == (m >= 128)
    assert any(c.int_f32 for c in dispatch.candidate_configs(1, "int"))
    m1 = [c for c in dispatch.candidate_configs(1, "int", bits=4) if c != "dequant"]
    assert {c.prefetch for c in m1} == {1, 2} and {c.max_regs for c in m1} == {None, 72}
    assert dispatch.default_config(1, 256, 512, pw).int_f32  # integer codes: the float32 GEMV by default
    with pytest.raises(ValueError, match="prefetch=3"):
        WeightOnlyConfig(1, 32, prefetch=3, mode="gemv").check(pw)
    with pytest.raises(ValueError, match="max_regs=100"):
        WeightOnlyConfig(1, 32, max_regs=100, mode="gemv").check(pw)
    assert not any(getattr(c, "int_f32", False) for c in dispatch.candidate_configs(1, "mx"))
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.tune([(64, 64)], ["a16w4-int-g32"], [1], device="cpu")


def test_tune_confirms_the_fastest_by_interleaved_medians():
    """A candidate that was lucky once loses to one that is fast every time."""
    from lowbit.kernels.dispatch import confirm_fastest

    later = {"a": [9.0, 9.0], "b": [10.0, 10.0], "c": [20.0, 20.0], "d": [30.0, 30.0]}
    calls = []

    def time_again(entry):
        calls.append(entry[1])
        return later[entry[1]].pop(0)

    timed = [(8.0, "a"), (5.0, "b"), (12.0, "c"), (7.0, "d")]
    # one pass ranks b (5.0, lucky), d, a; their medians: b 10, d 30, a 9
    assert confirm_fastest(timed, time_again) == (9.0, "a")
    assert calls == ["b", "d", "a", "b", "d", "a"]  # interleaved rounds over the three fastest
    assert confirm_fastest([(3.0, "x")], lambda e: 4.0, rounds=2) == (4.0, "x")


# ---- the K-major kernel (opt-in: packing.with_kmajor)

KMAJOR_CASES = [  # (m, k, config)
    (3, 360, WeightOnlyConfig(16, 64, 1, 4, 3, "kmajor")),
    (17, 256, WeightOnlyConfig(32, 64, 2, 4, 3, "kmajor")),
    (40, 300, WeightOnlyConfig(64, 128, 3, 8, 2, "kmajor")),
]


@pytest.mark.parametrize("fmt,opts", [("int4", dict(group_size=128)), ("int4", dict(granularity="channel")),
                                      ("int4", dict(group_size=256, symmetric=False))],
                         ids=["g128", "channel", "g256-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(KMAJOR_CASES)))
def test_kmajor_kernel(fmt, opts, dtype, case):
    m, k, cfg = KMAJOR_CASES[case]
    w, x, b = _data(m, 67, k, dtype, True, seed=31 + case)
    pw = with_kmajor(pack_weight(quantize_tensor(w, fmt, **opts), dtype=dtype))
    y = weight_only_matmul(x, pw, b, backend="triton", config=cfg)
    check_close(y, x, pw, b, f"kmajor {fmt} {opts} M={m} K={k} {dtype} {cfg}", cfg)


def test_kmajor_bytes_and_plan():
    qt = quantize_tensor(torch.randn(67, 300), "int4", group_size=128)
    pw = pack_weight(qt)
    kpw = with_kmajor(pw)
    lay = kpw.layout
    assert kpw.kbytes.shape == (lay.npad, lay.kpad // 2) and kpw.kbytes.dtype == torch.uint8
    stored = unpack_codes_from_layout(pw).long()
    if qt.options.get("symmetric", True):
        stored = stored ^ 8  # symmetric codes are stored biased by 8
    kb = kpw.kbytes[: pw.n].long()
    codes = torch.stack([kb & 15, kb >> 4], dim=-1).reshape(pw.n, -1)[:, : pw.k]  # byte i: elements 2i, 2i + 1
    assert torch.equal(codes, stored)
    assert kpw.nbytes == pw.nbytes + kpw.kbytes.numel()
    cpu = torch.device("cpu")
    assert dispatch.plan(16, pw.n, pw.k, kpw, cpu, torch.bfloat16).config.mode == "kmajor"
    assert dispatch.plan(128, pw.n, pw.k, kpw, cpu, torch.bfloat16).config.mode == "kmajor"
    assert dispatch.plan(200, pw.n, pw.k, kpw, cpu, torch.bfloat16).config.mode != "kmajor"  # not measured there
    assert dispatch.plan(1, pw.n, pw.k, kpw, cpu, torch.bfloat16).config.mode == "gemv"
    assert dispatch.plan(16, pw.n, pw.k, pw, cpu, torch.bfloat16).config.mode != "kmajor"  # no K-major codes
    with pytest.raises(ValueError, match="no K-major codes"):
        weight_only_matmul(torch.randn(2, 300).bfloat16(), pw, backend="triton",
                           config=WeightOnlyConfig(16, 64, mode="kmajor"))
    with pytest.raises(ValueError, match="multiple of 128"):
        with_kmajor(pack_weight(quantize_tensor(torch.randn(8, 64), "int4", group_size=32)))
    with pytest.raises(ValueError, match="4-bit integer"):
        with_kmajor(pack_weight(quantize_tensor(torch.randn(8, 64), "mxfp4")))
