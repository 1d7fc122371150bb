"""Independent numpy reference implementations of docs/formats.md and
shared/FORMATS.md, used as test oracles.

Nothing here imports lowbit. Element casts use ml_dtypes (the oracle named by
FORMATS.md: clip to +-max first, then cast). NOTE: ml_dtypes 0.6 casts
float64 -> float8/6/4 by double rounding through float32 (1.0625 + 2**-40
becomes 1.0 in e4m3), so every cast here goes float32 -> element, and callers
only pass values that are exact in float32 or whose float32 rounding cannot
move them across an element rounding boundary (see ``cast_elem``).
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch

# name -> (bits, ebits, mbits, bias, max, ml_dtypes type or None, has_inf, has_nan, emax)
ELEM = {
    "fp8_e4m3": (8, 4, 3, 7, 448.0, ml_dtypes.float8_e4m3fn, False, True, 8),
    "fp8_e5m2": (8, 5, 2, 15, 57344.0, ml_dtypes.float8_e5m2, True, True, 15),
    "fp6_e3m2": (6, 3, 2, 3, 28.0, ml_dtypes.float6_e3m2fn, False, False, 4),
    "fp6_e2m3": (6, 2, 3, 1, 7.5, ml_dtypes.float6_e2m3fn, False, False, 2),
    "fp4_e2m1": (4, 2, 1, 1, 6.0, ml_dtypes.float4_e2m1fn, False, False, 2),
    "mxint8": (8, None, None, None, 127.0 / 64.0, None, False, False, 0),
}
FLOAT_ELEMS = [n for n in ELEM if n != "mxint8"]
ALL_ELEMS = list(ELEM)


def bits(name):
    return ELEM[name][0]


def emax(name):
    return ELEM[name][8]


def maxval(name):
    return ELEM[name][4]


# MX format name -> element name
MX = {
    "mxfp8_e4m3": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp4": "fp4_e2m1",
    "mxint8": "mxint8",
}

INT_BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}
ALL_FORMATS = [
    "int8", "int4", "int3", "int2", "fp8_e4m3", "fp8_e5m2",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4",
]


def code_bits(fmt):
    """Width of the stored element codes of a format."""
    if fmt in INT_BITS:
        return INT_BITS[fmt]
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        return 8
    if fmt in MX:
        return bits(MX[fmt])
    if fmt == "nvfp4":
        return 4
    raise KeyError(fmt)


# ----------------------------------------------------------------------------- elements

def decode_elem(codes, name):
    """codes: array of unsigned bit patterns -> float64 values (NaN/Inf as ml_dtypes)."""
    c = np.asarray(codes).astype(np.int64)
    if name == "mxint8":
        k = np.where(c >= 128, c - 256, c)
        return k.astype(np.float64) / 64.0
    t = ELEM[name][5]
    return c.astype(np.uint8).view(t).astype(np.float64)


def cast_elem(v, name):
    """Round-to-nearest-even, saturating cast of float values to element codes (uint8).

    ``v`` may be float64, but it is converted to float32 after clipping; callers
    guarantee that this is exact or harmless (values far below half the
    element's smallest subnormal). NaN maps to ml_dtypes' NaN code (only
    meaningful for e4m3/e5m2).
    """
    v = np.asarray(v, dtype=np.float64)
    m = maxval(name)
    vc = np.clip(v, -m, m)  # keeps -0.0, NaN stays NaN, Inf saturates
    if name == "mxint8":
        k = np.rint(vc * 64.0)  # exact: |vc| <= 2, float32-exact inputs
        k = np.clip(k, -127, 127).astype(np.int64)
        return (k & 0xFF).astype(np.uint8)
    v32 = vc.astype(np.float32)
    return v32.astype(ELEM[name][5]).view(np.uint8)


def table_round(v, name):
    """Brute-force nearest-even rounding to the element's finite grid (float64),
    used to sanity-check the ml_dtypes oracle itself. Returns codes."""
    n = 1 << bits(name)
    codes = np.arange(n)
    vals = decode_elem(codes, name)
    ok = np.isfinite(vals)
    if name == "mxint8":
        ok &= codes != 0x80  # -2 is never produced
    codes, vals = codes[ok], vals[ok]
    v = np.asarray(v, np.float64)
    m = maxval(name)
    vc = np.clip(v, -m, m)
    d = np.abs(vc[..., None] - vals[None, :])
    best = d.min(-1, keepdims=True)
    cand = d == best
    # ties: pick the code whose last mantissa bit (the lsb of the code) is 0
    even = (codes % 2 == 0)[None, :]
    pick_even = cand & even
    has_even = pick_even.any(-1, keepdims=True)
    cand = np.where(has_even, pick_even, cand)
    # among equal candidates (+0/-0) prefer the one with the input's sign
    neg_code = np.where(codes >= (n >> 1), 1, 0)[None, :]
    sign = np.signbit(vc)[..., None]
    if name != "mxint8":
        same_sign = cand & (neg_code == sign)
        cand = np.where(same_sign.any(-1, keepdims=True), same_sign, cand)
    idx = cand.argmax(-1)
    return codes[idx].astype(np.uint8)


# ----------------------------------------------------------------------------- packing

def chunk(w):
    return {8: (1, 1), 4: (2, 1), 2: (4, 1), 6: (4, 3), 3: (8, 3)}[w]


def packed_len(k, w):
    e, b = chunk(w)
    return -(-k // e) * b


def pack_ref(codes, w):
    """Little-endian bit stream, numpy. codes [..., K] unsigned ints < 2**w."""
    codes = np.asarray(codes).astype(np.int64)
    k = codes.shape[-1]
    nbytes = packed_len(k, w)
    nbits = nbytes * 8
    bitsarr = np.zeros(codes.shape[:-1] + (nbits,), np.uint8)
    for i in range(w):
        bitsarr[..., i: k * w: w] = (codes >> i) & 1
    return np.packbits(bitsarr.reshape(codes.shape[:-1] + (nbytes, 8)), axis=-1, bitorder="little")[..., 0]


def unpack_ref(packed, w, k):
    packed = np.asarray(packed).astype(np.uint8)
    bitsarr = np.unpackbits(packed[..., None], axis=-1, bitorder="little")
    bitsarr = bitsarr.reshape(packed.shape[:-1] + (-1,)).astype(np.int64)
    out = np.zeros(packed.shape[:-1] + (k,), np.int64)
    for i in range(w):
        out |= bitsarr[..., i: k * w: w] << i
    return out


def unpack_qt_codes(qt, w, k):
    """Unsigned code patterns [R, K] from a QTensor's packed codes."""
    c = qt.codes.cpu()
    if c.dtype == torch.int8:
        c = c.view(torch.uint8)
    return unpack_ref(c.numpy(), w, k)


def sign_extend(p, w):
    p = np.asarray(p).astype(np.int64)
    return np.where(p >= (1 << (w - 1)), p - (1 << w), p)


# ----------------------------------------------------------------------------- 2-D view

def as_2d(x, axis=-1):
    """numpy view [R, K] of the tensor with ``axis`` moved last."""
    a = np.asarray(x)
    a = np.moveaxis(a, axis, -1)
    return a.reshape(-1, a.shape[-1])


def tiles_view(x2, tr, tc, mode="edge"):
    """[R, K] -> [nR, nK, tr*tc] padded per ``mode`` (edge = repeat last real
    row/column, which keeps min/max/amax of real elements)."""
    r, k = x2.shape
    nr, nk = -(-r // tr), -(-k // tc)
    xp = np.pad(x2, ((0, nr * tr - r), (0, nk * tc - k)), mode=mode)
    return xp.reshape(nr, tr, nk, tc).transpose(0, 2, 1, 3).reshape(nr, nk, tr * tc)


def expand(t, tr, tc, r, k):
    """per-tile [nR, nK] -> per-element [R, K]."""
    return np.repeat(np.repeat(t, tr, axis=0), tc, axis=1)[:r, :k]


# ----------------------------------------------------------------------------- MX

def mx_exponent(amax, name, rule):
    """Unbiased shared exponent (int64) per block from float64 amax (finite, >= 0)."""
    amax = np.asarray(amax, np.float64)
    pos = amax > 0
    safe = np.where(pos, amax, 1.0)
    _, e = np.frexp(safe)  # safe = m * 2**e, m in [0.5, 1)
    fl = e.astype(np.int64) - 1  # floor(log2(amax)), exact
    if rule == "floor":
        E = fl - emax(name)
    elif rule == "ceil":
        m = maxval(name)
        E = fl - int(math.floor(math.log2(m))) - 1
        # smallest E with 2**E * max >= amax (2**E * max is exact in float64)
        for _ in range(4):
            E = np.where(np.ldexp(m, E) < safe, E + 1, E)
        for _ in range(4):
            E = np.where(np.ldexp(m, E - 1) >= safe, E - 1, E)
    else:
        raise ValueError(rule)
    E = np.where(pos, E, -127)
    return np.clip(E, -127, 127)


def mx_ref(x, fmt, rule="floor", axis=-1):
    """-> codes [R, K] uint8, scales [R, nb] uint8, deq float32 in x's 2-D view."""
    name = MX[fmt]
    x2 = as_2d(np.asarray(x, np.float32), axis).astype(np.float64)
    r, k = x2.shape
    nb = -(-k // 32)
    xb = tiles_view(x2, 1, 32, mode="constant")[:, :, :]  # zero padding
    bad = ~np.isfinite(xb).all(-1)  # [R, nb]
    xb = np.where(bad[..., None], 0.0, xb)
    amax = np.abs(xb).max(-1)
    E = mx_exponent(amax, name, rule)
    scales = np.where(bad, 255, E + 127).astype(np.uint8)
    v = np.ldexp(xb, -E[..., None])  # exact in float64
    codes = cast_elem(v, name)
    codes = np.where(bad[..., None], 0, codes).astype(np.uint8)
    deq = np.ldexp(decode_elem(codes, name), E[..., None])
    deq = np.where(bad[..., None], np.nan, deq)
    codes = codes.reshape(r, nb * 32)[:, :k]
    with np.errstate(over="ignore"):  # ceil rule near float32 max can round up to 2**128
        deq = deq.reshape(r, nb * 32)[:, :k].astype(np.float32)
    return codes, scales, deq


def mx_qt_parts(qt, fmt, k):
    """(codes [R,K], scales [R,nb]) of a lowbit MX QTensor as numpy."""
    name = MX[fmt]
    codes = unpack_qt_codes(qt, bits(name), k)
    return codes, qt.scales.cpu().numpy()


# ----------------------------------------------------------------------------- NVFP4

F32 = np.float32


def nvfp4_ref(x, axis=-1):
    """numpy float32 implementation of docs/formats.md NVFP4.

    -> codes [R, K] uint8 (E2M1), scale codes [R, nb] uint8 (E4M3), s_t float32,
       deq float32 [R, K], zero_block mask [R, nb] (s_b == 0).
    """
    x2 = as_2d(np.asarray(x, np.float32), axis).astype(np.float32)
    r, k = x2.shape
    nb = -(-k // 16)
    amax_t = np.abs(x2).max() if x2.size else F32(0)
    s_t = F32(F32(amax_t) / F32(6 * 448))
    xb = tiles_view(x2, 1, 16, mode="constant").astype(np.float32)
    amax_b = np.abs(xb).max(-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = F32(F32(6) * s_t)
        v = (amax_b / denom).astype(np.float32) if s_t > 0 else np.zeros_like(amax_b)
    sb_codes = cast_elem(v, "fp8_e4m3")
    s_b = decode_elem(sb_codes, "fp8_e4m3").astype(np.float32)
    zero = s_b == 0
    d = (s_b * s_t).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(zero[..., None], F32(0), xb / np.where(zero, F32(1), d)[..., None]).astype(np.float32)
    codes = cast_elem(q, "fp4_e2m1")
    codes = np.where(zero[..., None], 0, codes).astype(np.uint8)
    e = decode_elem(codes, "fp4_e2m1").astype(np.float32)
    deq = (e * s_b[..., None]).astype(np.float32) * s_t
    deq = deq.astype(np.float32)
    codes = codes.reshape(r, nb * 16)[:, :k]
    deq = deq.reshape(r, nb * 16)[:, :k]
    return codes, sb_codes, s_t, deq, zero


# ----------------------------------------------------------------------------- int

def int_stats(x2, tr, tc):
    t = tiles_view(x2.astype(np.float64), tr, tc, mode="edge")
    return t.min(-1), t.max(-1), np.abs(t).max(-1)


def int_ref_scales(x2, b, symmetric, zero_point, tr, tc):
    """float64 reference scales / zeros per tile (before any storage rounding)."""
    mn, mx, amax = int_stats(x2, tr, tc)
    if symmetric:
        qmax = 2 ** (b - 1) - 1
        s = np.where(amax > 0, amax / qmax, 1.0)
        return s, None
    s = (mx - mn) / (2 ** b - 1)
    const = mx == mn
    s = np.where(const, 1.0, s)
    z = -mn / s
    if zero_point == "integer":
        z = np.rint(z)
    return s, z


def int_ref_codes(x2, s_tile, z_tile, b, symmetric, tr, tc):
    """Reference integer codes from given per-tile scale/zero (float64 math).

    Returns (q, ambiguous): ``ambiguous`` marks elements whose x/s + z lies so
    close to a .5 rounding boundary that float32 evaluation may legitimately
    round the other way.
    """
    r, k = x2.shape
    s = expand(np.asarray(s_tile, np.float64), tr, tc, r, k)
    x = x2.astype(np.float64)
    if symmetric:
        t = x / s
        qmax = 2 ** (b - 1) - 1
        lo, hi = -qmax, qmax
        scale_mag = np.abs(t) + 1
    else:
        z = expand(np.asarray(z_tile, np.float64), tr, tc, r, k)
        t = x / s + z
        lo, hi = 0, 2 ** b - 1
        scale_mag = np.abs(x / s) + np.abs(z) + 1
    q = np.clip(np.rint(t), lo, hi)
    frac = t - np.floor(t)
    amb = np.abs(frac - 0.5) < 64 * 2.0 ** -24 * scale_mag
    # values right at the clamp edges are not ambiguous in the result
    amb &= ~((t < lo - 0.5 - 1e-3) | (t > hi + 0.5 + 1e-3))
    return q.astype(np.int64), amb


# ----------------------------------------------------------------------------- fp8 scaled

def fp8_ref(x2, name, tr, tc):
    """-> s [nR, nK] float32, codes [R, K] uint8, deq float32."""
    m = F32(maxval(name))
    x2 = x2.astype(np.float32)
    r, k = x2.shape
    amax = tiles_view(x2, tr, tc, mode="edge")
    amax = np.abs(amax).max(-1).astype(np.float32)
    s = np.where(amax > 0, amax / m, F32(1)).astype(np.float32)
    se = expand(s, tr, tc, r, k)
    v = (x2 / se).astype(np.float32)
    codes = cast_elem(v, name)
    deq = (decode_elem(codes, name).astype(np.float32) * se).astype(np.float32)
    return s, codes, deq


# ----------------------------------------------------------------------------- misc

def sqnr_db(x, xh):
    x = np.asarray(x, np.float64)
    xh = np.asarray(xh, np.float64)
    return 10 * np.log10((x ** 2).sum() / ((x - xh) ** 2).sum())


def mismatch_index(got, exp, mask=None):
    """First index where got != exp (NaN == NaN), or None."""
    a = np.asarray(got)
    b = np.asarray(exp)
    neq = a != b
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        neq &= ~(np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64)))
    if mask is not None:
        neq &= mask
    if not neq.any():
        return None, 0
    return tuple(int(i) for i in np.argwhere(neq)[0]), int(neq.sum())


def assert_equal_np(got, exp, what="", mask=None, extra=None):
    """Exact equality with the first mismatching coordinate in the message.

    ``extra(idx)`` may return more context (e.g. the input value) for the message.
    """
    got = np.asarray(got)
    exp = np.asarray(exp)
    assert got.shape == exp.shape, f"{what}: shape {got.shape} != expected {exp.shape}"
    idx, n = mismatch_index(got, exp, mask)
    if idx is not None:
        msg = f"{what}: {n} mismatches of {got.size}; first at {idx}: got {got[idx]!r}, expected {exp[idx]!r}"
        if extra is not None:
            msg += f"; {extra(idx)}"
        raise AssertionError(msg)


def mx_test_data(rng, shape, lo=-30, hi=30):
    """Gaussian data with a per-32-block power-of-two magnitude 2**randint(lo, hi)."""
    x = rng.standard_normal(shape).astype(np.float64)
    k = shape[-1]
    nb = -(-k // 32)
    ex = rng.integers(lo, hi + 1, size=shape[:-1] + (nb,))
    ex = np.repeat(ex, 32, axis=-1)[..., :k]
    return np.ldexp(x, ex).astype(np.float32)
