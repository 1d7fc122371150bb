"""Block-wise Hadamard rotation: the matrix, its layout along K, and the forward path."""

import pytest
import torch
from torch import nn

from lowbit import quantize_tensor
from lowbit.nn import QuantLinear, parse_recipe
from lowbit.quant.rotation import hadamard, rotate, rotation_blocks, rotation_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


def popcount_hadamard(n):
    """Sylvester's matrix from its closed form H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    pop = torch.zeros_like(bits)
    for b in range(12):
        pop += (bits >> b) & 1
    return (1 - 2 * (pop % 2)).double() / n ** 0.5


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32, 128])
def test_hadamard_is_sylvester_and_orthogonal(n):
    h = hadamard(n, torch.float64)
    assert torch.equal(h, popcount_hadamard(n))
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)


def test_hadamard_rejects_other_sizes():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)
    with pytest.raises(ValueError, match="power of two"):
        rotation_blocks(64, 48)


def test_block_layout_along_k():
    assert rotation_blocks(576, 128) == [(0, 128), (128, 128), (256, 128), (384, 128), (512, 64)]
    assert rotation_blocks(576, 32) == [(i, 32) for i in range(0, 576, 32)]
    assert rotation_blocks(100, 32) == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert rotation_blocks(35, 32) == [(0, 32), (32, 2)]  # a tail of 1 stays as is


@pytest.mark.parametrize("k,block", [(576, 128), (576, 32), (100, 32), (35, 32)])
def test_rotation_matrix_is_block_diagonal_orthogonal_symmetric(k, block):
    r = rotation_matrix(k, block)
    expected = torch.zeros(k, k, dtype=torch.float64)
    covered = 0
    for start, size in rotation_blocks(k, block):
        expected[start:start + size, start:start + size] = popcount_hadamard(size)
        covered = start + size
    for j in range(covered, k):
        expected[j, j] = 1
    assert torch.allclose(r, expected, atol=1e-12)
    assert torch.allclose(r @ r, torch.eye(k, dtype=torch.float64), atol=1e-12)  # R = R^T = R^-1
    x = torch.randn(3, 5, k, dtype=torch.float64)
    assert torch.allclose(rotate(x, block), x @ r, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotate_keeps_dtype(dtype):
    x = torch.randn(4, 64).to(dtype)
    y = rotate(x, 32)
    assert y.dtype == dtype
    assert torch.allclose(y.double(), x.double() @ rotation_matrix(64, 32), atol=2e-2)


@pytest.mark.parametrize("recipe", ["a16w4-mxfp4-rot", "a16w4-nvfp4-rot128", "a4w4-mxfp4-rot", "a8w8-int8-rot"])
def test_rotated_layer_forward_matches_float64_reference(recipe):
    torch.manual_seed(0)
    lin = nn.Linear(160, 24)
    r = parse_recipe(recipe)
    q = QuantLinear.from_linear(lin, recipe)
    assert q.rotation_block == r.rotation_block
    rot = rotation_matrix(160, r.rotation_block)
    wq = quantize_tensor((lin.weight.double() @ rot).float(), r.weight_fmt, **r.weight_options).dequantize()
    assert torch.equal(q.dequantized_weight(torch.float32), wq)
    x = torch.randn(5, 160)
    xr = (x.double() @ rot)
    if r.activation.fmt:
        from lowbit.formats import fake_quantize

        xr = fake_quantize(xr.float(), r.activation.fmt, **r.activation.options).double()
    want = xr @ wq.double().T + lin.bias.double()
    got = q(x).double()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_rotation_lowers_mxfp4_error_on_outlier_weights():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    w[:, ::37] *= 20  # a few outlier input channels
    plain = (quantize_tensor(w, "mxfp4").dequantize() - w).pow(2).sum()
    r = rotation_matrix(256, 32).float()
    rot = (quantize_tensor(w @ r, "mxfp4").dequantize() @ r - w).pow(2).sum()
    assert rot < 0.8 * plain
