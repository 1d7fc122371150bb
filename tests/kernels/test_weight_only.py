"""weight_only_matmul: the Triton kernels (run by Triton's CPU interpreter) against
the pure-torch reference, on small odd shapes, for every supported format.

Tolerance (both backends use the same bf16/fp16 weight values; they differ only
in the float32 summation order and the final rounding), per output element:

    |y - y_ref| <= EPS[dtype] * |y_ref| + 1e-4 * S,   S = (|x| @ |W|^T) (+ |bias|)

with EPS = 2^-7 for bfloat16 and 2^-10 for float16 (two units in the last
place, since the reference may round twice when it adds the bias). The
failure message gives the worst element's coordinates and the normalised max
error max|y - y_ref| / max(S) (about 1e-3 or less when the kernels are right).
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
from lowbit.kernels.packing import unpack_codes_from_layout  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    # the kernels read TRITON_INTERPRET when they launch: keep it on for this
    # module even if another module (tests/gpu) turned it off
    monkeypatch.setenv("TRITON_INTERPRET", "1")


EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}

# (fmt, options) the Triton backend supports
COMBOS = [
    (f"int{bits}", dict(symmetric=sym, **({"group_size": g} if g else {"granularity": "channel"})))
    for bits in (4, 8)
    for sym in (False, True)
    for g in (32, 64, 128, None)
] + [
    ("mxfp4", {}),
    ("int4", dict(group_size=256)),  # a group of two 128-element sub-blocks
    ("int4", dict(zero_point="integer", group_size=64)),
    ("int4", dict(group_size=128, scale_dtype=torch.bfloat16)),
    ("int8", dict(granularity="block", block_shape=(16, 128))),  # one scale per 16 rows
    ("int8", dict(granularity="tensor", symmetric=False, scale_dtype=torch.float16)),
]


def _id(c):
    fmt, opts = c
    return fmt + "".join(f"-{k}={getattr(v, '__name__', str(v).replace('torch.', ''))}" for k, v in opts.items())


def check_close(y, y_ref, x, w, bias, tag):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, f"{tag}: {y.shape} {y.dtype} vs {y_ref.shape} {y_ref.dtype}"
    if y.numel() == 0:
        return
    k = x.shape[-1]
    s = x.reshape(-1, k).double().abs() @ w.to(x.dtype).double().abs().t()
    if bias is not None:
        s = s + bias.to(x.dtype).double().abs()
    s = s.reshape(y.shape)
    yd, yr = y.double(), y_ref.double()
    both_nan = torch.isnan(yd) & torch.isnan(yr)
    err = torch.where(both_nan, torch.zeros_like(yd), (yd - yr).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    bound = EPS[y.dtype] * yr.abs().nan_to_num(0) + 1e-4 * s.nan_to_num(0)
    excess = err - bound
    worst = int(torch.argmax(excess))
    if excess.reshape(-1)[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), y.shape))
        nmax = float(err.max() / s.max())
        raise AssertionError(
            f"{tag}: y{list(idx)} = {float(yd[idx]):.6g}, reference {float(yr[idx]):.6g}, "
            f"|diff| {float(err[idx]):.3g} > bound {float(bound[idx]):.3g}; "
            f"{int((excess > 0).sum())} of {y.numel()} elements over; normalised max error {nmax:.3g}"
        )


def _data(m, n, k, dtype, bias, seed, lead=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    shape = (*lead, m, k) if lead else (m, k)
    x = torch.randn(shape, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return w, x, b


def run_case(fmt, opts, m, n, k, dtype, bias, seed, lead=None, config=None):
    w, x, b = _data(m, n, k, dtype, bias, seed, lead)
    qt = quantize_tensor(w, fmt, **opts)
    pw = pack_weight(qt)
    y = weight_only_matmul(x, pw, b, backend="triton", config=config)
    y_ref = weight_only_matmul_reference(x, pw, b)
    tag = f"{fmt} {opts} x{list(x.shape)} W[{n}, {k}] {dtype} bias={bias} config={config}"
    check_close(y, y_ref, x, qt.dequantize(), b, tag)
    return pw


# Each combination runs three cases drawn in rotation from these lists, so that
# together they cover every M, K, N, dtype, bias and input rank.
MS = (1, 3, 17, 64)
KS = (64, 96, 200, 576)
NS = (37, 67)
DTYPES = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("combo", COMBOS, ids=[_id(c) for c in COMBOS])
def test_triton_matches_reference(combo):
    fmt, opts = combo
    i = COMBOS.index(combo)
    for j in range(3):
        m = MS[(i + j) % 4]
        k = KS[(i + 2 * j + j // 2) % 4]
        n = NS[(i + j) % 2]
        dtype = DTYPES[(i // 2 + j) % 2]
        bias = (i + j) % 3 != 0
        lead = (2,) if j == 2 else None  # a 3-D input [2, M, K]
        run_case(fmt, opts, m, n, k, dtype, bias, seed=100 * i + j, lead=lead)


# Explicit configs: both orientations, split-K with a short last split, a K tile
# of several sub-blocks whose count does not divide K's (masked sub-blocks),
# larger M tiles than M, several row and column tiles.
CONFIGS = [
    WeightOnlyConfig(16, 32, 64, split_k=1, swap_ab=True),
    WeightOnlyConfig(32, 64, 96, split_k=3, swap_ab=True),
    WeightOnlyConfig(16, 16, 128, split_k=2, swap_ab=False),
    WeightOnlyConfig(32, 32, 96, split_k=1, swap_ab=False, group_m=2),
    WeightOnlyConfig(64, 64, 192, split_k=2, swap_ab=False),
]


@pytest.mark.parametrize(
    "fmt,opts",
    [("int4", dict(group_size=32)), ("int8", dict(group_size=64)), ("mxfp4", {})],
    ids=["int4-g32", "int8-g64", "mxfp4"],
)
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_triton_configs(fmt, opts, config):
    ks = 64 if fmt == "int8" else 32
    config = WeightOnlyConfig(**{**config.__dict__, "block_k": -(-config.block_k // ks) * ks})
    run_case(fmt, opts, m=37, n=67, k=232, dtype=torch.bfloat16, bias=True, seed=7, config=config)


def test_large_m_default_config():
    """M > 64: the default config takes the tiled (unswapped) kernel."""
    cfg = default_config(80, 37, 200, pack_weight(quantize_tensor(torch.randn(37, 200), "int4")), num_sms=4)
    assert not cfg.swap_ab
    run_case("int4", {}, m=80, n=37, k=200, dtype=torch.float16, bias=True, seed=3)


def test_m_zero_and_empty_leading_dims():
    w = torch.randn(37, 96)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    for shape in ((0, 96), (2, 0, 96)):
        x = torch.randn(shape).bfloat16()
        y = weight_only_matmul(x, pw, backend="triton")
        assert y.shape == (*shape[:-1], 37) and y.dtype == torch.bfloat16
        assert weight_only_matmul_reference(x, pw).shape == y.shape


def test_strided_input():
    """x with a row stride wider than K, and a transposed (non-unit K stride) x."""
    w, _, b = _data(5, 67, 96, torch.bfloat16, True, seed=11)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    wide = torch.randn(5, 160).bfloat16()
    for x in (wide[:, 16:112], torch.randn(96, 5).bfloat16().t()):
        y = weight_only_matmul(x, pw, b, backend="triton")
        check_close(y, weight_only_matmul_reference(x, pw, b), x, pw.qtensor.dequantize(), b, f"stride {x.stride()}")


def test_mxfp4_nan_block():
    """A block with NaN gets the NaN scale (E8M0 255): its output column is NaN in both backends."""
    w, x, _ = _data(3, 37, 96, torch.bfloat16, False, seed=5)
    w[4, 40] = float("nan")
    pw = pack_weight(quantize_tensor(w, "mxfp4"))
    y = weight_only_matmul(x, pw, backend="triton")
    y_ref = weight_only_matmul_reference(x, pw)
    assert torch.isnan(y[:, 4]).all() and torch.isnan(y_ref[:, 4]).all()
    check_close(y, y_ref, x, pw.qtensor.dequantize().nan_to_num(0), None, "mxfp4 NaN block")


@pytest.mark.parametrize("combo", COMBOS, ids=[_id(c) for c in COMBOS])
def test_packing_is_lossless(combo):
    """The Triton layout holds exactly the canonical codes and scales (bitwise)."""
    fmt, opts = combo
    n, k = 67, 200
    qt = quantize_tensor(torch.randn(n, k), fmt, **opts)
    pw = pack_weight(qt)
    lay = pw.layout
    assert lay is not None and pw.unsupported is None
    assert torch.equal(unpack_codes_from_layout(pw), qt.unpacked_codes())
    assert pw.codes.shape[1] == lay.npad and lay.npad % 256 == 0 and lay.kpad % lay.ks == 0
    tr = qt.tile[0]
    rows = torch.arange(n) // tr
    want_s = qt.scales[rows] if fmt != "mxfp4" else qt.scales.view(torch.uint8)
    assert pw.scales.dtype == want_s.dtype
    assert torch.equal(pw.scales[:, :n].t(), want_s)
    assert torch.count_nonzero(pw.scales[:, n:]) == 0
    if lay.has_zeros:
        assert torch.equal(pw.zeros[:, :n].t(), qt.zeros[rows])
    else:
        assert pw.zeros is None


# ---- backend choice and errors


def test_auto_on_cpu_is_reference(caplog):
    w, x, b = _data(3, 37, 64, torch.bfloat16, True, seed=1)
    pw = pack_weight(quantize_tensor(w, "int4", group_size=32))
    with caplog.at_level(logging.DEBUG, logger="lowbit.kernels"):
        y = weight_only_matmul(x, pw, b)
    assert torch.equal(y, weight_only_matmul_reference(x, pw, b))
    assert "backend=reference" in caplog.text and "cpu" in caplog.text


def test_reference_every_format_and_float32():
    """The reference runs every format, float32 activations included."""
    x = torch.randn(3, 64)
    for fmt in ("int2", "int3", "fp8_e4m3", "mxfp6_e2m3", "mxfp8_e4m3", "nvfp4", "int4"):
        qt = quantize_tensor(torch.randn(5, 64), fmt)
        pw = pack_weight(qt)
        y = weight_only_matmul(x, pw, backend="reference")
        torch.testing.assert_close(y, x @ qt.dequantize().t(), rtol=0, atol=1e-5)
        assert weight_only_matmul(x.bfloat16(), pw, backend="auto").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "fmt,opts,needle",
    [
        ("nvfp4", {}, "nvfp4"),
        ("int2", {}, "int2"),
        ("fp8_e4m3", {}, "fp8_e4m3"),
        ("int4", dict(group_size=48), "groups of 48"),
    ],
)
def test_triton_refuses_unsupported_formats(fmt, opts, needle):
    pw = pack_weight(quantize_tensor(torch.randn(5, 96), fmt, **opts))
    assert not pw.triton_supported and needle in pw.unsupported
    with pytest.raises(ValueError, match=needle):
        weight_only_matmul(torch.randn(2, 96).bfloat16(), pw, backend="triton")


def test_triton_refuses_bad_calls(monkeypatch):
    pw = pack_weight(quantize_tensor(torch.randn(5, 64), "int4", group_size=32))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="cuda")
    with pytest.raises(ValueError, match="K=64"):
        weight_only_matmul(torch.randn(2, 65).bfloat16(), pw)
    with pytest.raises(ValueError, match="bias"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, torch.randn(6).bfloat16())
    with pytest.raises(ValueError, match="multiple of the weight's K sub-block 32"):
        weight_only_matmul(torch.randn(2, 64).bfloat16(), pw, backend="triton", config=WeightOnlyConfig(16, 32, 48))
    with pytest.raises(ValueError, match="config= applies"):
        weight_only_matmul(torch.randn(2, 64), pw, backend="reference", config=WeightOnlyConfig(16, 32, 64))
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


def test_default_config_fills_the_gpu():
    """The first-step heuristic: small M splits K until ~2 programs per SM run."""
    pw = pack_weight(quantize_tensor(torch.randn(256, 4096), "int4"))
    for n, m in ((4096, 1), (28672, 1), (4096, 16), (28672, 16)):
        cfg = default_config(m, n, 4096, pw)
        assert cfg.swap_ab and cfg.block_m == 16
        assert -(-n // cfg.block_n) * cfg.split_k >= 132, (n, m, cfg)
    cfg = default_config(1024, 28672, 4096, pw)
    assert not cfg.swap_ab and cfg.split_k == 1
