"""NVFP4: bit-exact against the independent numpy float32 implementation in
_ref.nvfp4_ref of docs/formats.md's rule:
  s_t = amax / (6 * 448)                      (float32)
  s_b = E4M3(amax_block / (6 * s_t))          (float32 division, then the cast)
  q   = E2M1(x / (s_b * s_t))                 (float32 product and division)
  x'  = e2m1 * s_b * s_t                      (float32, left to right)
"""

import zlib

import numpy as np
import pytest
import torch

import lowbit

from ._ref import as_2d, assert_equal_np, nvfp4_ref, packed_len, unpack_qt_codes


def check_nvfp4(x, axis=-1):
    qt = lowbit.quantize_tensor(torch.from_numpy(x), "nvfp4", **({} if axis == -1 else {"axis": axis}))
    rc, rs, st, rd, zero = nvfp4_ref(x, axis)
    r, k = rc.shape
    tag = f"nvfp4 shape={x.shape} axis={axis}"
    assert qt.fmt == "nvfp4"
    assert tuple(qt.shape) == x.shape
    assert tuple(qt.tile) == (1, 16)
    assert qt.global_scale is not None and qt.global_scale.dtype == torch.float32
    assert qt.global_scale.numel() == 1
    assert_equal_np(np.float32(qt.global_scale.item()), st, f"{tag} global scale s_t")
    assert qt.scales.dtype == torch.uint8 and tuple(qt.scales.shape) == (r, -(-k // 16)), tag
    assert qt.codes.dtype == torch.uint8 and tuple(qt.codes.shape) == (r, packed_len(k, 4)), tag
    x2 = as_2d(x, axis)
    assert_equal_np(qt.scales.numpy(), rs, f"{tag} E4M3 block scales",
                    extra=lambda i: f"block amax={np.abs(x2[i[0], 16 * i[1]:16 * i[1] + 16]).max()!r}")
    codes = unpack_qt_codes(qt, 4, k)
    zero_el = np.repeat(zero, 16, axis=1)[:, :k]
    # in a block whose scale is 0 the elements are zero; their sign is not specified
    codes_cmp = np.where(zero_el, codes & 0x7, codes)
    assert_equal_np(codes_cmp, rc, f"{tag} E2M1 codes", extra=lambda i: f"x={x2[i]!r}")
    deq = qt.dequantize()
    assert deq.dtype == torch.float32 and tuple(deq.shape) == x.shape
    moved = np.moveaxis(np.empty(x.shape, np.uint8), axis, -1).shape
    exp = np.moveaxis(rd.reshape(moved), -1, axis)
    assert_equal_np(deq.numpy(), exp, f"{tag} dequantized", extra=lambda i: f"x={x[i]!r}")
    return qt


@pytest.mark.parametrize("shape", [(8, 256), (5, 70), (3, 727), (1, 16), (4, 1)])
@pytest.mark.parametrize("dist", ["normal", "spread", "t3"])
def test_nvfp4_random(shape, dist):
    rng = np.random.default_rng(zlib.crc32(repr((shape, dist)).encode()))
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "t3":
        x = rng.standard_t(3, shape)
    else:  # per-16-block magnitudes over 2**-12 .. 2**12: some blocks underflow E4M3
        k = shape[-1]
        ex = np.repeat(rng.integers(-12, 13, shape[:-1] + (-(-k // 16),)), 16, axis=-1)[..., :k]
        x = np.ldexp(rng.standard_normal(shape), ex)
    check_nvfp4((x * 0.37).astype(np.float32))


def test_nvfp4_3d_and_axis():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    check_nvfp4(x)
    check_nvfp4(np.ascontiguousarray(np.moveaxis(x, -1, 0)), axis=0)


def test_nvfp4_all_zero_tensor():
    x = np.zeros((3, 40), np.float32)
    qt = check_nvfp4(x)
    assert qt.global_scale.item() == 0.0, "an all-zero tensor has s_t = 0"
    assert (qt.scales == 0).all()
    deq = qt.dequantize()
    assert torch.equal(deq, torch.zeros_like(deq)) and not torch.isnan(deq).any()


def test_nvfp4_zero_block_and_underflowing_block():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[0, 16:32] = 0.0  # a zero block
    # a block whose amax / (6 s_t) < 2**-10 rounds to E4M3 zero: scale 0, zero elements
    amax_t = np.abs(x).max()
    x[1, 32:48] = (rng.uniform(-1, 1, 16) * amax_t * 1e-6).astype(np.float32)
    qt = check_nvfp4(x)
    s = qt.scales.numpy()
    assert s[0, 1] == 0 and s[1, 2] == 0
    deq = qt.dequantize().numpy()
    assert (deq[0, 16:32] == 0).all() and (deq[1, 32:48] == 0).all()
    assert not np.isnan(deq).any()


def test_nvfp4_hand_example():
    """amax = 2688 -> s_t = 1; a block with amax 6 -> s_b = E4M3(1) = 1 (code 0x38)."""
    x = np.zeros((2, 16), np.float32)
    x[0, 0] = 2688.0
    x[1, :6] = [6.0, 0.25, 0.75, 2.5, -5.0, 1.1]
    qt = check_nvfp4(x)
    assert qt.global_scale.item() == 1.0
    assert qt.scales[1, 0].item() == 0x38
    assert qt.scales[0, 0].item() == 0x7E  # 2688 / 6 = 448
    np.testing.assert_array_equal(qt.dequantize().numpy()[1, :6], [6.0, 0.0, 1.0, 2.0, -4.0, 1.0])


def test_nvfp4_ties():
    """Elements at exact midpoints of the E2M1 grid (s_t = 1, s_b = 1)."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 2688.0  # s_t = 1, block 0 scale 448
    x[0, 16:32] = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 0]
    qt = check_nvfp4(x)
    np.testing.assert_array_equal(
        qt.dequantize().numpy()[0, 16:],
        [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -1, -2, -2, -4, -4, 0])


def test_nvfp4_near_ties():
    """Blocks built so that both roundings sit on or next to a tie:
    amax_block = float32(m * 6 * s_t) for E4M3 midpoints m (the block-scale cast)
    and x = float32(e * s_b * s_t) for E2M1 midpoints e (the element cast). The
    exact float32 order of operations of docs/formats.md then decides codes."""
    from ._ref import decode_elem
    rng = np.random.default_rng(31)
    e4 = decode_elem(np.arange(256), "fp8_e4m3")
    e4 = np.unique(e4[np.isfinite(e4) & (e4 > 0.02) & (e4 < 400)])
    m4 = (e4[1:] + e4[:-1]) / 2
    e2 = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    rows = []
    for _ in range(4):
        amax_t = np.float32(rng.uniform(1, 2) * 2.0 ** rng.integers(-6, 6))
        s_t = np.float32(amax_t / np.float32(2688))
        blocks = []
        for m in rng.choice(m4, 48):
            amax_b = np.float32(np.float32(np.float32(6) * s_t) * np.float64(m))
            amax_b = min(amax_b, amax_t)
            # the block scale the reference will pick (either neighbour of m): use m's
            # lower neighbour as an estimate of s_b; elements only need to be near ties
            s_b = np.float32(e4[np.searchsorted(e4, m) - 1])
            els = (rng.choice(e2, 15) * np.float64(s_b) * np.float64(s_t)).astype(np.float32)
            els = np.minimum(np.abs(els), amax_b) * rng.choice([-1, 1], 15).astype(np.float32)
            blk = np.concatenate([[amax_b], els]).astype(np.float32)
            blocks.append(blk)
        row = np.concatenate(blocks)
        row[0] = amax_t
        rows.append(row)
    x = np.stack(rows).astype(np.float32)
    check_nvfp4(x)
