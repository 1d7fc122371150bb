"""Element formats: exhaustive decode tables, re-encode round trips and
encode against ml_dtypes (the FORMATS.md oracle: clip to +-max, then cast)."""

import math

import numpy as np
import pytest
import torch

from lowbit.formats.elements import ELEMENTS, decode, encode

from ._ref import ALL_ELEMS, ELEM, FLOAT_ELEMS, assert_equal_np, cast_elem, decode_elem, maxval, table_round


def _codes(name, dtype=torch.uint8):
    n = 1 << ELEM[name][0]
    return torch.arange(n, dtype=torch.int64).to(dtype)


def test_element_names():
    assert set(ELEMENTS) == set(ALL_ELEMS)


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_element_fields(name):
    e = ELEMENTS[name]
    b, eb, mb, bias, mx, _, has_inf, has_nan, _ = ELEM[name]
    assert e.name == name
    assert e.bits == b
    assert e.max == mx, f"{name}.max = {e.max}, expected {mx}"
    assert bool(e.has_inf) == has_inf
    assert bool(e.has_nan) == has_nan
    if name != "mxint8":
        assert (e.ebits, e.mbits, e.bias) == (eb, mb, bias)
        assert 1 + e.ebits + e.mbits == e.bits


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_oracle_self_check(name):
    """The oracle (ml_dtypes via float32, clip first) agrees with brute-force
    nearest-even search on the element grid; guards the reference itself."""
    rng = np.random.default_rng(0)
    m = maxval(name)
    x = (rng.standard_normal(4000) * m / 3).astype(np.float32)
    vals = decode_elem(np.arange(1 << ELEM[name][0]), name)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = ((vals[1:] + vals[:-1]) / 2).astype(np.float32)  # exact ties, float32-exact
    x = np.concatenate([x, mids, -mids, np.float32([0.0, -0.0, 2 * m, -2 * m])])
    assert_equal_np(cast_elem(x, name), table_round(x, name), f"oracle {name}", extra=lambda i: f"x={x[i]!r}")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
@pytest.mark.parametrize("name", ALL_ELEMS)
def test_decode_exhaustive(name, dtype):
    codes = _codes(name, dtype)
    got = decode(codes, ELEMENTS[name])
    assert got.dtype == torch.float32
    assert got.shape == codes.shape
    exp = decode_elem(np.arange(codes.numel()), name).astype(np.float32)
    g = got.numpy()
    assert_equal_np(g, exp, f"decode {name}", extra=lambda i: f"code=0x{i[0]:02x}")
    # sign of zero: the -0 code decodes to -0.0 for float elements
    real = ~np.isnan(exp)  # the sign of NaN is not part of the contract
    assert_equal_np(np.signbit(g), np.signbit(exp), f"decode {name} sign bits", mask=real)


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_decode_accepts_name_and_shape(name):
    codes = _codes(name).reshape(-1, 4 if ELEM[name][0] > 2 else 1)
    got = decode(codes, ELEMENTS[name])
    assert got.shape == codes.shape
    exp = decode_elem(codes.numpy(), name).astype(np.float32)
    assert_equal_np(got.numpy(), exp, f"decode 2-D {name}")


def test_decode_spot_values():
    """Hand-checked table entries (independent of ml_dtypes)."""
    e = ELEMENTS
    d = lambda c, n: decode(torch.tensor([c], dtype=torch.uint8), e[n]).item()
    assert d(0x7E, "fp8_e4m3") == 448.0
    assert math.isnan(d(0x7F, "fp8_e4m3")) and math.isnan(d(0xFF, "fp8_e4m3"))
    assert d(0x01, "fp8_e4m3") == 2.0 ** -9
    assert d(0x7B, "fp8_e5m2") == 57344.0
    assert d(0x7C, "fp8_e5m2") == math.inf and d(0xFC, "fp8_e5m2") == -math.inf
    assert math.isnan(d(0x7D, "fp8_e5m2"))
    assert d(0x01, "fp8_e5m2") == 2.0 ** -16
    assert d(0x1F, "fp6_e3m2") == 28.0 and d(0x01, "fp6_e3m2") == 0.0625
    assert d(0x1F, "fp6_e2m3") == 7.5 and d(0x01, "fp6_e2m3") == 0.125
    assert [d(c, "fp4_e2m1") for c in range(8)] == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert [d(c, "fp4_e2m1") for c in range(8, 16)] == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert d(0x7F, "mxint8") == 127 / 64 and d(0x80, "mxint8") == -2.0 and d(0xFF, "mxint8") == -1 / 64
    assert d(0x40, "mxint8") == 1.0 and d(0xC0, "mxint8") == -1.0


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_reencode_exhaustive(name):
    """Every finite decoded value encodes back to its own code (float -0 keeps
    its sign bit; mxint8's -128 = -2 is never produced and saturates to -127)."""
    codes = _codes(name)
    vals = decode(codes, ELEMENTS[name])
    finite = torch.isfinite(vals)
    got = encode(vals[finite], ELEMENTS[name])
    assert got.dtype == torch.uint8
    exp = codes[finite].clone()
    if name == "mxint8":
        exp[exp == 0x80] = 0x81
    assert_equal_np(got.numpy(), exp.numpy(), f"re-encode {name}",
                    extra=lambda i: f"value={vals[finite][i].item()!r}")


def _random_values(name, rng, n=20000):
    """float32 values from far below the smallest subnormal to far above max."""
    v = decode_elem(np.arange(1 << ELEM[name][0]), name)
    pos = v[np.isfinite(v) & (v > 0)]
    lo, hi = math.log2(pos.min()) - 5, math.log2(maxval(name)) + 4
    mag = np.exp2(rng.uniform(lo, hi, n))
    sign = rng.choice([-1.0, 1.0], n)
    return (sign * mag).astype(np.float32)


def _ties_and_neighbours(name):
    """Exact midpoints between adjacent representable values, and the float32
    neighbours just below/above each midpoint."""
    v = decode_elem(np.arange(1 << ELEM[name][0]), name)
    v = np.unique(v[np.isfinite(v)])
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (v[1:] + v[:-1]) / 2)  # exact in float32
    below = np.nextafter(mids, np.float32(-np.inf))
    above = np.nextafter(mids, np.float32(np.inf))
    return np.concatenate([mids, below, above])


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_random_vs_ml_dtypes(name):
    rng = np.random.default_rng(1 + ALL_ELEMS.index(name))
    x = _random_values(name, rng)
    got = encode(torch.from_numpy(x), ELEMENTS[name])
    assert got.dtype == torch.uint8 and got.shape == (x.size,)
    assert_equal_np(got.numpy(), cast_elem(x, name), f"encode {name}", extra=lambda i: f"x={x[i]!r}")


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_ties_to_even(name):
    x = _ties_and_neighbours(name)
    got = encode(torch.from_numpy(x), ELEMENTS[name]).numpy()
    assert_equal_np(got, cast_elem(x, name), f"encode ties {name}", extra=lambda i: f"x={x[i]!r}")


def test_encode_ties_hand_examples():
    enc = lambda v, n: encode(torch.tensor(v, dtype=torch.float32), ELEMENTS[n]).tolist()
    # fp4: 0.25 -> 0 (even), 0.75 -> 1.0 (code 2), 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert enc([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], "fp4_e2m1") == [0, 2, 2, 4, 4, 6, 6]
    assert enc([-0.25, -5.0], "fp4_e2m1") == [8, 14]
    # e4m3: 1.0625 (between 1 and 1.125) -> 1.0 (0x38); 1.1875 -> 1.25 (0x3A)
    assert enc([1.0625, 1.1875], "fp8_e4m3") == [0x38, 0x3A]
    # mxint8: 0.5/64 -> 0, 1.5/64 -> 2/64, -2.5/64 -> -2/64 (0xFE)
    assert enc([0.5 / 64, 1.5 / 64, -2.5 / 64], "mxint8") == [0, 2, 0xFE]


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_subnormals(name):
    """Every subnormal of the element and the values around it."""
    if name == "mxint8":
        sub = np.arange(1, 8) / 64.0
    else:
        _, eb, mb, bias, *_ = ELEM[name]
        q = 2.0 ** (1 - bias - mb)
        sub = np.arange(1, 2 ** mb) * q
        sub = np.concatenate([sub, [q / 2, q / 4, q * 0.75, q / 2 * 1.0000001]])
    x = np.concatenate([sub, -sub]).astype(np.float32)
    x = np.concatenate([x, np.nextafter(x, np.float32(0)), np.nextafter(x, np.float32(np.inf))])
    got = encode(torch.from_numpy(x), ELEMENTS[name]).numpy()
    assert_equal_np(got, cast_elem(x, name), f"encode subnormals {name}", extra=lambda i: f"x={x[i]!r}")


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_saturates(name):
    m = maxval(name)
    x = np.float32([m, m * 1.01, m * 1000, 3.0e38, np.inf, -m * 1.5, -np.inf])
    got = encode(torch.from_numpy(x), ELEMENTS[name]).numpy()
    exp = cast_elem(x, name)
    assert_equal_np(got, exp, f"saturate {name}", extra=lambda i: f"x={x[i]!r}")
    back = decode(torch.from_numpy(got), ELEMENTS[name]).numpy()
    np.testing.assert_array_equal(np.abs(back), np.float32(m))


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_signed_zero(name):
    got = encode(torch.tensor([0.0, -0.0]), ELEMENTS[name]).tolist()
    if name == "mxint8":
        assert got == [0, 0]
    else:
        assert got == [0, 1 << (ELEM[name][0] - 1)], f"{name}: -0.0 must keep the sign bit"


@pytest.mark.parametrize("name", [n for n in ALL_ELEMS if not ELEM[n][7]])
def test_encode_nan_raises(name):
    with pytest.raises(ValueError):
        encode(torch.tensor([1.0, float("nan")]), ELEMENTS[name])


@pytest.mark.parametrize("name", [n for n in ALL_ELEMS if ELEM[n][7]])
def test_encode_nan_gives_nan_code(name):
    got = encode(torch.tensor([float("nan"), 1.0]), ELEMENTS[name])
    back = decode(got, ELEMENTS[name])
    assert math.isnan(back[0].item()) and back[1].item() == 1.0


@pytest.mark.parametrize("name", FLOAT_ELEMS)
def test_encode_float64_rounds_once(name):
    """A float64 input just above a tie must round up (no double rounding
    through float32): mid + tiny is not a tie."""
    v = decode_elem(np.arange(1 << ELEM[name][0]), name)
    v = np.unique(v[np.isfinite(v) & (v > 0)])
    mids = (v[1:] + v[:-1]) / 2
    x = np.concatenate([mids * (1 + 2.0 ** -40), mids * (1 - 2.0 ** -40)])
    exp = table_round(x, name)
    got = encode(torch.from_numpy(x), ELEMENTS[name]).numpy()
    assert_equal_np(got, exp, f"float64 encode {name}", extra=lambda i: f"x={x[i]!r}")


@pytest.mark.parametrize("name", ALL_ELEMS)
def test_encode_float32_extremes(name):
    """float32 subnormals / tiny normals underflow to signed zero; huge values saturate."""
    tiny = np.float32([1.4e-45, 1e-40, 1.1754942e-38, 1.17549435e-38, 1e-30, 3.0e-20])
    big = np.float32([1e20, 3.4028235e38])
    x = np.concatenate([tiny, -tiny, big, -big])
    got = encode(torch.from_numpy(x), ELEMENTS[name]).numpy()
    assert_equal_np(got, cast_elem(x, name), f"encode float32 extremes {name}", extra=lambda i: f"x={x[i]!r}")
