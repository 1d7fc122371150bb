"""MX formats (OCP MX v1.0): codes, E8M0 scales and dequantized values bit-exact
against the independent numpy reference in _ref.mx_ref (float64 exact math,
ml_dtypes element casts), for both scale rules."""

import zlib

import numpy as np
import pytest
import torch

import lowbit

from ._ref import (ELEM, MX, as_2d, assert_equal_np, bits, decode_elem, emax, maxval, mx_qt_parts, mx_ref,
                   mx_test_data, packed_len)

MX_FORMATS = list(MX)
RULES = ["floor", "ceil"]


def _unview(deq2, x_shape, axis):
    moved = list(np.moveaxis(np.empty(x_shape, dtype=np.uint8), axis, -1).shape)
    return np.moveaxis(deq2.reshape(moved), -1, axis)


def check_mx(x, fmt, rule=None, axis=-1):
    """Quantize ``x`` (numpy float32) with lowbit and compare every stored part
    and the dequantized tensor with the reference. Returns the QTensor."""
    opts = {} if rule is None else {"scale_rule": rule}
    if axis != -1:
        opts["axis"] = axis
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, **opts)
    rc, rs, rd = mx_ref(x, fmt, rule or "floor", axis)
    r, k = rc.shape
    tag = f"{fmt} rule={rule} shape={x.shape} axis={axis}"
    assert qt.fmt == fmt
    assert tuple(qt.shape) == x.shape
    assert qt.axis == axis % x.ndim
    assert tuple(qt.tile) == (1, 32)
    assert qt.scales.dtype == torch.uint8, tag
    assert tuple(qt.scales.shape) == (r, -(-k // 32)), tag
    assert qt.codes.dtype == torch.uint8, tag
    w = bits(MX[fmt])
    assert tuple(qt.codes.shape) == (r, packed_len(k, w)), tag
    codes, scales = mx_qt_parts(qt, fmt, k)
    x2 = as_2d(x, axis)
    assert_equal_np(scales, rs, f"{tag} scales",
                    extra=lambda i: f"block amax={np.abs(x2[i[0], 32 * i[1]:32 * i[1] + 32]).max()!r}")
    assert_equal_np(codes, rc, f"{tag} codes",
                    extra=lambda i: f"x={x2[i]!r}, block scale code={rs[i[0], i[1] // 32]}")
    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and tuple(deq.shape) == x.shape, tag
    exp = _unview(rd, x.shape, axis)
    assert_equal_np(deq.numpy(), exp, f"{tag} dequantized", extra=lambda i: f"x={x[i]!r}")
    return qt


@pytest.mark.parametrize("rule", [None, "floor", "ceil"])
@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("shape", [(4, 727), (3, 70), (6, 64)])
def test_mx_random_many_magnitudes(fmt, rule, shape):
    rng = np.random.default_rng(zlib.crc32(repr((fmt, shape)).encode()))
    x = mx_test_data(rng, shape)
    check_mx(x, fmt, rule)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_3d_and_axis(fmt, rule):
    rng = np.random.default_rng(5)
    x = mx_test_data(rng, (2, 3, 70))
    check_mx(x, fmt, rule)
    y = np.ascontiguousarray(np.moveaxis(x, -1, 1))  # [2, 70, 3], blocked axis 1
    qt = check_mx(y, fmt, rule, axis=1)
    # same numbers along the same blocked axis -> same stored codes and scales
    qt0 = lowbit.quantize_tensor(torch.from_numpy(x), fmt, scale_rule=rule)
    assert torch.equal(qt.codes, qt0.codes) and torch.equal(qt.scales, qt0.scales)


def _tie_blocks(fmt, rng, nblocks=24):
    """Blocks whose amax is exactly 2**(emax + E) (so the floor scale is 2**E)
    and whose other elements are exact midpoints between adjacent element values
    (and values in the clipping zone (max, 2**(emax+1)))."""
    name = MX[fmt]
    v = decode_elem(np.arange(1 << ELEM[name][0]), name)
    v = np.unique(v[np.isfinite(v) & (v >= 0)])
    if name == "mxint8":
        v = v[v <= 127 / 64]
    mids = (v[1:] + v[:-1]) / 2
    top = 2.0 ** (emax(name) + 1)
    clip = np.array([maxval(name) + (top - maxval(name)) * f for f in (0.25, 0.5, 0.875)])
    pool = np.concatenate([mids, clip, v])
    rows = []
    for _ in range(nblocks):
        E = int(rng.integers(-40, 40))
        blk = rng.choice(pool, 32) * rng.choice([-1.0, 1.0], 32)
        blk[rng.integers(32)] = 2.0 ** emax(name) * rng.choice([-1.0, 1.0])
        rows.append(np.ldexp(blk, E))
    x = np.concatenate(rows).reshape(4, -1)
    assert np.all(x.astype(np.float32).astype(np.float64) == x)
    return x.astype(np.float32)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_exact_ties_and_clipping(fmt, rule):
    rng = np.random.default_rng(11)
    x = _tie_blocks(fmt, rng)
    qt = check_mx(x, fmt, rule)
    if rule == "floor":
        # scales are exactly E + 127 for the constructed amax
        assert (qt.scales.numpy().astype(np.int64) - 127 >= -40).all()


def test_mxfp4_hand_example():
    """amax = 6 -> floor(log2 6) - 2 = 0 -> X = 1; 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4."""
    x = np.zeros((1, 32), np.float32)
    x[0, :5] = [6.0, 0.25, 0.75, 2.5, -5.0]
    qt = lowbit.quantize_tensor(torch.from_numpy(x), "mxfp4")
    assert qt.scales.tolist() == [[127]]
    assert qt.codes[0, :3].tolist() == [0x07, 0x42, 0x0E]  # nibbles [7,0], [2,4], [0xE (=-4), 0]
    np.testing.assert_array_equal(qt.dequantize().numpy()[0, :5], [6.0, 0.0, 1.0, 2.0, -4.0])
    # amax = 7 -> still X = 1 under floor (7 clips to 6); ceil gives X = 2 (7/2 = 3.5 -> 4 -> 8)
    x[0, 0] = 7.0
    assert lowbit.quantize_tensor(torch.from_numpy(x), "mxfp4").dequantize()[0, 0].item() == 6.0
    qc = lowbit.quantize_tensor(torch.from_numpy(x), "mxfp4", scale_rule="ceil")
    assert qc.scales.tolist() == [[128]]
    assert qc.dequantize()[0, 0].item() == 8.0


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_zero_blocks(fmt, rule):
    x = np.zeros((2, 70), np.float32)
    x[1, 40:50] = np.linspace(-3, 3, 10)
    x[0, 64:] = -0.0
    qt = check_mx(x, fmt, rule)
    s = qt.scales.numpy()
    assert s[0].tolist() == [0, 0, 0], "all-zero blocks get E = -127 (code 0)"
    assert s[1, 0] == 0 and s[1, 2] == 0
    deq = qt.dequantize().numpy()
    assert (deq[0] == 0).all() and (deq[1, :32] == 0).all()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_tiny_and_subnormal_blocks(fmt, rule):
    """Blocks of float32 subnormals / tiny normals: the exponent clamps at -127
    and the elements are x * 2**127 exactly."""
    rng = np.random.default_rng(3)
    rows = []
    for lo in (-149, -140, -133, -128, -126, -120, -115):
        m = rng.standard_normal(32) * 2.0 ** rng.integers(lo, lo + 4, 32)
        rows.append(m)
    x = np.concatenate(rows).astype(np.float32)
    x = np.concatenate([x, np.float32([1e-40, -1e-40, 1.4e-45, -2.9e-39]), np.float32(rng.standard_normal(28) * 1e-40)])
    x = x.reshape(1, -1)
    assert (np.abs(x[np.nonzero(x)]) < 2.0 ** -100).all()
    check_mx(x, fmt, rule)


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_amax_1e40_scale(fmt):
    """amax = 1e-40 (2**-133 < 1e-40 < 2**-132): E = -133 - emax < -127 -> clamped to code 0."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1e-40
    x[0, 1] = -5e-41
    qt = check_mx(x, fmt)
    assert qt.scales.tolist() == [[0]]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_huge_blocks(fmt, rule):
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (2, 64)) * np.float64(3.0e38)
    x[0, 0] = np.finfo(np.float32).max
    x[1, 40] = -np.finfo(np.float32).max
    check_mx(x.astype(np.float32), fmt, rule)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_nan_inf_block(fmt, bad):
    rng = np.random.default_rng(9)
    x = mx_test_data(rng, (3, 100))
    x[1, 40] = bad  # block (1, 1)
    qt = check_mx(x, fmt)  # bit-exact vs reference for every other block as well
    s = qt.scales.numpy()
    assert s[1, 1] == 0xFF
    assert (np.delete(s.ravel(), 1 * s.shape[1] + 1) != 0xFF).all()
    deq = qt.dequantize().numpy()
    assert np.isnan(deq[1, 32:64]).all(), "the NaN-scale block dequantizes to NaN"
    mask = np.ones_like(deq, bool)
    mask[1, 32:64] = False
    assert not np.isnan(deq[mask]).any(), "NaN must stay inside its block"
    codes, _ = mx_qt_parts(qt, fmt, 100)
    assert (codes[1, 32:64] == 0).all(), "element codes of a NaN-scale block are 0"


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_e8m0_nan_code_decodes_to_nan(fmt):
    """A stored scale code 0xFF (e.g. from a checkpoint) dequantizes its block to NaN."""
    x = np.ones((2, 64), np.float32)
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt)
    qt.scales[0, 1] = 0xFF
    deq = qt.dequantize().numpy()
    assert np.isnan(deq[0, 32:]).all()
    assert (deq[0, :32] == 1).all() and (deq[1] == 1).all()


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_e8m0_scale_values(fmt):
    """Scale code c means 2**(c - 127): build blocks with amax = 2**(emax + E)."""
    Es = np.array([-127, -100, -1, 0, 1, 50, 100])
    x = np.zeros((len(Es), 32), np.float64)
    x[:, 0] = np.ldexp(1.0, Es + emax(MX[fmt]))
    x = x.astype(np.float32)
    qt = check_mx(x, fmt)
    assert qt.scales[:, 0].tolist() == (Es + 127).tolist()
    np.testing.assert_array_equal(qt.dequantize().numpy()[:, 0], x[:, 0])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_never_overflows_grid_under_ceil(fmt, rule):
    """ceil: amax / X <= max_elem, so amax is never clipped: |x'| <= amax + half a step."""
    rng = np.random.default_rng(2)
    x = mx_test_data(rng, (8, 128), -5, 5)
    deq = lowbit.quantize_tensor(torch.from_numpy(x), fmt, scale_rule=rule).dequantize().numpy()
    blocks = np.abs(x).reshape(8, 4, 32).max(-1)
    dblocks = np.abs(deq).reshape(8, 4, 32).max(-1)
    if rule == "ceil":
        # relative error of the block max bounded by half an element ulp at the top binade
        assert (np.abs(dblocks - blocks) <= blocks * 0.26).all()
    else:
        assert (dblocks <= blocks * 1.26).all()


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_ceil_exact_boundary(fmt):
    """ceil: amax == max_elem * 2**k exactly gives E = k (no wasted binade);
    one float32 ulp above gives E = k + 1. floor for the same blocks: E = floor(log2 amax) - emax."""
    m = maxval(MX[fmt])
    ks = np.array([-20, -3, 0, 5, 40])
    x = np.zeros((2 * len(ks), 32), np.float32)
    x[: len(ks), 0] = np.ldexp(m, ks)
    x[len(ks):, 0] = np.nextafter(np.float32(np.ldexp(m, ks)), np.float32(np.inf))
    x[:, 1] = -x[:, 0] / 3
    qt = check_mx(x, fmt, "ceil")
    assert qt.scales[:, 0].tolist() == (ks + 127).tolist() + (ks + 128).tolist()
    check_mx(x, fmt, "floor")
