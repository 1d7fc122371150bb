"""Bit packing: one little-endian bit-stream rule for every width (docs/formats.md)."""

import numpy as np
import pytest
import torch

from lowbit.formats import pack_codes, unpack_codes

from ._ref import assert_equal_np, pack_ref, packed_len, unpack_ref

WIDTHS = [2, 3, 4, 6, 8]


def _pack(codes, w):
    return pack_codes(torch.tensor(codes, dtype=torch.uint8), w).tolist()


def test_hand_examples_4bit():
    assert _pack([1, 2], 4) == [0x21]
    assert _pack([0xF, 0x0, 0x3], 4) == [0x0F, 0x03]  # odd K: high nibble of the last byte is 0
    assert _pack([[1, 2, 3, 4], [5, 6, 7, 8]], 4) == [[0x21, 0x43], [0x65, 0x87]]


def test_hand_examples_2bit():
    # 1 | 2<<2 | 3<<4 | 0<<6 = 0b00_11_10_01
    assert _pack([1, 2, 3, 0], 2) == [0x39]
    assert _pack([3, 0, 0, 0, 1], 2) == [0x03, 0x01]


def test_hand_examples_6bit():
    # word = 1 | 2<<6 | 3<<12 | 4<<18 = 0x103081, little-endian bytes
    assert _pack([1, 2, 3, 4], 6) == [0x81, 0x30, 0x10]
    assert _pack([0x3F, 0, 0, 0], 6) == [0x3F, 0x00, 0x00]
    assert _pack([0, 0, 0, 0x3F], 6) == [0x00, 0x00, 0xFC]
    # K = 5: two 3-byte chunks, second holds only element 4
    assert _pack([0, 0, 0, 0, 0x21], 6) == [0, 0, 0, 0x21, 0, 0]


def test_hand_examples_3bit():
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert _pack(codes, 3) == [word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]
    assert _pack([7], 3) == [0x07, 0x00, 0x00]
    assert _pack([0, 0, 7], 3) == [0xC0, 0x01, 0x00]  # element 2 spans bits 6-8


def test_hand_examples_8bit():
    assert _pack([0, 1, 0x80, 0xFF], 8) == [0, 1, 0x80, 0xFF]


@pytest.mark.parametrize("w", WIDTHS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 9, 31, 32, 33, 70, 727])
def test_round_trip_and_reference(w, k):
    rng = np.random.default_rng(w * 1000 + k)
    codes = rng.integers(0, 1 << w, size=(3, k))
    packed = pack_codes(torch.from_numpy(codes).to(torch.uint8), w)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == (3, packed_len(k, w)), f"w={w} k={k}: packed shape {tuple(packed.shape)}"
    assert_equal_np(packed.numpy(), pack_ref(codes, w), f"pack w={w} k={k}")
    back = unpack_codes(packed, w, k)
    assert tuple(back.shape) == (3, k)
    assert_equal_np(back.numpy().astype(np.int64), codes, f"unpack w={w} k={k}")
    # unpack agrees with the reference unpacker on arbitrary bytes too
    junk = rng.integers(0, 256, size=(2, packed_len(k, w)), dtype=np.uint8)
    assert_equal_np(unpack_codes(torch.from_numpy(junk), w, k).numpy().astype(np.int64),
                    unpack_ref(junk, w, k), f"unpack junk w={w} k={k}")


@pytest.mark.parametrize("w", WIDTHS)
def test_padding_bits_are_zero(w):
    k = 13
    codes = np.full((1, k), (1 << w) - 1)
    packed = pack_codes(torch.from_numpy(codes).to(torch.uint8), w).numpy()
    nbits = packed.shape[-1] * 8
    bits = np.unpackbits(packed, axis=-1, bitorder="little")[0]
    assert bits[: k * w].all()
    assert not bits[k * w: nbits].any(), f"w={w}: bits past K*w must be zero"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
@pytest.mark.parametrize("w", WIDTHS)
def test_integer_input_dtypes(w, dtype):
    rng = np.random.default_rng(w)
    codes = rng.integers(0, 1 << w, size=(2, 19))
    got = pack_codes(torch.from_numpy(codes).to(dtype), w)
    assert_equal_np(got.numpy(), pack_ref(codes, w), f"pack {dtype} w={w}")


@pytest.mark.parametrize("w", WIDTHS)
def test_leading_dims(w):
    rng = np.random.default_rng(7 + w)
    codes = rng.integers(0, 1 << w, size=(2, 3, 11))
    packed = pack_codes(torch.from_numpy(codes).to(torch.uint8), w)
    assert tuple(packed.shape) == (2, 3, packed_len(11, w))
    assert_equal_np(packed.numpy(), pack_ref(codes, w), f"pack 3-D w={w}")
    assert_equal_np(unpack_codes(packed, w, 11).numpy().astype(np.int64), codes, f"unpack 3-D w={w}")


@pytest.mark.parametrize("w", WIDTHS)
def test_all_code_values(w):
    """Every code value at every position within a chunk survives a round trip."""
    n = 1 << w
    e = {8: 1, 4: 2, 2: 4, 6: 4, 3: 8}[w]
    codes = np.stack([np.roll(np.arange(n), s)[: max(n, e)] for s in range(e)])
    codes = np.concatenate([codes, codes[:, :1]], axis=1)  # odd K
    packed = pack_codes(torch.from_numpy(codes).to(torch.uint8), w)
    assert_equal_np(packed.numpy(), pack_ref(codes, w), f"pack all values w={w}")
    assert_equal_np(unpack_codes(packed, w, codes.shape[1]).numpy().astype(np.int64), codes,
                    f"unpack all values w={w}")


@pytest.mark.parametrize("w", WIDTHS)
def test_empty_rows(w):
    """[0, K] codes pack to [0, packed_K] and unpack back to [0, K]."""
    packed = pack_codes(torch.zeros(0, 5, dtype=torch.uint8), w)
    assert tuple(packed.shape) == (0, packed_len(5, w))
    assert tuple(unpack_codes(packed, w, 5).shape) == (0, 5)
