"""Integer formats (int8/4/3/2): affine (float and integer zero point) and
symmetric, per group 32/64/128 and per channel, against the float64 reference
in _ref (see _checks.check_int for what is compared)."""

import numpy as np
import pytest
import torch

import lowbit

from ._checks import check_int, int_codes_of
from ._ref import as_2d

FMTS = ["int8", "int4", "int3", "int2"]
MODES = [("affine", "float"), ("affine", "integer"), ("symmetric", None)]


def _opts(mode, zp):
    if mode == "symmetric":
        return dict(symmetric=True)
    return dict(symmetric=False, zero_point=zp)


@pytest.mark.parametrize("mode,zp", MODES)
@pytest.mark.parametrize("g", [32, 64, 128, "channel"])
@pytest.mark.parametrize("fmt", FMTS)
def test_int_groups(fmt, g, mode, zp):
    rng = np.random.default_rng(abs(FMTS.index(fmt) * 100 + (0 if g == "channel" else g)))
    x = (rng.standard_normal((6, 300)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    x[2] += 3.0  # an off-centre row: large zero points
    o = _opts(mode, zp)
    if g == "channel":
        check_int(x, fmt, tile=(1, 300), granularity="channel", **o)
    else:
        check_int(x, fmt, tile=(1, g), group_size=g, **o)


@pytest.mark.parametrize("fmt", FMTS)
def test_int_heavy_tailed_3d(fmt):
    rng = np.random.default_rng(7)
    x = rng.standard_t(3, (2, 3, 256)).astype(np.float32)
    check_int(x, fmt, tile=(1, 64), symmetric=False, group_size=64)
    check_int(x, fmt, tile=(1, 64), symmetric=True, group_size=64)
    y = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    check_int(y, fmt, tile=(1, 64), symmetric=False, group_size=64, axis=1)


@pytest.mark.parametrize("mode,zp", MODES)
@pytest.mark.parametrize("fmt", FMTS)
def test_int_group_tail_uses_real_elements(fmt, mode, zp):
    """K = 200, g = 128: the tail group's statistics come from its 72 real
    elements only; all-positive tail (zero padding would pull min to 0) and a
    tail whose last real element is not its min/max."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 200)).astype(np.float32) * 5
    x[:, 128:] = rng.uniform(0.5, 1.0, (4, 72)).astype(np.float32)
    x[1, 128:] = rng.uniform(-1.0, -0.5, 72).astype(np.float32)
    x[2, 199] = 0.75
    o = _opts(mode, zp)
    qt = check_int(x, fmt, tile=(1, 128), group_size=128, **o)
    s = qt.scales.numpy()
    tail = x[:, 128:].astype(np.float64)
    qmax = 2 ** (int(fmt[3:]) - 1) - 1 if mode == "symmetric" else 2 ** int(fmt[3:]) - 1
    exp = (np.abs(tail).max(1) if mode == "symmetric" else tail.max(1) - tail.min(1)) / qmax
    np.testing.assert_allclose(s[:, 1], exp, rtol=1e-6, err_msg=f"{fmt}: tail-group scales")


@pytest.mark.parametrize("fmt", FMTS)
def test_int_defaults(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt)
    if fmt == "int8":
        assert qt.options["symmetric"] is True
        assert qt.options["granularity"] == "channel"
        assert tuple(qt.tile) == (1, 256)
        assert qt.zeros is None and qt.codes.dtype == torch.int8
        check_int(x, fmt, tile=(1, 256), symmetric=True)
    else:
        assert qt.options["symmetric"] is False
        assert qt.options["granularity"] == "group"
        assert qt.options["zero_point"] == "float"
        assert tuple(qt.tile) == (1, 128)
        assert qt.zeros is not None and qt.codes.dtype == torch.uint8
        check_int(x, fmt, tile=(1, 128), symmetric=False)


@pytest.mark.parametrize("fmt", FMTS)
def test_int_affine_uses_full_range(fmt):
    """Float zero point: the tile min maps to code 0 and the max to 2^b - 1."""
    b = int(fmt[3:])
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 128)).astype(np.float32) + np.float32([[0], [5], [-5], [0.1]])
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, symmetric=False, group_size=128)
    q = int_codes_of(qt, b, False, 128)
    assert (q[np.arange(4), x.argmin(1)] == 0).all()
    assert (q[np.arange(4), x.argmax(1)] == 2 ** b - 1).all()
    d = qt.dequantize().numpy()
    np.testing.assert_allclose(d.min(1), x.min(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.max(1), x.max(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FMTS)
def test_int_symmetric_hand_example(fmt):
    b = int(fmt[3:])
    qmax = 2 ** (b - 1) - 1
    x = np.zeros((1, 8), np.float32)
    x[0, :5] = [qmax, -qmax, 0.5, -0.5, 1.5 if qmax > 1 else -1.0]  # s = 1
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, symmetric=True, granularity="channel")
    assert qt.scales.tolist() == [[1.0]]
    q = int_codes_of(qt, b, True, 8)
    # half to even: 0.5 -> 0, -0.5 -> 0, 1.5 -> 2
    assert q[0, :5].tolist() == [qmax, -qmax, 0, 0, 2 if qmax > 1 else -1]


@pytest.mark.parametrize("fmt", FMTS)
def test_int_constant_and_zero_tiles(fmt):
    """A constant tile gets s = 1 and z = -min (float) / round(-min) (integer);
    symmetric amax = 0 gets s = 1 and codes 0."""
    b = int(fmt[3:])
    x = np.zeros((4, 64), np.float32)
    x[0, :] = 2.3
    x[1, :] = -2.7
    x[2, :32] = 1.0
    x[2, 32:] = np.linspace(-1, 1, 32)
    qt = check_int(x, fmt, tile=(1, 32), symmetric=False, group_size=32)
    s, z = qt.scales.numpy(), qt.zeros.numpy()
    assert s[0, 0] == 1 and s[1, 0] == 1 and s[3, 0] == 1 and s[2, 0] == 1
    np.testing.assert_array_equal(z[:, 0], np.float32([-2.3, 2.7, -1.0, 0.0]))
    np.testing.assert_array_equal(qt.dequantize().numpy()[:2], x[:2])
    qi = check_int(x, fmt, tile=(1, 32), symmetric=False, group_size=32, zero_point="integer")
    np.testing.assert_array_equal(qi.zeros.numpy()[:, 0], np.float32([-2.0, 3.0, -1.0, 0.0]))
    qs = check_int(x, fmt, tile=(1, 32), symmetric=True, group_size=32)
    assert qs.scales.numpy()[3].tolist() == [1.0, 1.0]
    assert (int_codes_of(qs, b, True, 64)[3] == 0).all()
    assert (qs.dequantize().numpy()[3] == 0).all()


@pytest.mark.parametrize("sd", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int_scale_dtype(fmt, sd):
    """Stored scales/zeros take scale_dtype; dequantize is (q - z) * s of what is stored."""
    b = int(fmt[3:])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    for sym in (True, False):
        qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, symmetric=sym, group_size=64, scale_dtype=sd)
        assert qt.scales.dtype == sd
        assert qt.scales.shape == (4, 4)
        q = int_codes_of(qt, b, sym, 256).astype(np.float64)
        s = np.repeat(qt.scales.float().numpy().astype(np.float64), 64, axis=1)
        z = 0 if sym else np.repeat(qt.zeros.float().numpy().astype(np.float64), 64, axis=1)
        if not sym:
            assert qt.zeros.dtype == sd
        d = qt.dequantize().numpy()
        np.testing.assert_allclose(d, (q - z) * s, rtol=1e-6, atol=1e-6 * np.abs(s).max(),
                                   err_msg=f"{fmt} sym={sym} {sd}: dequantize vs stored parts")
        assert (np.abs(d - x) <= 0.75 * s).all(), f"{fmt} sym={sym} {sd}: error beyond 0.75 s"


def test_int8_affine_codes_uint8():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 100)).astype(np.float32)
    qt = check_int(x, "int8", tile=(1, 100), symmetric=False)
    assert qt.codes.dtype == torch.uint8


def test_int_axis0():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((96, 5)).astype(np.float32)
    qt = check_int(x, "int4", tile=(1, 32), symmetric=False, group_size=32, axis=0)
    assert qt.axis == 0
    assert tuple(qt.scales.shape) == (5, 3)
    d = qt.dequantize().numpy()
    assert d.shape == x.shape
    assert np.abs(as_2d(d, 0) - as_2d(x, 0)).max() > 0


@pytest.mark.parametrize("fmt", FMTS)
def test_int_affine_exact_ties(fmt):
    """min = 0, max = 2^b - 1 -> s = 1, z = 0 (exact): x = k + 0.5 rounds half to even."""
    b = int(fmt[3:])
    hi = 2 ** b - 1
    halves = np.arange(hi) + 0.5
    x = np.concatenate([[0.0, hi], halves]).astype(np.float32)[None, :]
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, symmetric=False, granularity="channel")
    assert qt.scales.tolist() == [[1.0]] and qt.zeros.tolist() == [[0.0]]
    q = int_codes_of(qt, b, False, x.shape[1])[0]
    exp = np.concatenate([[0, hi], np.rint(halves)]).astype(np.int64)  # np.rint: half to even
    np.testing.assert_array_equal(q, exp, err_msg=f"{fmt}: affine ties must round half to even")
    # integer zero point: min = -3 (z = 3), ties at x + 3 = k + 0.5
    if b >= 3:
        y = np.concatenate([[-3.0, hi - 3.0], halves - 3.0]).astype(np.float32)[None, :]
        qi = lowbit.quantize_tensor(torch.from_numpy(y), fmt, symmetric=False, granularity="channel",
                                    zero_point="integer")
        assert qi.zeros.tolist() == [[3.0]]
        np.testing.assert_array_equal(int_codes_of(qi, b, False, y.shape[1])[0], exp)


def test_int_affine_block_tail_rows():
    """block (128, 128) on [130, 128] with all-positive tail rows: the tail block's
    min comes from its two real rows (zero padding would pull it to 0)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((130, 128)).astype(np.float32)
    x[128:] = rng.uniform(2.0, 3.0, (2, 128)).astype(np.float32)
    qt = check_int(x, "int4", tile=(128, 128), symmetric=False, granularity="block")
    tail = x[128:].astype(np.float64)
    np.testing.assert_allclose(qt.scales.numpy()[1, 0], (tail.max() - tail.min()) / 15, rtol=1e-6)
    np.testing.assert_allclose(qt.zeros.numpy()[1, 0], -tail.min() / ((tail.max() - tail.min()) / 15), rtol=1e-5)
