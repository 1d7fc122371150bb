"""Shared checkers for the software-scaled formats (int*, fp8_*)."""

import numpy as np
import torch

import lowbit

from ._ref import (INT_BITS, as_2d, assert_equal_np, expand, fp8_ref, int_ref_codes, int_ref_scales, int_stats, packed_len,
                   sign_extend, unpack_qt_codes)

EPS32 = 2.0 ** -24


def expected_tile(granularity, r, k, group_size=None, block_shape=(128, 128)):
    if granularity == "tensor":
        return (r, k)
    if granularity in ("channel", "token"):
        return (1, k)
    if granularity == "group":
        return (1, group_size)
    return tuple(block_shape)


def int_codes_of(qt, b, symmetric, k):
    """Signed (symmetric) or unsigned (affine) integer codes [R, K] of an int QTensor."""
    if b == 8 and symmetric:
        assert qt.codes.dtype == torch.int8, f"int8 symmetric codes must be torch.int8, got {qt.codes.dtype}"
        assert tuple(qt.codes.shape[1:]) == (k,)
        return qt.codes.numpy().astype(np.int64)
    assert qt.codes.dtype == torch.uint8, f"{qt.fmt} codes must be torch.uint8, got {qt.codes.dtype}"
    p = unpack_qt_codes(qt, b, k)
    return sign_extend(p, b) if symmetric else p


def check_int(x, fmt, *, tile, symmetric, zero_point=None, axis=-1, **opts):
    """Quantize with lowbit and check scales, zeros, codes and dequantized values
    against the float64 reference. ``tile`` is the expected scale tile;
    ``symmetric`` and ``zero_point`` (if given) are passed on as options."""
    b = INT_BITS[fmt]
    allopts = dict(opts, symmetric=symmetric)
    if zero_point is not None:
        allopts["zero_point"] = zero_point
    zero_point = zero_point or "float"
    if axis != -1:
        allopts["axis"] = axis
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, **allopts)
    x2 = as_2d(x, axis).astype(np.float32)
    r, k = x2.shape
    tr, tc = tile
    tag = f"{fmt} shape={x.shape} tile={tile} sym={symmetric} zp={zero_point} opts={opts}"
    assert qt.fmt == fmt and tuple(qt.shape) == x.shape
    assert tuple(qt.tile) == tuple(tile), f"{tag}: tile {qt.tile}"
    nr, nk = -(-r // tr), -(-k // tc)
    assert qt.scales.dtype == torch.float32, tag
    assert tuple(qt.scales.shape) == (nr, nk), f"{tag}: scales shape {tuple(qt.scales.shape)} != {(nr, nk)}"
    if b == 8 and symmetric:
        assert tuple(qt.codes.shape) == (r, k)
    else:
        assert tuple(qt.codes.shape) == (r, packed_len(k, b)), f"{tag}: codes shape {tuple(qt.codes.shape)}"

    s_ref, z_ref = int_ref_scales(x2, b, symmetric, zero_point, tr, tc)
    s = qt.scales.numpy().astype(np.float64)
    # scale: float32 evaluation of (max - min) / (2^b - 1) or amax / qmax
    np.testing.assert_allclose(s, s_ref, rtol=4 * 2 * EPS32, atol=0, err_msg=f"{tag}: scales")
    if symmetric:
        assert qt.zeros is None, f"{tag}: symmetric formats store no zeros"
        z = None
    else:
        assert qt.zeros is not None and qt.zeros.dtype == torch.float32 and tuple(qt.zeros.shape) == (nr, nk), tag
        z = qt.zeros.numpy().astype(np.float64)
        mn = int_stats(x2, tr, tc)[0]  # min over the tile's real elements
        z_from_stored = -mn / s
        if zero_point == "integer":
            assert (z == np.rint(z)).all(), f"{tag}: integer zero points must be integers"
            frac = np.abs(z_from_stored - np.floor(z_from_stored) - 0.5)
            ok = (z == np.rint(z_from_stored)) | ((frac < 1e-4 * (1 + np.abs(z_from_stored))) & (np.abs(z - z_from_stored) <= 0.5 + 1e-4))
            assert ok.all(), f"{tag}: zeros {z[~ok][:4]} expected round(-min/s) = {np.rint(z_from_stored)[~ok][:4]}"
        else:
            np.testing.assert_allclose(z, z_from_stored, rtol=8 * EPS32, atol=8 * EPS32, err_msg=f"{tag}: zeros")

    q = int_codes_of(qt, b, symmetric, k)
    lo, hi = (-(2 ** (b - 1) - 1), 2 ** (b - 1) - 1) if symmetric else (0, 2 ** b - 1)
    assert q.min() >= lo and q.max() <= hi, f"{tag}: codes out of [{lo}, {hi}]: [{q.min()}, {q.max()}]"
    q_exp, amb = int_ref_codes(x2, s, z, b, symmetric, tr, tc)
    close = np.abs(q - q_exp) <= 1
    assert_equal_np(q, q_exp, f"{tag}: codes", mask=~amb, extra=lambda i: f"x={x2[i]!r}")
    assert close.all(), f"{tag}: ambiguous codes off by more than 1"
    assert amb.mean() < 0.01, f"{tag}: too many near-tie elements ({amb.sum()}): test data problem"

    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and tuple(deq.shape) == x.shape
    d2 = as_2d(deq.numpy(), axis).astype(np.float64)
    se = expand(s, tr, tc, r, k)
    ze = np.zeros_like(se) if z is None else expand(z, tr, tc, r, k)
    tol = 8 * EPS32 * se * (np.abs(q) + np.abs(ze) + 2) + 8 * EPS32 * np.abs(x2)
    d_exp = (q_exp - ze) * se
    err = np.abs(d2 - d_exp)
    bad = (err > tol) & ~(amb & (err <= se + tol))
    assert not bad.any(), (f"{tag}: dequantized mismatch at {tuple(np.argwhere(bad)[0])}: "
                           f"got {d2[bad][0]!r}, expected {d_exp[bad][0]!r} (x={x2[bad][0]!r})")
    # the round-to-nearest error bound: |x - x'| <= s/2 (in exact arithmetic)
    e = np.abs(x2.astype(np.float64) - d2)
    over = e > se / 2 + tol
    assert not over.any(), (f"{tag}: |x - x'| > s/2 at {tuple(np.argwhere(over)[0])}: x={x2[over][0]!r} "
                            f"x'={d2[over][0]!r} s={se[over][0]!r}")
    return qt


def check_fp8(x, fmt, *, tile, axis=-1, **opts):
    name = fmt
    allopts = dict(opts)
    if axis != -1:
        allopts["axis"] = axis
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, **allopts)
    x2 = as_2d(x, axis).astype(np.float32)
    r, k = x2.shape
    tr, tc = tile
    tag = f"{fmt} shape={x.shape} tile={tile} opts={opts}"
    assert qt.fmt == fmt and tuple(qt.shape) == x.shape
    assert tuple(qt.tile) == tuple(tile), f"{tag}: tile {qt.tile}"
    assert qt.zeros is None and qt.global_scale is None
    s_ref, c_ref, d_ref = fp8_ref(x2, name, tr, tc)
    assert qt.scales.dtype == torch.float32, tag
    assert_equal_np(qt.scales.numpy(), s_ref, f"{tag}: scales (amax / max_elem, float32)")
    assert qt.codes.dtype == torch.uint8 and tuple(qt.codes.shape) == (r, k), tag
    assert_equal_np(qt.codes.numpy(), c_ref, f"{tag}: codes (ml_dtypes cast of float32 x / s)",
                    extra=lambda i: f"x={x2[i]!r}")
    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and tuple(deq.shape) == x.shape
    assert_equal_np(as_2d(deq.numpy(), axis), d_ref, f"{tag}: dequantized (decode(code) * s)")
    return qt
