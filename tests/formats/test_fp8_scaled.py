"""FP8 (E4M3/E5M2) and INT8 with software scales at every granularity:
scale shapes and values, codes bit-exact vs ml_dtypes on float32 x / s."""

import numpy as np
import pytest
import torch

import lowbit

from ._checks import check_fp8, check_int, expected_tile

FP8 = ["fp8_e4m3", "fp8_e5m2"]
GRANS = [
    ("tensor", {}),
    ("channel", {}),
    ("token", {}),
    ("group", {"group_size": 64}),
    ("group", {"group_size": 128}),
    ("block", {}),  # default (128, 128)
    ("block", {"block_shape": (128, 128)}),
    ("block", {"block_shape": (1, 128)}),
]
IDS = ["tensor", "channel", "token", "g64", "g128", "block-default", "block128x128", "block1x128"]


def _data(seed, shape=(200, 300)):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(3, shape) * np.exp2(rng.integers(-8, 8, (shape[0], 1)))
    x[:, 7] *= 50  # outlier channel
    return x.astype(np.float32)


def _opts(gran, extra):
    o = dict(extra)
    if gran != "group":
        o["granularity"] = gran
    return o


def _tile(gran, extra, r, k):
    return expected_tile(gran, r, k, extra.get("group_size"), extra.get("block_shape", (128, 128)))


@pytest.mark.parametrize("gran,extra", GRANS, ids=IDS)
@pytest.mark.parametrize("fmt", FP8)
def test_fp8_granularity(fmt, gran, extra):
    x = _data(1)
    tile = _tile(gran, extra, *x.shape)
    qt = check_fp8(x, fmt, tile=tile, **_opts(gran, extra))
    assert qt.options["granularity"] == gran
    nr, nk = -(-x.shape[0] // tile[0]), -(-x.shape[1] // tile[1])
    assert tuple(qt.scales.shape) == (nr, nk)


@pytest.mark.parametrize("gran,extra", GRANS, ids=IDS)
def test_int8_granularity(gran, extra):
    x = _data(2)
    tile = _tile(gran, extra, *x.shape)
    qt = check_int(x, "int8", tile=tile, symmetric=True, **_opts(gran, extra))
    assert qt.options["granularity"] == gran
    check_int(x, "int8", tile=tile, symmetric=False, **_opts(gran, extra))


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_default_is_channel(fmt):
    x = _data(3, (5, 40))
    qt = check_fp8(x, fmt, tile=(1, 40))
    assert qt.options["granularity"] == "channel"
    assert tuple(qt.scales.shape) == (5, 1)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_block_tail_rows_and_cols(fmt):
    """Partial 128x128 blocks at the bottom/right use their real elements only."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((130, 129)).astype(np.float32)
    x[128:, :] *= 1e-3  # the two tail rows are tiny: zero/edge padding must not leak
    x[:, 128] = 1e-4
    qt = check_fp8(x, fmt, tile=(128, 128), granularity="block")
    s = qt.scales.numpy()
    assert s.shape == (2, 2)
    max_e = 448.0 if fmt == "fp8_e4m3" else 57344.0
    assert s[1, 1] == np.float32(np.abs(x[128:, 128]).max()) / np.float32(max_e)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_3d_and_axis(fmt):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 50)).astype(np.float32)
    check_fp8(x, fmt, tile=(1, 50), granularity="token")
    check_fp8(x, fmt, tile=(1, 16), group_size=16)
    y = np.ascontiguousarray(np.moveaxis(x, -1, 0))
    check_fp8(y, fmt, tile=(1, 50), granularity="channel", axis=0)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_ties_and_zero_rows(fmt):
    """Rows with amax = max_elem (s = 1) holding exact element midpoints; a zero row (s = 1)."""
    from ._ref import decode_elem, maxval
    v = decode_elem(np.arange(256), fmt)
    v = np.unique(v[np.isfinite(v) & (v >= 0)])
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    k = 64
    n = -(-mids.size // (k - 1))
    pad = np.zeros(n * (k - 1) - mids.size, np.float32)
    body = np.concatenate([mids, pad]).reshape(n, k - 1)
    x = np.concatenate([np.full((n, 1), maxval(fmt), np.float32), body], axis=1)
    x[::2] *= -1
    x = np.concatenate([x, np.zeros((1, k), np.float32)])
    qt = check_fp8(x, fmt, tile=(1, k))
    assert (qt.scales.numpy() == 1).all()


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_scale_dtype(fmt):
    x = _data(6, (8, 64))
    qt = lowbit.quantize_tensor(torch.from_numpy(x), fmt, scale_dtype=torch.bfloat16)
    assert qt.scales.dtype == torch.bfloat16
    from ._ref import decode_elem
    d = decode_elem(qt.codes.numpy(), fmt) * qt.scales.float().numpy().astype(np.float64)
    np.testing.assert_allclose(qt.dequantize().numpy(), d, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_near_ties_of_x_over_s(fmt):
    """x = float32(mid * s) for every midpoint of the element grid, s = amax / max
    with a random amax per row: x / s lands on or next to a tie, so the exact
    float32 division x / s (not x * (1 / s)) and ties-to-even both matter."""
    from ._ref import decode_elem, maxval
    rng = np.random.default_rng(21)
    v = decode_elem(np.arange(256), fmt)
    v = np.unique(v[np.isfinite(v) & (v >= 0)])
    mids = (v[1:] + v[:-1]) / 2
    m = np.float32(maxval(fmt))
    rows = []
    for _ in range(24):
        amax = np.float32(rng.uniform(0.5, 2.0) * 2.0 ** rng.integers(-12, 12))
        s = np.float32(amax / m)
        body = (mids * np.float64(s)).astype(np.float32) * rng.choice([-1, 1], mids.size).astype(np.float32)
        rows.append(np.concatenate([[amax], body]).astype(np.float32))
    x = np.stack(rows)
    assert (np.abs(x[:, 1:]) <= x[:, :1]).all()
    check_fp8(x, fmt, tile=(1, x.shape[1]))
